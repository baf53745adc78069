"""Operations under a real scheduler: dry runs, priority, run notes, stopping runs, deadlines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pymongo
import pytest

from llm_batch import config
from tests.e2e.test_job_dag import seed_tasks, trigger, wait_for_run

pytestmark = pytest.mark.e2e


def test_a_dry_run_estimates_and_sends_nothing(airflow_stack: Any) -> None:
    db = pymongo.MongoClient(airflow_stack.mongo_uri)[airflow_stack.mongo_db_name]
    ids = seed_tasks(db, "dry-", 30)
    jobs_before = db.jobs.count_documents({})
    requests_before = airflow_stack.simulator.stats()["requests_total"]
    done = subprocess.run(
        [sys.executable, "-m", "llm_batch.cli.commands", "submit", "--task-ids", ",".join(ids),
         "--dry-run", "--json"],
        env={**os.environ, **airflow_stack.cli_env},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    estimate = json.loads(done.stdout)
    assert estimate["task_count"] == 30 and estimate["requests"] == 3
    assert estimate["cost_usd"] > 0
    assert db.jobs.count_documents({}) == jobs_before
    assert airflow_stack.simulator.stats()["requests_total"] == requests_before


def test_a_manual_job_started_while_the_nightly_fills_the_pool_finishes_first(
    airflow_stack: Any,
) -> None:
    db = pymongo.MongoClient(airflow_stack.mongo_uri)[airflow_stack.mongo_db_name]
    api = airflow_stack.airflow_api
    sim = airflow_stack.simulator
    with simulator_latency(sim, 1500):
        seed_tasks(db, "night-", 30 * airflow_stack.pool_slots)
        api.trigger_dag_run("llm_batch_nightly", {}, run_id="e2e-nightly")
        nightly_job = wait_for_job(db, "e2e-nightly")
        # The nightly has taken pool slots: its batches are mid-request.
        wait_until(
            lambda: db.batches.count_documents({"job_id": nightly_job, "state": "running"}) >= 2,
            300,
        )

        manual_ids = seed_tasks(db, "prio-", 30)
        api.trigger_dag_run(
            "llm_batch_job",
            {"task_ids": manual_ids, "limit": 30, "job_id": "e2e-prio"},
            run_id="e2e-prio",
        )
        assert wait_for_run(airflow_stack, "e2e-prio") == "success"
        nightly_state = api.get_dag_run("llm_batch_nightly", "e2e-nightly")["state"]
        assert nightly_state not in ("success", "failed"), "the nightly ended first"
        wait_until(
            lambda: api.get_dag_run("llm_batch_nightly", "e2e-nightly")["state"]
            in ("success", "failed"),
            900,
        )
        assert api.get_dag_run("llm_batch_nightly", "e2e-nightly")["state"] == "success"

    manual = db.jobs.find_one({"_id": "e2e-prio"})
    nightly = db.jobs.find_one({"_id": nightly_job})
    assert manual is not None and nightly is not None
    assert manual["timings"]["finished_at"] < nightly["timings"]["finished_at"]
    assert nightly["source"] == "api"  # triggered by the test with a run id of its own
    assert nightly["task_count"] >= 30 * airflow_stack.pool_slots


@contextmanager
def simulator_latency(sim: Any, latency_ms: float) -> Iterator[None]:
    """Make every request take `latency_ms` (no jitter), then back to the stack's 50 ms."""
    sim.configure(latency_ms=latency_ms, latency_jitter_ms=0)
    try:
        yield
    finally:
        sim.configure(latency_ms=50)


def wait_for_job(db: Any, run_id: str, timeout_s: float = 300) -> str:
    found: list[str] = []

    def created() -> bool:
        job = db.jobs.find_one({"run_id": run_id}, {"_id": 1})
        if job:
            found.append(job["_id"])
        return bool(job)

    wait_until(created, timeout_s)
    return found[0]


def wait_until(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s:.0f} s")
        time.sleep(0.3)


def test_a_finished_job_leaves_its_summary_as_the_runs_note(airflow_stack: Any) -> None:
    db = pymongo.MongoClient(airflow_stack.mongo_uri)[airflow_stack.mongo_db_name]
    ids = seed_tasks(db, "note-", 25)
    trigger(airflow_stack, {"task_ids": ids, "limit": 25, "job_id": "e2e-note"}, "e2e-note")
    assert wait_for_run(airflow_stack, "e2e-note") == "success"

    note = airflow_stack.airflow_api.get_dag_run(config.JOB_DAG_ID, "e2e-note")["note"]
    assert note, "the run has no note"
    assert note.startswith("**LLM batch job e2e-note: succeeded, 25 of 25 answered, $")
    assert "- tasks: 25 (" in note and "25 succeeded" in note and "0 failed" in note
    assert "LLM requests: 3" in note and "llm-batch status e2e-note" in note
    job = db.jobs.find_one({"_id": "e2e-note"})
    assert job is not None and job["triggered_by"] == airflow_stack.stack.airflow_username


