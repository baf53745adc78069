"""The job DAG on the scale-out topology: CeleryExecutor, PostgreSQL, Redis, two workers."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pymongo
import pytest

from llm_batch import config
from tests.e2e.test_job_dag import check_job_in_mongo, seed_tasks, trigger, wait_for_run
from tests.scaleout.conftest import CeleryCluster

pytestmark = pytest.mark.e2e

TASKS = 1000


def test_a_1000_task_job_runs_on_both_celery_workers_exactly_once_within_the_pool(
    celery_cluster: CeleryCluster,
) -> None:
    db: Any = pymongo.MongoClient(celery_cluster.mongo_uri)[celery_cluster.mongo_db_name]
    sim = celery_cluster.simulator
    sim.reset()
    sim.configure(latency_ms=100, latency_jitter_ms=50, seed=5, error_5xx_rate=0.02)
    task_ids = seed_tasks(db, "celery-", TASKS)

    started = time.monotonic()
    run_id = trigger(
        celery_cluster,
        {"task_ids": task_ids, "limit": TASKS, "job_id": "scaleout-celery"},
        "scaleout-celery",
    )
    state = wait_for_run(celery_cluster, run_id, timeout_s=420)
    elapsed = time.monotonic() - started
    stats = sim.stats()

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
    # The hostname each task instance ran on, as Airflow recorded it: `<worker>@<fqdn>`.
    by_worker = Counter(str(ti["hostname"]).split("@", 1)[0] for ti in instances)
    print(f"\n1000-task job on Celery in {elapsed:.0f} s; batches per worker: {dict(by_worker)}")
    assert set(by_worker) == set(celery_cluster.workers), by_worker
    assert all(count >= 5 for count in by_worker.values()), by_worker

    # XCom, the only thing task instances pass each other, holds small descriptors only.
    api = celery_cluster.airflow_api
    job_ref = api.get_xcom(config.JOB_DAG_ID, run_id, "create_job")
    assert job_ref["job_id"] == "scaleout-celery" and len(json.dumps(job_ref)) < 512
    batch_numbers = api.get_xcom(config.JOB_DAG_ID, run_id, "plan_batches")
    assert batch_numbers == list(range(TASKS // config.BATCH_SIZE))
    assert api.get_xcom(config.JOB_DAG_ID, run_id, "process_batch", map_index=0) is None
    summary = api.get_xcom(config.JOB_DAG_ID, run_id, "reconcile_job")
    assert task_ids[1] not in json.dumps(summary) and len(json.dumps(summary)) < 8192
