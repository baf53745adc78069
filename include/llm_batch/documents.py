"""Build every MongoDB document of the data contract (README "Data contract"), in one place.

Field names here are a public interface read by analysts and outside tools: change them only
on purpose, together with the README.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from llm_batch.batching import result_id
from llm_batch.cache import CachedAnswer, below_review
from llm_batch.config import BATCH_SIZE
from llm_batch.models import ErrorType, JobState, ResultStatus
from llm_hook.types import CallRecord, OutcomeStatus, TaskOutcome

Document = dict[str, Any]

NO_USAGE: Mapping[str, int] = {"input_tokens": 0, "output_tokens": 0}


# jobs


def new_job(
    job_id: str,
    *,
    task_ids: list[Any],
    batch_count: int,
    params: Document,
    source: str,
    triggered_by: str | None,
    dag_id: str,
    run_id: str,
    left_over: int,
    at: datetime,
    backlog: Document | None = None,
    history: list[Document] | None = None,
) -> Document:
    """Return a new `jobs` document: running from the start, its task ids snapshot inside.

    `backlog` (`{max_attempts, skipped: {reason: n}}`) marks a backlog job (`backlog.py`).
    """
    return {
        "_id": job_id,
        "state": JobState.RUNNING.value,
        "source": source,
        # The Airflow user who triggered the run; a scheduled run has none: its source says.
        "triggered_by": triggered_by,
        "task_count": len(task_ids),
        "batch_size": BATCH_SIZE,
        "batch_count": batch_count,
        "params": params,
        "task_ids": task_ids,
        "counts": {status.value: 0 for status in ResultStatus},
        "usage": dict(NO_USAGE),
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
        "backlog": backlog,
        "history": list(history or []),
    }


Changes = Mapping[str, Mapping[str, Any]]
"""Params a request changed, as `{name: {"from", "to"}}`."""


def history_entry(
    event: str, ref: tuple[str, str], by: str | None, at: datetime, changes: Changes
) -> Document:
    """Return a `jobs.history` entry: what happened (`ref`: the run or job it names), who, when,
    and which params changed."""
    return {
        "event": event,
        ref[0]: ref[1],
        "by": by,
        "at": at,
        "changes": {name: dict(change) for name, change in changes.items()},
    }


def redriven(retry_of: str, by: str | None, at: datetime, changes: Changes) -> Document:
    """Return the `jobs.history` entry of a re-drive that asks otherwise than the earlier job."""
    return history_entry("redriven", ("retry_of", retry_of), by, at, changes)


def resumed(run_id: str, by: str | None, at: datetime, changes: Changes) -> Document:
    """Return the `jobs.history` entry of a resume: who, when, and which params changed."""
    return history_entry("resumed", ("run_id", run_id), by, at, changes)


# results


def answered_result(
    job_id: str,
    batch_no: int,
    task_id: Any,
    outcome: TaskOutcome,
    at: datetime,
    *,
    review_below: float | None = None,
) -> Document:
    """Return the `results` document for a task the service answered.

    An answer whose confidence is below `review_below` is kept but routed to review.
    """
    succeeded = outcome.status is OutcomeStatus.SUCCEEDED
    error = None if succeeded else {"type": outcome.error_type, "message": outcome.error_message}
    status = ResultStatus.SUCCEEDED if succeeded else ResultStatus.FAILED
    if succeeded and below_review(outcome.confidence, review_below):
        status = ResultStatus.NEEDS_REVIEW
    return {
        "_id": result_id(job_id, task_id),
        "job_id": job_id,
        "task_id": task_id,
        "status": status.value,
        "output": outcome.output if succeeded else None,
        "confidence": outcome.confidence,
        "error": error,
        "attempts": outcome.attempts,
        "latency_ms": outcome.latency_ms,
        "usage": {
            "input_tokens": outcome.usage.input_tokens,
            "output_tokens": outcome.usage.output_tokens,
        },
        "model": outcome.model,
        "batch_no": batch_no,
        "updated_at": at,
    }


def cached_result(
    job_id: str,
    batch_no: int,
    task_id: Any,
    answer: CachedAnswer,
    at: datetime,
    *,
    review_below: float | None = None,
) -> Document:
    """Return the `results` document of a task answered from the cache: nothing was spent.

    Routed to review like a fresh answer: below `review_below`, it ends `needs_review`.
    """
    status = ResultStatus.NEEDS_REVIEW if answer.doubtful(review_below) else ResultStatus.SUCCEEDED
    return {
        "_id": result_id(job_id, task_id),
        "job_id": job_id,
        "task_id": task_id,
        "status": status.value,
        "output": answer.output,
        "confidence": answer.confidence,
        "error": None,
        "attempts": 0,
        "latency_ms": 0,
        "usage": dict(NO_USAGE),
        "model": answer.model,
        "batch_no": batch_no,
        "cached": True,
        "updated_at": at,
    }


def placeholder_result(
    job_id: str,
    batch_no: int | None,
    task_id: Any,
    status: ResultStatus,
    error_type: str,
    message: str,
    at: datetime,
) -> Document:
    """Return the `results` document of a task the service never answered."""
    return {
        "_id": result_id(job_id, task_id),
        "job_id": job_id,
        "task_id": task_id,
        "status": status.value,
        "output": None,
        "confidence": None,
        "error": {"type": error_type, "message": message},
        "attempts": 0,
        "latency_ms": None,
        "usage": dict(NO_USAGE),
        "model": None,
        "batch_no": batch_no,
        "updated_at": at,
    }


def missing_task_result(job_id: str, batch_no: int, task_id: Any, at: datetime) -> Document:
    """Return the failed result of a task whose source document was deleted mid-job."""
    return placeholder_result(
        job_id,
        batch_no,
        task_id,
        ResultStatus.FAILED,
        ErrorType.TASK_MISSING.value,
        "the task document was deleted after the job was created; recreate it and submit "
        "a new job to process it",
        at,
    )


def last_result(result: Mapping[str, Any]) -> Document:
    """Return the `tasks.last_result` a result leaves on its source task."""
    return {
        "job_id": result["job_id"],
        "status": result["status"],
        "output": result.get("output"),
        "error": result.get("error"),
        "finished_at": result["updated_at"],
    }


# llm_calls


def call_document(job_id: str, batch_no: int, try_number: int, call: CallRecord) -> Document:
    """Return the `llm_calls` audit record of one HTTP attempt."""
    return {
        "job_id": job_id,
        "batch_no": batch_no,
        "try_number": try_number,
        "attempt": call.attempt,
        "endpoint": call.endpoint,
        "http_status": call.http_status,
        "error_type": call.error_type,
        "latency_ms": call.latency_ms,
        "usage": {
            "input_tokens": call.usage.input_tokens,
            "output_tokens": call.usage.output_tokens,
        },
        "cost_usd": call.cost_usd,
        "model": call.model,
        "task_ids": list(call.task_ids),
        "idempotency_key": call.idempotency_key,
        "replayed": call.replayed,
        "billed": call.http_status == 200 and call.error_type is None,
        "at": call.at,
    }


def billed_call_id(idempotency_key: str) -> str:
    """Return the `_id` of the one `llm_calls` record that counts an idempotency key's usage."""
    return f"billed:{idempotency_key}"


def unbilled(call: Document) -> Document:
    """Return an `llm_calls` record whose usage another record already counts."""
    return {**call, "usage": dict(NO_USAGE), "cost_usd": 0.0, "billed": False}


# batches (progress fields; `store.mark_batch` adds `job_id` and `batch_no`)


def batch_state(state: str, at: datetime) -> Document:
    """Return a batch's new state with nothing else to say."""
    return {"state": state, "updated_at": at}


def batch_running(try_number: int, worker: Mapping[str, Any], at: datetime) -> Document:
    """Return the progress fields of a batch that starts sending."""
    return {
        "state": "running",
        "try_number": try_number,
        "worker": dict(worker),
        "started_at": at,
        "updated_at": at,
    }


def batch_ended(state: str, error_type: str | None, message: str | None, at: datetime) -> Document:
    """Return the progress fields of a batch that ended, with its error if it has one."""
    error = {"type": error_type, "message": message} if error_type else None
    return {"state": state, "last_error": error, "finished_at": at, "updated_at": at}
