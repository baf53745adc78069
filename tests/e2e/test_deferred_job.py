"""A deferred job under a real scheduler and triggerer: the triggerer is killed mid-job."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pymongo
import pytest

from llm_batch import config
from llm_batch_dev.stack import processes
from tests.e2e.test_job_dag import check_job_in_mongo, seed_tasks, trigger, wait_for_run

pytestmark = pytest.mark.e2e

TASKS = 300
HEALTH_CHECK_THRESHOLD_S = 10
"""How long the second triggerer waits for the killed one's heartbeat before adopting its
triggers (Airflow's default is 30 s)."""


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))


def children_of(pid: int) -> list[int]:
    return [proc.pid for proc in processes.snapshot() if proc.ppid == pid]


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.decode().partition("=") for entry in raw.split(b"\0") if b"=" in entry)
    return {name: value for name, _, value in pairs}


def wait_for_batch_in_flight(db: Any, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    """Return a batch mid-request once several are (the kill must cut requests in flight)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = list(db.batches.find({"job_id": job_id, "state": "running"}).limit(3))
        if len(running) >= 3:
            time.sleep(0.5)  # let the requests reach the service
            return running[0]
        time.sleep(0.2)
    raise AssertionError(f"no batches of {job_id} in flight within {timeout_s:.0f} s")


def test_a_deferred_job_survives_a_killed_triggerer_exactly_once_within_the_pool(
    airflow_stack: Any,
) -> None:
    stack = airflow_stack.stack
    db = pymongo.MongoClient(airflow_stack.mongo_uri)[airflow_stack.mongo_db_name]
    sim = airflow_stack.simulator
    sim.reset()
    sim.configure(
        latency_ms=1500,
        latency_jitter_ms=500,
        seed=11,
        rate_limit_rate=0.03,
        error_5xx_rate=0.05,
        reset_rate=0.02,
        drop_id_rate=0.01,
    )
    stack.set_llm_extra(execution_mode="deferred")
    task_ids = seed_tasks(db, "deferred-", TASKS)
    run_id = trigger(
        airflow_stack,
        {"task_ids": task_ids, "limit": TASKS, "job_id": "e2e-deferred"},
        "e2e-deferred",
    )
    try:
        victim = wait_for_batch_in_flight(db, "e2e-deferred")
        # The batch runs in the triggerer's trigger runner, a child of `airflow triggerer`.
        runner = victim["worker"]["pid"]
        triggerer = parent_of(runner)
        assert "triggerer" in processes.command_line(triggerer), processes.command_line(triggerer)
        answered_before = {r["task_id"] for r in db.results.find({"job_id": "e2e-deferred"})}
        for pid in [triggerer, *children_of(triggerer)]:
            os.kill(pid, signal.SIGKILL)

        airflow = stack.process("airflow")
        assert airflow is not None
        env = {
            **environment_of(airflow.pid),
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": str(HEALTH_CHECK_THRESHOLD_S),
            # The killed triggerer's log server may still hold its port.
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(processes.free_port()),
        }
        second = processes.start(
            "triggerer-2",
            [str(Path(sys.executable).parent / "airflow"), "triggerer"],
            stack.settings.logs_dir / "triggerer-2.log",
            env=env,
            cwd=stack.work_dir,
        )
        sim.configure(latency_ms=300, latency_jitter_ms=100)
        assert wait_for_run(airflow_stack, run_id) == "success"
        adopted = [
            b
            for b in db.batches.find({"job_id": "e2e-deferred", "state": "done"})
            if b.get("worker", {}).get("pid") in children_of(second.pid)
        ]
    finally:
        stats = sim.stats(per_task=1)
        sim.configure(
            rate_limit_rate=0, error_5xx_rate=0, reset_rate=0, drop_id_rate=0, latency_ms=50
        )
        # The second triggerer stays: it is the stack's triggerer now, for the tests after this
        # one (deferred batches wait in it); `stack.down()` stops it with the stack's processes.

    check_job_in_mongo(db, "e2e-deferred", task_ids, stats)
    assert db.results.count_documents({"job_id": "e2e-deferred", "status": "succeeded"}) == TASKS
    assert adopted, "the second triggerer ran none of the batches"
    received = stats["received_per_task"]
    assert all(received[t] == 1 for t in answered_before)
    assert stats["tasks_billed"] <= 1.05 * TASKS
    assert sum(stats["faults_injected"].values()) > 0
    assert 0 < stats["peak_in_flight"] <= airflow_stack.pool_slots
    instances = airflow_stack.airflow_api.list_task_instances(
        config.JOB_DAG_ID, run_id, task_id="process_batch"
    )
    assert len(instances) == TASKS // config.BATCH_SIZE
    assert {ti["state"] for ti in instances} == {"success"}