def test_marking_a_running_job_failed_cancels_what_was_not_sent_and_keeps_in_flight_answers(
    airflow_stack: Any,
) -> None:
    db = pymongo.MongoClient(airflow_stack.mongo_uri)[airflow_stack.mongo_db_name]
    api = airflow_stack.airflow_api
    sim = airflow_stack.simulator
    batches = 6 * airflow_stack.pool_slots
    ids = seed_tasks(db, "stop-", 10 * batches)
    before = sim.stats()
    # Shorter than the 5 s Airflow gives a killed task before SIGKILL: in-flight requests finish.
    with simulator_latency(sim, 2500):
        trigger(airflow_stack, {"task_ids": ids, "limit": len(ids), "job_id": "e2e-stop"},
                "e2e-stop")  # fmt: skip
        wait_until(lambda: db.results.count_documents({"job_id": "e2e-stop"}) >= 20, 300)
        wait_until(lambda: sim.stats()["in_flight"] >= 2, 120)
        api.set_dag_run_state(config.JOB_DAG_ID, "e2e-stop", "failed")
        at_stop = sim.stats()
        assert wait_for_run(airflow_stack, "e2e-stop") == "failed"
    after = sim.stats()

    # Nothing was sent after the stop but what was already in flight (one request per
    # running batch, at most one per pool slot).
    sent_after_stop = after["requests_total"] - at_stop["requests_total"]
    assert sent_after_stop <= airflow_stack.pool_slots, sent_after_stop
    assert after["requests_total"] - before["requests_total"] < batches

    job = db.jobs.find_one({"_id": "e2e-stop"})
    assert job is not None and job["state"] == "cancelled"
    assert "marked failed" in job["cancel"]["by"]
    results = list(db.results.find({"job_id": "e2e-stop"}))
    assert sorted(r["task_id"] for r in results) == ids  # exactly one result per task
    statuses = Counter(r["status"] for r in results)
    assert set(statuses) == {"succeeded", "cancelled"}, statuses
    assert {r["error"]["type"] for r in results if r["status"] == "cancelled"} == {"cancelled"}
    # In-flight answers are kept when they arrive within Airflow's 5 s grace before SIGKILL;
    # only a request still in flight at the stop can lose its answer to the kill (its tasks
    # end cancelled, and resuming the job replays its idempotency key, unbilled).
    billed = after["tasks_billed"] - before["tasks_billed"]
    assert statuses["succeeded"] <= billed <= statuses["succeeded"] + 10 * at_stop["in_flight"]
    assert job["counts"] == {**dict.fromkeys(("failed", "needs_review"), 0), **statuses}

    tis = api.list_task_instances(config.JOB_DAG_ID, "e2e-stop")
    states = Counter((ti["task_id"], ti["state"]) for ti in tis)
    assert states[("reconcile_job", "success")] == 1 and states[("report", "failed")] == 1
    # Airflow fails or skips the batches that had not finished; none is left to run.
    assert states[("process_batch", "failed")] + states[("process_batch", "skipped")] >= 1
    assert not {state for (task, state) in states if task == "process_batch"} - {
        "success",
        "failed",
        "skipped",
    }
    note = api.get_dag_run(config.JOB_DAG_ID, "e2e-stop")["note"]
    assert note and "e2e-stop: cancelled" in note and "marked failed" in note


def test_a_run_past_its_deadline_alerts_with_the_jobs_progress(airflow_stack: Any) -> None:
    from tests.e2e.conftest import E2E_DEADLINE_S

    db = pymongo.MongoClient(airflow_stack.mongo_uri)[airflow_stack.mongo_db_name]
    ids = seed_tasks(db, "late-", 10 * airflow_stack.pool_slots)
    sim = airflow_stack.simulator
    # One round of batches that alone outlasts the deadline (the hook's timeout is 30 s).
    with simulator_latency(sim, (E2E_DEADLINE_S + 5) * 1000):
        trigger(airflow_stack, {"task_ids": ids, "limit": len(ids), "job_id": "e2e-late"},
                "e2e-late")  # fmt: skip
        alert = airflow_stack.alerts.wait_for(
            lambda a: "LLM batch job e2e-late (run e2e-late) is still running past its deadline"
            in a["text"],
            E2E_DEADLINE_S + 120,
        )
        state_when_alerted = airflow_stack.airflow_api.get_dag_run(config.JOB_DAG_ID, "e2e-late")
        assert wait_for_run(airflow_stack, "e2e-late") == "success"
    assert state_when_alerted["state"] == "running"
    assert "e2e-late (run e2e-late) is still running past its deadline" in alert["text"]
    assert f"of {len(ids)} tasks have a result" in alert["text"]
    assert "llm-batch cancel e2e-late" in alert["text"]
