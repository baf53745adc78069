"""Pieces of the pipeline measured without Airflow: the client, reconcile, and DAG parsing.

Each takes the addresses of a running stack (simulator, MongoDB, Airflow home) and returns
figures for `run_benchmark`.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pymongo
import requests

from llm_batch import config

log = logging.getLogger(__name__)


def seed_tasks(db: Any, label: str, count: int) -> None:
    """Insert `count` task documents with `payload.run == label` (distinct texts per label)."""
    db.tasks.delete_many({"payload.run": label})
    db.tasks.insert_many(
        [
            {"_id": f"{label}-{i:06d}", "payload": {"run": label, "text": f"{label} text {i}"}}
            for i in range(count)
        ]
    )


def _client(url: str, api_key: str) -> Any:
    from llm_hook.client import LLMClient
    from llm_hook.settings import ClientSettings

    return LLMClient(ClientSettings(base_url=url, api_key=api_key, model="sim-small"))


def _tasks(label: str, batch_no: int, size: int = config.BATCH_SIZE) -> list[Any]:
    from llm_hook.types import LLMTask

    return [
        LLMTask(f"{label}-{i:06d}", {"run": label, "text": f"{label} text {i}"})
        for i in range(batch_no * size, (batch_no + 1) * size)
    ]


def reference_run(url: str, api_key: str, requests_count: int, workers: int) -> float:
    """Wall seconds for `workers` threads to send `requests_count` batch requests, no Airflow."""
    local = threading.local()
    clients: list[Any] = []
    lock = threading.Lock()

    def send(batch_no: int) -> int:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = _client(url, api_key)
            with lock:
                clients.append(client)
        outcomes = client.complete(_tasks("ref", batch_no))
        return sum(1 for o in outcomes if o.status.value == "succeeded")

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        succeeded = sum(pool.map(send, range(requests_count)))
    wall = time.monotonic() - started
    for client in clients:
        client.close()
    log.info("reference: %d tasks succeeded in %.1f s", succeeded, wall)
    return wall


def hook_overhead(url: str, api_key: str, iterations: int) -> dict[str, float]:
    """Median ms per request: LLMClient.complete vs a raw requests.post of the same body."""
    from llm_hook.adapters import BatchAdapter
    from llm_hook.wire import encode_body

    tasks = _tasks("hook", 0)
    path, body = BatchAdapter().build_request(tasks, "sim-small", None, None)
    data = encode_body(body)
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Authorization": f"Bearer {api_key}",
    }
    session = requests.Session()
    client = _client(url, api_key)
    hook_ms: list[float] = []
    raw_ms: list[float] = []
    try:
        for _ in range(10):  # warm both connections
            client.complete(tasks)
            session.post(url + path, data=data, headers=headers, timeout=30).json()
        for _ in range(iterations):
            started = time.perf_counter()
            client.complete(tasks)
            hook_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            answer = session.post(url + path, data=data, headers=headers, timeout=30)
            answer.raise_for_status()
            answer.json()
            raw_ms.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
        session.close()
    hook, raw = statistics.median(hook_ms), statistics.median(raw_ms)
    return {
        "iterations": iterations,
        "hook_median_ms": round(hook, 3),
        "raw_median_ms": round(raw, 3),
        "overhead_ms": round(hook - raw, 3),
    }


def reconcile_timing(mongo_uri: str, db_name: str, job_id: str, repeats: int = 3) -> dict[str, Any]:
    """Best-of seconds to reconcile a finished job again, and its `set_last_results` alone."""
    from llm_batch.reconcile import reconcile_job
    from llm_batch.store import JobStore

    client: pymongo.MongoClient[Any] = pymongo.MongoClient(mongo_uri)
    try:
        store = JobStore(client[db_name])
        fields = ("task_id", "job_id", "status", "output", "error", "updated_at")
        results = store.job_results(job_id, dict.fromkeys(fields, 1))
        totals, bulk = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            reconcile_job(store, job_id)
            totals.append(time.perf_counter() - started)
            started = time.perf_counter()
            store.set_last_results(results)
            bulk.append(time.perf_counter() - started)
    finally:
        client.close()
    return {
        "results": len(results),
        "reconcile_s": round(min(totals), 3),
        "set_last_results_s": round(min(bulk), 3),
    }


PARSE_SCRIPT = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
out = {}
for path in sys.argv[2:]:
    times = []
    for _ in range(int(sys.argv[1])):
        started = time.perf_counter()
        bag = DagBag(dag_folder=path, safe_mode=False)
        times.append((time.perf_counter() - started) * 1000)
        if bag.import_errors:
            raise SystemExit(f"{path}: {bag.import_errors}")
    out[path] = {"first_ms": round(times[0], 1), "best_ms": round(min(times), 1)}
print(json.dumps(out))
"""


def parse_times(files: list[Path], airflow_home: Path, repeats: int = 10) -> dict[str, Any]:
    """Milliseconds to parse each DAG file with a DagBag: the first (cold) and best of N."""
    env = {**os.environ, "AIRFLOW_HOME": str(airflow_home)}
    output = subprocess.run(
        [sys.executable, "-c", PARSE_SCRIPT, str(repeats), *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    measured = json.loads(output.strip().splitlines()[-1])
    return {Path(path).name: figures for path, figures in measured.items()}
