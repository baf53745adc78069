"""Split a job's tasks into LLM requests and name the pieces."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llm_batch.config import BATCH_SIZE


def batch_count(task_count: int, batch_size: int = BATCH_SIZE) -> int:
    """Return how many batches `task_count` tasks make."""
    return -(-task_count // batch_size)


def batch_bounds(batch_no: int, batch_size: int = BATCH_SIZE) -> tuple[int, int]:
    """Return the [start, stop) positions of batch `batch_no` in the job's task list."""
    start = batch_no * batch_size
    return start, start + batch_size


def batch_of(position: int, batch_size: int = BATCH_SIZE) -> int:
    """Return the number of the batch holding the task at `position` in the job's task list."""
    return position // batch_size


def split_into_batches(task_ids: Sequence[Any], batch_size: int = BATCH_SIZE) -> list[list[Any]]:
    """Return the task ids in consecutive batches of at most `batch_size`."""
    return [list(task_ids[i : i + batch_size]) for i in range(0, len(task_ids), batch_size)]


def result_id(job_id: str, task_id: Any) -> str:
    """Return the `_id` of a task's result in a job: one result per (job, task)."""
    return f"{job_id}:{task_id}"


def batch_id(job_id: str, batch_no: int) -> str:
    return f"{job_id}:{batch_no:05d}"


def idempotency_base(job_id: str, batch_no: int) -> str:
    """Return the key from which the client derives each request's `Idempotency-Key`.

    Stable across Airflow retries of the batch, so a request re-sent after a worker died
    mid-call is replayed by the service instead of billed twice.
    """
    return f"{job_id}:batch:{batch_no}"
