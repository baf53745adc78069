"""Provider-batch delivery under a real scheduler and triggerer, against the simulator's batch API.

The stack's `llm_default` connection is switched to the OpenAI adapter (and a 1 s poll) for
this module and switched back after. Batch state times are seconds, so every wait is short.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pymongo
import pytest

from llm_batch import config
from llm_batch.provider_batch import TERMINAL
from llm_batch_dev.stack.settings import DEFAULT_LLM_EXTRA

pytestmark = pytest.mark.e2e

PRICE_IN, PRICE_OUT = (
    DEFAULT_LLM_EXTRA["price_input_per_1k"],
    DEFAULT_LLM_EXTRA["price_output_per_1k"],
)
RUN_TIMEOUT_S = 240
DELIVER = config.DELIVER_PROVIDER_BATCH_TASK_ID


@pytest.fixture(scope="module")
def stack(airflow_stack: Any) -> Iterator[Any]:
    """The stack with an OpenAI-compatible `llm_default` (the simulator speaks both)."""
    api = airflow_stack.airflow_api
    extra = {**DEFAULT_LLM_EXTRA, "adapter": "openai", "batch_poll_s": 1}
    api.put_connection(
        config.LLM_CONN_ID,
        "llm_batch",
        host=airflow_stack.simulator_url,
        password=airflow_stack.simulator_api_key,
        extra=extra,
    )
    try:
        yield airflow_stack
    finally:
        api.put_connection(
            config.LLM_CONN_ID,
            "llm_batch",
            host=airflow_stack.simulator_url,
            password=airflow_stack.simulator_api_key,
            extra=dict(DEFAULT_LLM_EXTRA),
        )
        airflow_stack.simulator.configure(batch_outcome="completed", latency_ms=50)


@pytest.fixture
def db(stack: Any) -> Iterator[Any]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(stack.mongo_uri)
    yield client[stack.mongo_db_name]
    client.close()


def seed(db: Any, prefix: str, count: int) -> list[str]:
    ids = [f"{prefix}{i:05d}" for i in range(count)]
    db.tasks.insert_many(
        [{"_id": t, "payload": {"text": f"text of {t}", "n": i}} for i, t in enumerate(ids)]
    )
    return ids


def trigger(stack: Any, dag_id: str, conf: dict[str, Any], run_id: str) -> None:
    stack.airflow_api.trigger_dag_run(dag_id, conf, run_id=run_id)


def wait_for(predicate: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f} s")


def run_state(stack: Any, dag_id: str, run_id: str) -> str | None:
    state = stack.airflow_api.get_dag_run(dag_id, run_id)["state"]
    return str(state) if state in ("success", "failed") else None


def instances(stack: Any, dag_id: str, run_id: str) -> dict[str, str]:
    rows = stack.airflow_api.list_task_instances(dag_id, run_id)
    return {f"{ti['task_id']}[{ti['map_index']}]": str(ti["state"]) for ti in rows}


def job_of(db: Any, run_id: str) -> dict[str, Any]:
    return wait_for(lambda: db.jobs.find_one({"run_id": run_id}), 60, f"the job of {run_id}")


def provider_docs(db: Any, job_id: str) -> list[dict[str, Any]]:
    return list(db[config.PROVIDER_BATCHES].find({"job_id": job_id}).sort("round", 1))


def check_answered_once(db: Any, job_id: str, task_ids: list[str]) -> Counter[str]:
    results = list(db.results.find({"job_id": job_id}))
    assert Counter(r["task_id"] for r in results) == Counter(task_ids)
    return Counter(r["status"] for r in results)


def test_a_nightly_run_of_2000_tasks_goes_through_one_provider_batch_at_the_batch_price(
    stack: Any, db: Any
) -> None:
    stack.simulator.configure(
        latency_ms=0,
        batch_validating_s=1,
        batch_in_progress_s=8,
        batch_finalizing_s=1,
        batch_outcome="completed",
    )
    created_before = stack.simulator.stats()["batch_api"]["batches_created"]
    billed_before = stack.simulator.stats()["output_tokens_billed"]
    task_ids = seed(db, "pbn-", 2000)
    run_id = "pb-nightly"
    # The nightly DAG's form defaults to delivery=provider_batch; only the selection is given.
    trigger(stack, config.NIGHTLY_DAG_ID, {"filter": {"_id": {"$regex": "^pbn-"}}}, run_id)
    job = job_of(db, run_id)

    wait_for(
        lambda: instances(stack, config.NIGHTLY_DAG_ID, run_id).get(f"{DELIVER}[-1]") == "deferred",
        90,
        "the deliver task deferring",
    )
    # While the provider works, nothing of the job holds a worker slot.
    for _ in range(6):
        states = instances(stack, config.NIGHTLY_DAG_ID, run_id)
        if provider_docs(db, job["_id"])[0]["status"] in TERMINAL:
            break
        assert "running" not in states.values(), states
        assert states[f"{DELIVER}[-1]"] == "deferred", states
        time.sleep(0.5)

    assert (
        wait_for(lambda: run_state(stack, config.NIGHTLY_DAG_ID, run_id), RUN_TIMEOUT_S, "the run")
        == "success"
    )
    assert check_answered_once(db, job["_id"], task_ids) == {"succeeded": 2000}
    job = db.jobs.find_one({"_id": job["_id"]})
    assert job["state"] == "succeeded" and job["params"]["delivery"] == "provider_batch"
    assert job["requests"] == 200
    usage = job["usage"]
    batch_price = (usage["input_tokens"] * PRICE_IN + usage["output_tokens"] * PRICE_OUT) / 2000
    assert job["cost_usd"] == pytest.approx(batch_price, abs=1e-6)
    stats = stack.simulator.stats()
    assert stats["batch_api"]["batches_created"] == created_before + 1
    assert stats["output_tokens_billed"] - billed_before == usage["output_tokens"]
    assert [d["status"] for d in provider_docs(db, job["_id"])] == ["completed"]
    planned = instances(stack, config.NIGHTLY_DAG_ID, run_id)
    assert not any(
        key.startswith(config.PROCESS_BATCH_TASK_ID) and state == "success"
        for key, state in planned.items()
    )


def test_an_expired_batch_keeps_its_answers_and_re_sends_the_rest_once(stack: Any, db: Any) -> None:
    stack.simulator.configure(
        latency_ms=0,
        batch_validating_s=0.5,
        batch_in_progress_s=3,
        batch_finalizing_s=0.5,
        batch_outcome="expired",
        batch_done_fraction=0.6,
    )
    task_ids = seed(db, "pbx-", 100)
    run_id = "pb-expired"
    trigger(stack, config.JOB_DAG_ID, {"task_ids": task_ids, "delivery": "provider_batch"}, run_id)
    job = job_of(db, run_id)
    wait_for(
        lambda: provider_docs(db, job["_id"])
        and provider_docs(db, job["_id"])[0].get("provider_batch_id"),
        90,
        "the first provider batch",
    )
    # Batches created from now on complete: only the first one expires.
    stack.simulator.configure(batch_outcome="completed")

    assert (
        wait_for(lambda: run_state(stack, config.JOB_DAG_ID, run_id), RUN_TIMEOUT_S, "the run")
        == "success"
    )
    assert check_answered_once(db, job["_id"], task_ids) == {"succeeded": 100}
    docs = provider_docs(db, job["_id"])
    assert [d["status"] for d in docs] == ["expired", "completed"]
    assert [sum(len(r["task_ids"]) for r in d["requests"]) for d in docs] == [100, 40]
    billed = stack.simulator.stats(per_task=1)["billed_per_task"]
    assert {billed[t] for t in task_ids} == {1}


def test_cancelling_the_job_cancels_its_provider_batch(stack: Any, db: Any) -> None:
    stack.simulator.configure(
        latency_ms=0,
        batch_validating_s=0.5,
        batch_in_progress_s=60,
        batch_cancelling_s=1,
        batch_outcome="completed",
    )
    task_ids = seed(db, "pbc-", 50)
    run_id = "pb-cancel"
    trigger(stack, config.JOB_DAG_ID, {"task_ids": task_ids, "delivery": "provider_batch"}, run_id)
    job = job_of(db, run_id)
    wait_for(
        lambda: instances(stack, config.JOB_DAG_ID, run_id).get(f"{DELIVER}[-1]") == "deferred",
        90,
        "the deliver task deferring",
    )
    env = {**os.environ, **stack.cli_env}
    cli = [sys.executable, "-m", "llm_batch.cli.commands"]
    shown = subprocess.run([*cli, "status", job["_id"]], env=env, capture_output=True, text=True)
    assert "provider  batch API " in shown.stdout, shown.stdout + shown.stderr
    cancelled = subprocess.run(
        [*cli, "cancel", job["_id"]], env=env, capture_output=True, text=True
    )
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr

    assert (
        wait_for(lambda: run_state(stack, config.JOB_DAG_ID, run_id), RUN_TIMEOUT_S, "the run")
        == "failed"
    )
    assert [d["status"] for d in provider_docs(db, job["_id"])] == ["cancelled"]
    job = db.jobs.find_one({"_id": job["_id"]})
    assert job["state"] == "cancelled"
    statuses = check_answered_once(db, job["_id"], task_ids)
    assert statuses["cancelled"] > 0
    assert stack.simulator.stats()["batch_api"]["cancel_requests"] >= 1


def test_a_retried_deliver_task_re_attaches_instead_of_submitting_again(
    stack: Any, db: Any
) -> None:
    stack.simulator.configure(
        latency_ms=0,
        batch_validating_s=0.5,
        batch_in_progress_s=10,
        batch_finalizing_s=0.5,
        batch_outcome="completed",
    )
    created_before = stack.simulator.stats()["batch_api"]["batches_created"]
    task_ids = seed(db, "pbr-", 30)
    run_id = "pb-resume"
    trigger(stack, config.JOB_DAG_ID, {"task_ids": task_ids, "delivery": "provider_batch"}, run_id)
    job = job_of(db, run_id)
    wait_for(
        lambda: instances(stack, config.JOB_DAG_ID, run_id).get(f"{DELIVER}[-1]") == "deferred",
        90,
        "the deliver task deferring",
    )
    # As if its worker died: clear the deferred task; it runs again from `execute`.
    stack.airflow_api._call(
        "POST",
        f"/dags/{config.JOB_DAG_ID}/clearTaskInstances",
        json={
            "dag_run_id": run_id,
            "task_ids": [DELIVER],
            "only_failed": False,
            "reset_dag_runs": False,
            "dry_run": False,
        },
    )
    assert (
        wait_for(lambda: run_state(stack, config.JOB_DAG_ID, run_id), RUN_TIMEOUT_S, "the run")
        == "success"
    )
    assert check_answered_once(db, job["_id"], task_ids) == {"succeeded": 30}
    assert len(provider_docs(db, job["_id"])) == 1
    assert stack.simulator.stats()["batch_api"]["batches_created"] == created_before + 1
