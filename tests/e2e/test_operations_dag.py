"""Operations under a real scheduler: dry runs send nothing; operators' jobs overtake nightly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pymongo
import pytest

from tests.e2e.test_job_dag import seed_tasks, wait_for_run

pytestmark = pytest.mark.e2e


def test_a_dry_run_estimates_and_sends_nothing(airflow_stack: Any) -> None:
    db = pymongo.MongoClient(airflow_stack.mongo_uri)[airflow_stack.mongo_db_name]
    ids = seed_tasks(db, "dry-", 30)
    jobs_before = db.jobs.count_documents({})
    requests_before = airflow_stack.simulator.stats()["requests_total"]
    done = subprocess.run(
        [sys.executable, "-m", "llm_batch.cli", "submit", "--task-ids", ",".join(ids),
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
    sim.configure(latency_ms=1500, latency_jitter_ms=0)
    try:
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
    finally:
        sim.configure(latency_ms=50)

    manual = db.jobs.find_one({"_id": "e2e-prio"})
    nightly = db.jobs.find_one({"_id": nightly_job})
    assert manual is not None and nightly is not None
    assert manual["timings"]["finished_at"] < nightly["timings"]["finished_at"]
    assert nightly["source"] == "manual"  # triggered by the test, through the nightly DAG
    assert nightly["task_count"] >= 30 * airflow_stack.pool_slots


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
