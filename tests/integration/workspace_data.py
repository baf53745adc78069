"""A small finished job written straight into the data contract, for the workspace's tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from llm_batch import config
from llm_batch.store import JobStore

CREATED = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)


def write_job(
    store: JobStore,
    job_id: str = "job-20300301-090000-aaaaaa",
    statuses: tuple[str, ...] = (
        "succeeded",
        "needs_review",
        "needs_review",
        "needs_review",
        "failed",
    ),
    *,
    state: str = "partially_failed",
    created: datetime = CREATED,
    model: str = "sim-small",
    triggered_by: str | None = "ana",
    source: str = "ui",
) -> dict[str, Any]:
    """Write a job with one result per status given (task ids `<job>-t0`, ...) and return it."""
    task_ids = [f"{job_id}-t{i}" for i in range(len(statuses))]
    store.tasks.insert_many(
        [{"_id": t, "payload": {"text": f"Text of {t}", "lang": "en"}} for t in task_ids]
    )
    counts = dict.fromkeys(("succeeded", "failed", "needs_review", "cancelled"), 0)
    results = []
    for i, (task_id, status) in enumerate(zip(task_ids, statuses, strict=True)):
        counts[status] += 1
        results.append(
            {
                "_id": f"{job_id}:{task_id}",
                "job_id": job_id,
                "task_id": task_id,
                "batch_no": i // config.BATCH_SIZE,
                "status": status,
                "output": {"summary": f"answer {i}"} if status != "failed" else None,
                "confidence": 0.3 + i * 0.01 if status == "needs_review" else 0.9,
                "error": {"type": "invalid_input", "message": "bad"}
                if status == "failed"
                else None,
                "model": model,
                "updated_at": created + timedelta(seconds=i),
            }
        )
    store.results.insert_many(results)
    for result in results:
        store.tasks.update_one(
            {"_id": result["task_id"]},
            {"$set": {"last_result": {"job_id": job_id, "status": result["status"]}}},
        )
    store.batches.insert_one(
        {
            "_id": f"{job_id}:0",
            "job_id": job_id,
            "batch_no": 0,
            "state": "done",
            "try_number": 2,
            "started_at": created,
            "finished_at": created + timedelta(seconds=2),
            "last_error": {"type": "timeout", "message": "read timed out"},
        }
    )
    store.llm_calls.insert_many(
        [
            {"job_id": job_id, "batch_no": 0, "latency_ms": ms, "cost_usd": 0.001, "at": created}
            for ms in (100.0, 300.0)
        ]
    )
    job = {
        "_id": job_id,
        "state": state,
        "source": source,
        "triggered_by": triggered_by,
        "task_count": len(task_ids),
        "batch_size": config.BATCH_SIZE,
        "batch_count": 1,
        "params": {
            "instructions": "Summarize.",
            "model": model,
            "review_below": 0.5,
            "max_cost_usd": 1.0,
            "task_ids": None,
            "filter": {},
        },
        "task_ids": task_ids,
        "counts": counts,
        "requests": 2,
        "usage": {"input_tokens": 100, "output_tokens": 50},
        "cost_usd": 0.002,
        "spent_usd": 0.002,
        "top_errors": [],
        "timings": {
            "created_at": created,
            "started_at": created,
            "finished_at": created + timedelta(seconds=3),
        },
        "wall_time_s": 3.0,
        "dag_id": config.JOB_DAG_ID,
        "run_id": f"manual__{created.isoformat()}",
        "runs": [f"manual__{created.isoformat()}"],
    }
    store.jobs.insert_one(job)
    return job
