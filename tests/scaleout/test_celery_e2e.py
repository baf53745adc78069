"""The job DAG on docker-compose.yaml's topology, natively: Celery, PostgreSQL, Redis, 2 workers."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import pymongo
import pytest
import requests

from llm_batch import config
from tests.e2e.test_job_dag import check_job_in_mongo, seed_tasks, trigger, wait_for_run
from tests.scaleout.conftest import CeleryCluster, PostgresService, connections_in_use

pytestmark = pytest.mark.e2e

TASKS = 1000
SECRET_KEY_ERROR = "same 'secret_key'"


class ConnectionSampler(threading.Thread):
    """Record the most PostgreSQL connections the topology's database had at once."""

    def __init__(self, server: PostgresService, database: str) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.database = database
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.peak = max(self.peak, connections_in_use(self.server, self.database))


def bearer(cluster: CeleryCluster) -> dict[str, str]:
    """Log in as the admin, as the UI does, and return the header for the REST API."""
    answer = requests.post(
        f"{cluster.airflow_url}/auth/token",
        json={"username": "admin", "password": cluster.admin_password},
        timeout=10,
    )
    answer.raise_for_status()
    return {"Authorization": f"Bearer {answer.json()['access_token']}"}


def read_running_task_log(cluster: CeleryCluster, run_id: str, timeout_s: float = 240) -> str:
    """Fetch, through the api-server, the log of a batch while it runs on worker w1.

    A running task's log comes from its worker's log server, which checks a token signed with
    `[api] secret_key`: with a key per container the api-server gets 403 instead.
    """
    headers = bearer(cluster)
    base = f"{cluster.airflow_url}/api/v2/dags/{config.JOB_DAG_ID}/dagRuns/{run_id}/taskInstances"
    served = f"http://{cluster.workers['w1']}:{cluster.worker_log_port}/log/"
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            listing = requests.get(
                base,
                params={"task_id": "process_batch", "state": "running", "limit": 100},
                headers=headers,
                timeout=30,
            ).json()
        except requests.Timeout:
            continue  # a busy api-server (2 cores shared by the whole topology): ask again
        for ti in listing.get("task_instances", []):
            if ti["hostname"] != cluster.workers["w1"]:
                continue
            answer = requests.get(
                f"{base}/process_batch/logs/{ti['try_number']}",
                params={"map_index": ti["map_index"], "full_content": "true"},
                headers={**headers, "Accept": "application/json"},
                timeout=60,
            )
            answer.raise_for_status()
            last = json.dumps(answer.json())
            if SECRET_KEY_ERROR in last or served in last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"no running batch's log was served by w1 in {timeout_s:.0f} s: {last}")


def test_a_1000_task_job_runs_on_both_celery_workers_exactly_once_within_the_pool(
    celery_cluster: CeleryCluster,
) -> None:
    db: Any = pymongo.MongoClient(celery_cluster.mongo_uri)[celery_cluster.mongo_db_name]
    sim = celery_cluster.simulator
    sim.reset()
    sim.configure(latency_ms=400, latency_jitter_ms=100, seed=5, error_5xx_rate=0.02)
    task_ids = seed_tasks(db, "celery-", TASKS)
    sampler = ConnectionSampler(celery_cluster.postgres, celery_cluster.database)
    sampler.start()

    started = time.monotonic()
    run_id = trigger(
        celery_cluster,
        {"task_ids": task_ids, "limit": TASKS, "job_id": "scaleout-celery"},
        "scaleout-celery",
    )
    log = read_running_task_log(celery_cluster, run_id)
    state = wait_for_run(celery_cluster, run_id, timeout_s=600)
    elapsed = time.monotonic() - started
    sampler.done.set()
    sampler.join()
    stats = sim.stats()

    # The api-server fetched the running task's log from w1's log server: same secret_key.
    assert SECRET_KEY_ERROR not in log, log[:2000]
    assert "Could not read served logs" not in log, log[:2000]

    assert state == "success"
    check_job_in_mongo(db, "scaleout-celery", task_ids, stats)
    job = db.jobs.find_one({"_id": "scaleout-celery"})
    assert job is not None and job["counts"]["succeeded"] == TASKS, job and job.get("top_errors")
    assert 0 < stats["peak_in_flight"] <= celery_cluster.pool_slots

    instances = celery_cluster.airflow_api.list_task_instances(
        config.JOB_DAG_ID, run_id, task_id="process_batch"
    )
    assert len(instances) == TASKS // config.BATCH_SIZE
    assert {ti["pool"] for ti in instances} == {config.POOL_NAME}
    assert {ti["state"] for ti in instances} == {"success"}
    # The hostname each task instance ran on, as Airflow recorded it: the worker's address.
    names = {address: name for name, address in celery_cluster.workers.items()}
    by_worker = Counter(names.get(str(ti["hostname"]), ti["hostname"]) for ti in instances)
    print(
        f"\n1000-task job on Celery in {elapsed:.0f} s; batches per worker: {dict(by_worker)}; "
        f"PostgreSQL connections at most {sampler.peak} (budget "
        f"{celery_cluster.connection_budget})"
    )
    assert set(by_worker) == set(celery_cluster.workers), by_worker
    assert all(count >= 5 for count in by_worker.values()), by_worker
    assert 0 < sampler.peak <= celery_cluster.connection_budget

    # XCom, the only thing task instances pass each other, holds small descriptors only.
    api = celery_cluster.airflow_api
    job_ref = api.get_xcom(config.JOB_DAG_ID, run_id, "create_job")
    assert job_ref["job_id"] == "scaleout-celery" and len(json.dumps(job_ref)) < 512
    batch_numbers = api.get_xcom(config.JOB_DAG_ID, run_id, "plan_batches")
    assert batch_numbers == list(range(TASKS // config.BATCH_SIZE))
    assert api.get_xcom(config.JOB_DAG_ID, run_id, "process_batch", map_index=0) is None
    summary = api.get_xcom(config.JOB_DAG_ID, run_id, "reconcile_job")
    assert task_ids[1] not in json.dumps(summary) and len(json.dumps(summary)) < 8192
