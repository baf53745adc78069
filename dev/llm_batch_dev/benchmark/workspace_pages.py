"""Benchmark the workspace pages on real volumes: 1000 jobs and 200 000 results in MongoDB.

    python -m llm_batch_dev.benchmark.workspace_pages [--jobs 1000] [--results 200000]
        [--mongo-uri URI] [--repeats 5] [--json]

Seeds the volumes into a MongoDB-wire server (its own SecantusDB on a free port unless
`--mongo-uri` is given; a fresh database either way), creates the data contract's indexes, then
times each page through the real FastAPI app (`llm_batch.workspace.app`, in-process over ASGI
with Starlette's test client; Airflow's login is replaced by a fixed user, the only part not
measured). Prints the best and the median of `--repeats` requests per page.
See docs/performance.md ("Workspace pages").
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pymongo
from pymongo.database import Database

from llm_batch import config
from llm_batch.store import JobStore
from llm_batch_dev.stack import processes

log = logging.getLogger(__name__)

TARGET_PAGE_S = 1.0
STATUS_WEIGHTS = {"succeeded": 93, "needs_review": 2, "failed": 4, "cancelled": 1}
"""Shares of results per status: about 4000 answers wait for review across the 1000 jobs."""
ERRORS = ("invalid_input", "content_filtered", "not_processed")


def seed(
    db: Database[Any], jobs: int, results: int, *, big_job: int = 5000, seed_value: int = 7
) -> dict[str, Any]:
    """Write `jobs` finished jobs holding `results` results in all, spread over 60 days.

    The newest job is a full-size one (`big_job` results, the most a job holds); the others
    share the rest evenly.
    """
    rng = random.Random(seed_value)
    store = JobStore(db)
    store.ensure_indexes()
    big_job = min(big_job, results - (jobs - 1))
    others = max(1, (results - big_job) // max(1, jobs - 1))
    total = 0
    now = datetime.now(UTC).replace(microsecond=0)
    newest_job = ""
    statuses, weights = list(STATUS_WEIGHTS), list(STATUS_WEIGHTS.values())
    for j in range(jobs):
        created = now - timedelta(days=60 * (jobs - j) / jobs, minutes=rng.randint(0, 60))
        job_id = f"job-bench-{j:05d}"
        newest_job = job_id
        per_job = big_job if j == jobs - 1 else others
        total += per_job
        task_ids = [f"bench-{j:05d}-{t:05d}" for t in range(per_job)]
        counts = dict.fromkeys(("succeeded", "failed", "needs_review", "cancelled"), 0)
        result_docs, call_docs, batch_docs = [], [], []
        for t, task_id in enumerate(task_ids):
            status = rng.choices(statuses, weights)[0]
            counts[status] += 1
            batch_no = t // config.BATCH_SIZE
            result_docs.append(
                {
                    "_id": f"{job_id}:{task_id}",
                    "job_id": job_id,
                    "task_id": task_id,
                    "batch_no": batch_no,
                    "status": status,
                    "output": {"summary": f"Answer {t} of {job_id}.", "lang": "en"}
                    if status in ("succeeded", "needs_review")
                    else None,
                    "confidence": round(
                        rng.random() * 0.5 + (0.0 if status == "needs_review" else 0.5), 3
                    ),
                    "error": {"type": rng.choice(ERRORS), "message": "the service refused it"}
                    if status == "failed"
                    else None,
                    "attempts": 1,
                    "latency_ms": 0,
                    "usage": {"input_tokens": 40, "output_tokens": 20},
                    "model": "sim-small" if j % 3 else "sim-large",
                    "updated_at": created + timedelta(seconds=batch_no),
                }
            )
        for batch_no in range(math_ceil(per_job, config.BATCH_SIZE)):
            started = created + timedelta(seconds=batch_no)
            latency = rng.lognormvariate(6.5, 0.4)
            retried = rng.random() < 0.05
            batch_docs.append(
                {
                    "_id": f"{job_id}:{batch_no}",
                    "job_id": job_id,
                    "batch_no": batch_no,
                    "state": "done",
                    "try_number": 2 if retried else 1,
                    "started_at": started,
                    "finished_at": started + timedelta(milliseconds=latency),
                    "last_error": None,
                }
            )
            call_docs.append(
                {
                    "job_id": job_id,
                    "batch_no": batch_no,
                    "try_number": 1,
                    "attempt": 1,
                    "http_status": 200,
                    "error_type": None,
                    "latency_ms": latency,
                    "usage": {"input_tokens": 400, "output_tokens": 200},
                    "cost_usd": 0.0005,
                    "model": "sim-small",
                    "at": started,
                }
            )
        db[config.TASKS].insert_many(
            [
                {"_id": t, "payload": {"text": f"Document {t}: a short text.", "lang": "en"}}
                for t in task_ids
            ]
        )
        db[config.RESULTS].insert_many(result_docs)
        db[config.BATCHES].insert_many(batch_docs)
        db[config.LLM_CALLS].insert_many(call_docs)
        finished = created + timedelta(seconds=len(batch_docs) + 5)
        db[config.JOBS].insert_one(
            {
                "_id": job_id,
                "state": "partially_failed" if counts["failed"] else "succeeded",
                "source": "scheduled" if j % 7 == 0 else ("ui" if j % 3 else "cli"),
                "triggered_by": None if j % 7 == 0 else ("admin" if j % 2 else "analyst"),
                "task_count": per_job,
                "batch_size": config.BATCH_SIZE,
                "batch_count": len(batch_docs),
                "params": {
                    "task_ids": None,
                    "filter": {},
                    "limit": per_job,
                    "instructions": "Summarize in one sentence.",
                    "model": None if j % 3 else "sim-large",
                    "review_below": 0.5,
                    "max_cost_usd": None,
                },
                "task_ids": task_ids,
                "counts": counts,
                "requests": len(call_docs),
                "usage": {
                    "input_tokens": 400 * len(call_docs),
                    "output_tokens": 200 * len(call_docs),
                },
                "cost_usd": 0.0005 * len(call_docs),
                "top_errors": [],
                "timings": {"created_at": created, "started_at": created, "finished_at": finished},
                "wall_time_s": (finished - created).total_seconds(),
                "dag_id": config.JOB_DAG_ID,
                "run_id": f"manual__{created.isoformat()}" if j % 2 else f"cli__{job_id}",
            }
        )
    return {"jobs": jobs, "results": total, "newest_job": newest_job}


def math_ceil(a: int, b: int) -> int:
    return -(-a // b)


def page_timings(db: Database[Any], newest_job: str, repeats: int) -> dict[str, dict[str, float]]:
    """Time each page through the real app, `repeats` times after one warm-up request."""
    from fastapi.testclient import TestClient

    from llm_batch.workspace.app import FixedAccess, create_app

    app = create_app(FixedAccess(JobStore(db), "bench"))
    pages = {
        "jobs page (first page, charts of 30 days)": "/jobs",
        "jobs page (filtered: state, source)": "/jobs?state=partially_failed&source=ui",
        "job detail": f"/jobs/{newest_job}",
        "review queue (oldest first)": "/review",
        "review queue (one job)": f"/review?job_id={newest_job}",
        "job progress (JSON)": f"/api/jobs/{newest_job}/progress",
    }
    figures: dict[str, dict[str, float]] = {}
    with TestClient(app) as client:
        for name, path in pages.items():
            started = time.perf_counter()
            client.get(path).raise_for_status()
            first = time.perf_counter() - started
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                response = client.get(path)
                times.append(time.perf_counter() - started)
                response.raise_for_status()
            figures[name] = {
                "first_s": first,
                "best_s": min(times),
                "median_s": statistics.median(times),
            }
    return figures


@contextmanager
def mongo_server(uri: str | None) -> Iterator[str]:
    if uri:
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="llm-batch-bench-") as tmp:
        port = processes.free_port()
        proc = processes.start_mongo_wire_server(port, Path(tmp) / "data", Path(tmp) / "mongo.log")
        try:
            yield f"mongodb://127.0.0.1:{port}"
        finally:
            proc.stop()


def render(figures: dict[str, Any]) -> str:
    lines = [
        f"workspace pages {figures['at']}: {figures['jobs']} jobs, {figures['results']} results "
        f"(seeded in {figures['seed_s']:.0f} s)",
        f"  {'page':<44} {'first':>8} {'best':>8} {'median':>8}",
    ]
    for name, t in figures["pages"].items():
        flag = "ok" if t["median_s"] < TARGET_PAGE_S else f"OVER {TARGET_PAGE_S:.0f} s"
        times = " ".join(f"{t[key]:>7.3f}s" for key in ("first_s", "best_s", "median_s"))
        lines.append(f"  {name:<44} {times}  {flag}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--results", type=int, default=200_000)
    parser.add_argument("--mongo-uri", help="a MongoDB to use (a fresh database is created)")
    parser.add_argument(
        "--database", help="with --mongo-uri: time this already seeded database (kept)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    with mongo_server(args.mongo_uri) as uri:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(uri, tz_aware=True)
        name = args.database or f"bench_workspace_{int(time.time())}"
        try:
            db = client[name]
            started = time.perf_counter()
            if args.database:
                JobStore(db).ensure_indexes()
                newest = db[config.JOBS].find_one({}, sort=[("timings.created_at", -1)]) or {}
                seeded = {
                    "results": db[config.RESULTS].estimated_document_count(),
                    "newest_job": newest.get("_id", ""),
                }
            else:
                seeded = seed(db, args.jobs, args.results)
            seed_s = time.perf_counter() - started
            log.info("seeded %d jobs, %d results in %.0f s", args.jobs, seeded["results"], seed_s)
            pages = page_timings(db, seeded["newest_job"], args.repeats)
        finally:
            if not args.database:
                client.drop_database(name)
            client.close()
    figures = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "jobs": args.jobs,
        "results": seeded["results"],
        "seed_s": seed_s,
        "pages": pages,
    }
    print(json.dumps(figures, indent=2) if args.json else render(figures))
    return 0 if all(t["median_s"] < TARGET_PAGE_S for t in pages.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
