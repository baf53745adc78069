"""Create a job from an operator's request, or resume an existing one."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from llm_batch.batching import batch_count
from llm_batch.config import BATCH_SIZE
from llm_batch.estimate import CostEstimate, Prices, estimate_job
from llm_batch.models import RESUMABLE_ERROR_TYPES, JobRequest, JobState, ResultStatus
from llm_batch.processing import utcnow
from llm_batch.selection import InvalidJobRequest, parse_job_request, resolve_selection
from llm_batch.store import JobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobStart:
    """Which job a run works on and how many batches it has."""

    job_id: str
    task_count: int
    batch_count: int
    resumed: bool


def new_job_id(dag_id: str, run_id: str, at: datetime) -> str:
    """Return a readable job id: when it was made, and a digest of the run that made it."""
    digest = hashlib.sha256(f"{dag_id}\0{run_id}".encode()).hexdigest()[:8]
    return f"job-{at:%Y%m%d-%H%M%S}-{digest}"


def start_job(
    store: JobStore,
    conf: Mapping[str, Any],
    *,
    dag_id: str,
    run_id: str,
    source: str,
    triggered_by: str | None = None,
    now: Callable[[], datetime] = utcnow,
) -> JobStart:
    """Validate the request and write the job in one insert, or resume the job it names.

    Raises `InvalidJobRequest` (nothing written) when the request can't run as given.
    """
    request = parse_job_request(conf)
    at = now()
    existing = (
        store.get_job(request.job_id)
        if request.job_id is not None
        else store.job_of_run(dag_id, run_id)
    )
    if existing is not None:
        if request.job_id is None and not JobState(existing["state"]).is_final:
            # This run created it on an earlier try (e.g. the task died right after the insert).
            return JobStart(existing["_id"], existing["task_count"], existing["batch_count"], False)
        # A job named to resume, or this run's own job again after an operator cleared the run.
        return _resume(store, existing, run_id=run_id, at=at, triggered_by=triggered_by)

    task_ids = (
        redrive_selection(store, request)
        if request.retry_of is not None
        else resolve_selection(store.tasks, request)
    )
    # A filter may match more than one job takes (the nightly backlog): say what is left.
    left_over = (
        store.tasks.count_documents(request.filter) - len(task_ids)
        if request.filter is not None
        else 0
    )
    job_id = request.job_id or new_job_id(dag_id, run_id, at)

    batches = batch_count(len(task_ids))
    store.insert_job(
        {
            "_id": job_id,
            "state": JobState.RUNNING.value,
            "source": source,
            # The Airflow user who triggered the run; a scheduled run has none: its source says.
            "triggered_by": triggered_by,
            "task_count": len(task_ids),
            "batch_size": BATCH_SIZE,
            "batch_count": batches,
            "params": request.to_document(),
            "task_ids": task_ids,
            "counts": {status.value: 0 for status in ResultStatus},
            "usage": {"input_tokens": 0, "output_tokens": 0},
            "cost_usd": 0.0,
            "requests": 0,
            "abort": None,
            "cancel": None,
            "spent_usd": 0.0,
            "timings": {"created_at": at, "started_at": at, "finished_at": None},
            "dag_id": dag_id,
            "run_id": run_id,
            "runs": [run_id],
            "selection_left_over": left_over,
        }
    )
    log.info(
        "job_id=%s created: tasks=%d batches=%d source=%s run_id=%s; %d more tasks match the "
        "selection and are left for a later job",
        job_id,
        len(task_ids),
        batches,
        source,
        run_id,
        left_over,
    )
    return JobStart(job_id, len(task_ids), batches, False)


def estimate_request(store: JobStore, conf: Mapping[str, Any], prices: Prices) -> CostEstimate:
    """Validate and resolve the request like `start_job`, and estimate it; write nothing."""
    request = parse_job_request(conf)
    task_ids = (
        redrive_selection(store, request)
        if request.retry_of is not None
        else resolve_selection(store.tasks, request)
    )
    return estimate_job(
        store, task_ids, instructions=request.instructions, model=request.model, prices=prices
    )


def redrive_selection(store: JobStore, request: JobRequest) -> list[Any]:
    """Return the failed (and, if asked, needs-review) tasks of `request.retry_of`, in its order."""
    assert request.retry_of is not None
    earlier = store.get_job(request.retry_of, with_task_ids=True)
    if earlier is None:
        raise InvalidJobRequest(
            [f"retry_of: there is no job {request.retry_of!r}; check the id (llm-batch history)"]
        )
    statuses = [ResultStatus.FAILED.value]
    if request.include_needs_review:
        statuses.append(ResultStatus.NEEDS_REVIEW.value)
    chosen = {
        doc["task_id"]
        for doc in store.results.find(
            {"job_id": request.retry_of, "status": {"$in": statuses}}, {"task_id": 1}
        )
    }
    task_ids = [t for t in earlier["task_ids"] if t in chosen][: request.limit]
    if not task_ids:
        raise InvalidJobRequest(
            [f"job {request.retry_of} has no {' or '.join(statuses)} tasks to re-drive"]
        )
    return task_ids


def _resume(
    store: JobStore,
    job: dict[str, Any],
    *,
    run_id: str,
    at: datetime,
    triggered_by: str | None = None,
) -> JobStart:
    """Reopen a job: tasks that were never answered become sendable again, answers stay."""
    job_id = job["_id"]
    cleared = store.delete_results(job_id, {"error.type": {"$in": sorted(RESUMABLE_ERROR_TYPES)}})
    store.reopen_job(job_id, run_id, at, triggered_by)
    log.info(
        "job_id=%s resumed by run_id=%s: %d unanswered tasks reopened", job_id, run_id, cleared
    )
    return JobStart(job_id, job["task_count"], job["batch_count"], True)
