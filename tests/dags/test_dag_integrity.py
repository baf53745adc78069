"""Every DAG file imports cleanly, parses fast and follows the project's policies."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk import TriggerRule

from llm_batch import config

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
DAG_FILES = sorted(DAGS_DIR.glob("*.py"))


@pytest.fixture(scope="module")
def dag_bag() -> DagBag:
    return DagBag(dag_folder=str(DAGS_DIR))


def test_dag_files_import_without_errors(dag_bag: DagBag) -> None:
    assert dag_bag.import_errors == {}
    assert dag_bag.dags, "no DAG was found in dags/"


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_each_file_defines_one_dag_named_after_it_with_its_docstring(
    dag_bag: DagBag, path: Path
) -> None:
    dags = [d for d in dag_bag.dags.values() if Path(d.fileloc).resolve() == path.resolve()]
    assert [d.dag_id for d in dags] == [path.stem]
    module_doc = ast.get_docstring(ast.parse(path.read_text()))
    assert module_doc and dags[0].doc_md and module_doc.strip() == dags[0].doc_md.strip()


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_dag_files_import_only_the_sdk_and_light_modules_at_top_level(path: Path) -> None:
    """The file is parsed for every task instance: no DB, hook or HTTP client imports there."""
    heavy = {
        "pymongo",
        "requests",
        "llm_hook",
        "airflow.providers",
        "llm_batch.orchestration.task_bodies",
    }
    tree = ast.parse(path.read_text())
    for node in tree.body:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            assert not any(name == h or name.startswith(h + ".") for h in heavy), name
            assert not name.startswith("airflow.") or name.startswith("airflow.sdk"), name


def test_every_dag_has_tags_and_every_task_retries(dag_bag: DagBag) -> None:
    for dag in dag_bag.dags.values():
        assert dag.tags, f"{dag.dag_id} has no tags"
        for task in dag.tasks:
            if task.task_id != "report":
                assert task.retries >= 1, f"{dag.dag_id}.{task.task_id} never retries"


def test_batch_task_runs_in_the_llm_pool_and_retries_with_backoff(dag_bag: DagBag) -> None:
    task = dag_bag.dags[config.JOB_DAG_ID].get_task("process_batch")
    assert task.pool == config.POOL_NAME
    assert task.retries >= 3
    assert task.retry_exponential_backoff
    assert task.map_index_template


def test_reconcile_runs_whatever_happened_to_the_batches(dag_bag: DagBag) -> None:
    dag = dag_bag.dags[config.JOB_DAG_ID]
    reconcile = dag.get_task("reconcile_job")
    # A teardown of create_job: it runs once the job exists, however the batches ended, and
    # even after an operator marked the run failed (which skips every pending normal task).
    assert reconcile.is_teardown and dag.get_task("create_job").is_setup
    assert reconcile.trigger_rule == TriggerRule.ALL_DONE_SETUP_SUCCESS
    assert "process_batch" in reconcile.upstream_task_ids
    assert not reconcile.on_failure_fail_dagrun


def test_report_is_the_teardown_that_decides_the_runs_state(dag_bag: DagBag) -> None:
    report = dag_bag.dags[config.JOB_DAG_ID].get_task("report")
    assert report.is_teardown and report.on_failure_fail_dagrun
    assert report.upstream_task_ids == {"create_job", "reconcile_job"}


@pytest.mark.parametrize("dag_id", [config.JOB_DAG_ID, config.NIGHTLY_DAG_ID])
def test_a_run_past_its_deadline_calls_the_deadline_alert(dag_bag: DagBag, dag_id: str) -> None:
    from llm_batch.orchestration.dag_factory import DEADLINE_CALLBACK

    deadline = dag_bag.dags[dag_id].deadline
    alerts = deadline if isinstance(deadline, list) else [deadline]
    assert len(alerts) == 1
    assert alerts[0].interval.total_seconds() == config.DEFAULT_DEADLINE_S
    assert alerts[0].callback.path == DEADLINE_CALLBACK
    module, _, name = DEADLINE_CALLBACK.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))


def test_the_deadline_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_batch.orchestration.dag_factory import deadline_from_env

    monkeypatch.setenv(config.DEADLINE_ENV, "90")
    assert deadline_from_env() == 90
    monkeypatch.setenv(config.DEADLINE_ENV, "0")
    assert deadline_from_env() == 0
    for bad in ("soon", "-5"):
        monkeypatch.setenv(config.DEADLINE_ENV, bad)
        with pytest.raises(ValueError, match=config.DEADLINE_ENV):
            deadline_from_env()


def test_job_dag_is_shaped_as_designed(dag_bag: DagBag) -> None:
    dag = dag_bag.dags[config.JOB_DAG_ID]
    assert dag.get_task("create_job").downstream_task_ids == {
        "deliver_provider_batch",
        "plan_batches",
        "process_batch",
        "reconcile_job",
        "report",
    }
    assert dag.get_task("deliver_provider_batch").downstream_task_ids == {"plan_batches"}
    assert dag.get_task("deliver_provider_batch").pool != config.POOL_NAME
    assert dag.get_task("plan_batches").downstream_task_ids == {"process_batch"}
    assert dag.get_task("reconcile_job").downstream_task_ids == {"report"}
    assert dag.schedule is None or str(dag.timetable.summary) == "None"


def test_form_params_are_exactly_what_the_job_request_accepts(dag_bag: DagBag) -> None:
    from llm_batch.request import REQUEST_KEYS

    params = dag_bag.dags[config.JOB_DAG_ID].params
    assert set(params.keys()) == set(REQUEST_KEYS)
    for name in params:
        param = params.get_param(name)
        assert param.schema.get("title") and param.description, name
    # The operator's form starts at a trial-sized job, the nightly at a full one.
    assert params["limit"] == 100
    assert params.get_param("limit").schema["allOf"] == [
        {"minimum": 1, "maximum": config.MAX_TASKS_PER_JOB}
    ]


def test_operator_jobs_outrank_the_nightly_run_in_the_pool(dag_bag: DagBag) -> None:
    manual = dag_bag.dags[config.JOB_DAG_ID].get_task("process_batch")
    nightly = dag_bag.dags["llm_batch_nightly"].get_task("process_batch")
    assert manual.pool == nightly.pool == config.POOL_NAME
    assert manual.priority_weight > nightly.priority_weight
    assert str(manual.weight_rule).endswith("absolute")


def test_a_nightly_run_never_overlaps_the_one_still_waiting_for_its_answers(
    dag_bag: DagBag,
) -> None:
    assert dag_bag.dags["llm_batch_nightly"].max_active_runs == 1
    assert dag_bag.dags[config.JOB_DAG_ID].max_active_runs > 1


def test_nightly_runs_at_two_utc_over_the_backlog(dag_bag: DagBag) -> None:
    nightly = dag_bag.dags["llm_batch_nightly"]
    assert nightly.schedule == "0 2 * * *"
    assert nightly.params["filter"] == {
        "last_result.status": {"$nin": ["succeeded", "needs_review"]},
        "last_result.error.type": {
            "$nin": ["content_filtered", "invalid_input", "output_too_large", "too_large"]
        },
        "auto_attempts.2": {"$exists": False},
    }
    assert nightly.params["limit"] == config.MAX_TASKS_PER_JOB
    manual = dag_bag.dags[config.JOB_DAG_ID]
    assert [t.task_id for t in nightly.tasks] == [t.task_id for t in manual.tasks]
