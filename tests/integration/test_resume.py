"""Resuming a job, against a real MongoDB-wire server and the simulator over HTTP.

A resume may change what the job may spend and how its answers are judged (recorded in the
job's history), never the question or the selection, and never takes a job from a run that
still works on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from llm_batch.jobs import create_job
from llm_batch.reconcile import reconcile_job
from llm_batch.request import InvalidJobRequest
from llm_batch.store import JobStore
from llm_hook import LLMClient
from tests.conftest import Simulator
from tests.integration.test_pipeline import run_job, seed

pytestmark = pytest.mark.integration

AT = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)


def start(store: JobStore, run_id: str, **conf: Any) -> str:
    conf.setdefault("filter", {})
    return create_job(store, conf, dag_id="d", run_id=run_id, source="ui").job_id


def test_resuming_a_budget_exhausted_job_with_a_raised_budget_sends_the_rest_and_records_it(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    seed(store, 50)
    client = make_client(sim)
    job_id = start(store, "r1", max_cost_usd=1e-6, instructions="Summarise.")
    run_job(store, client, job_id)
    first = reconcile_job(store, job_id)
    assert first.counts["cancelled"] >= 40
    billed_before = sim.stats()["tasks_billed"]

    resumed = create_job(
        store,
        {"filter": {}, "job_id": job_id, "max_cost_usd": 100.0, "review_below": 0.6},
        dag_id="d",
        run_id="r2",
        source="ui",
        triggered_by="alice",
        now=lambda: AT,
    )
    run_job(store, client, job_id)
    summary = reconcile_job(store, job_id)

    assert resumed.resumed
    assert summary.counts["cancelled"] == 0
    assert summary.counts["succeeded"] + summary.counts["needs_review"] == 50
    assert sim.stats()["tasks_billed"] - billed_before == first.counts["cancelled"]
    job = store.get_job(job_id)
    assert job is not None
    assert job["params"]["max_cost_usd"] == 100.0 and job["params"]["review_below"] == 0.6
    assert job["params"]["instructions"] == "Summarise.", "an empty field keeps the job's value"
    (entry,) = job["history"]
    assert entry["event"] == "resumed" and entry["run_id"] == "r2" and entry["by"] == "alice"
    assert entry["at"].replace(tzinfo=UTC) == AT
    assert entry["changes"] == {
        "max_cost_usd": {"from": 1e-6, "to": 100.0},
        "review_below": {"from": None, "to": 0.6},
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"instructions": "Translate."}, "instructions cannot change when resuming"),
        ({"model": "sim-large"}, "model cannot change when resuming"),
        ({"llm_params": {"temperature": 0.9}}, "llm_params cannot change when resuming"),
        ({"filter": {"payload.n": {"$lt": 5}}}, "the selection cannot change"),
        ({"filter": None, "task_ids": ["t00001"]}, "the selection cannot change"),
        ({"delivery": "provider_batch"}, "delivery cannot change when resuming"),
    ],
)
def test_resuming_with_another_question_or_selection_is_refused_and_changes_nothing(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
    change: dict[str, Any],
    message: str,
) -> None:
    seed(store, 20)
    job_id = start(store, "r1", instructions="Summarise.", model="sim-small")
    run_job(store, make_client(start_simulator(latency_ms=0)), job_id)
    reconcile_job(store, job_id)
    before = store.get_job(job_id)

    with pytest.raises(InvalidJobRequest, match=re.escape(message)):
        create_job(
            store,
            {"filter": {}, "job_id": job_id, **change},
            dag_id="d",
            run_id="r2",
            source="ui",
        )

    assert store.get_job(job_id) == before


def test_resuming_a_job_whose_run_still_runs_is_refused_and_names_that_run(
    store: JobStore,
) -> None:
    seed(store, 20)
    job_id = start(store, "scheduled__first")

    with pytest.raises(InvalidJobRequest) as refused:
        create_job(store, {"filter": {}, "job_id": job_id}, dag_id="d", run_id="r2", source="ui")

    text = str(refused.value)
    assert "still running under run scheduled__first of DAG d" in text
    assert f"llm-batch cancel {job_id}" in text and "mark run scheduled__first failed" in text
    job = store.get_job(job_id)
    assert (
        job is not None
        and job["run_id"] == "scheduled__first"
        and job["runs"] == ["scheduled__first"]
    )


def test_a_job_left_running_by_a_run_that_has_ended_can_be_taken_over(store: JobStore) -> None:
    seed(store, 20)
    job_id = start(store, "r1")
    asked: list[tuple[str, str]] = []

    def run_active(dag_id: str, run_id: str) -> bool:
        asked.append((dag_id, run_id))
        return False

    resumed = create_job(
        store,
        {"filter": {}, "job_id": job_id},
        dag_id="d",
        run_id="r2",
        source="ui",
        run_active=run_active,
    )

    assert resumed.resumed and asked == [("d", "r1")]
    job = store.get_job(job_id)
    assert job is not None and job["run_id"] == "r2" and job["history"][0]["changes"] == {}


def test_a_retried_create_job_of_the_same_run_keeps_its_job_without_a_resume(
    store: JobStore,
) -> None:
    """The CLI names new jobs itself: its run's retried create_job must find its own job."""
    seed(store, 20)
    first = create_job(
        store, {"filter": {}, "job_id": "job-cli-1"}, dag_id="d", run_id="r1", source="ui"
    )
    again = create_job(
        store, {"filter": {}, "job_id": "job-cli-1"}, dag_id="d", run_id="r1", source="ui"
    )
    assert again.job_id == first.job_id == "job-cli-1" and not again.resumed
    assert (store.get_job("job-cli-1") or {})["history"] == []


def test_a_nightly_job_resumed_under_the_job_dag_is_checked_against_that_dags_run(
    store: JobStore,
) -> None:
    seed(store, 20)
    job_id = create_job(
        store,
        {"filter": {}},
        dag_id="llm_batch_nightly",
        run_id="scheduled__1",
        source="scheduled",
    ).job_id
    live = {("llm_batch_job", "cli__resume")}

    def resume(run_id: str) -> None:
        create_job(
            store,
            {"filter": {}, "job_id": job_id},
            dag_id="llm_batch_job",
            run_id=run_id,
            source="cli",
            run_active=lambda dag_id, run_id: (dag_id, run_id) in live,
        )

    resume("cli__resume")
    job = store.get_job(job_id)
    assert job is not None and (job["dag_id"], job["run_id"]) == ("llm_batch_job", "cli__resume")

    # While the resuming run still sends, a second resume must be refused, not take over.
    with pytest.raises(InvalidJobRequest, match="under run cli__resume of DAG llm_batch_job"):
        resume("cli__again")
