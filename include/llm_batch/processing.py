"""Run one batch: send its unfinished tasks to the LLM once and store every answer at once."""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from llm_batch.batching import idempotency_base, result_id
from llm_batch.cache import CachedAnswer, ResponseCache, answer_scope, cached_result_document
from llm_batch.models import ErrorType, ResultStatus
from llm_batch.store import BatchWork, Document, JobStore
from llm_hook.types import CallRecord, LLMTask, OutcomeStatus, TaskOutcome

log = logging.getLogger(__name__)


class Completer(Protocol):
    """What a batch needs from the LLM client (`llm_hook.LLMClient` satisfies it)."""

    def complete(
        self,
        tasks: Sequence[LLMTask],
        *,
        instructions: str | None = None,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
    ) -> list[TaskOutcome]: ...


class BatchIncomplete(RuntimeError):
    """Some tasks got no usable answer; retrying the batch sends only those."""


class JobAborted(RuntimeError):
    """The job was stopped (e.g. the service refused the key); retrying would not help."""


@dataclass(frozen=True)
class BatchReport:
    """What a batch did: small enough for XCom."""

    job_id: str
    batch_no: int
    tasks: int
    already_done: int
    sent: int
    succeeded: int
    failed: int
    cached: int = 0
    """Tasks answered from the response cache (counted in `succeeded`, not in `sent`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def utcnow() -> datetime:
    return datetime.now(UTC)


def process_batch(
    store: JobStore,
    completer: Completer,
    job_id: str,
    batch_no: int,
    *,
    try_number: int = 1,
    now: Callable[[], datetime] = utcnow,
    cache: ResponseCache | None = None,
) -> BatchReport:
    """Send the batch's tasks that have no result yet and store the outcomes.

    With a `cache` (and the job's `use_cache` on), tasks whose question has a stored answer
    are answered from it and not sent; fresh successes are stored for next time.

    Raises `BatchIncomplete` when some tasks are still unanswered after the client's own
    bounded retries (the orchestrator retries the batch later), and `JobAborted` when the
    job must stop. Whatever was answered is stored before either is raised.
    """
    work = store.load_batch(job_id, batch_no)
    worker = {"host": socket.gethostname(), "pid": os.getpid()}
    if work.abort:
        log.warning(
            "job_id=%s batch_no=%d skipped: job stopped (%s)",
            job_id,
            batch_no,
            work.abort.get("type"),
        )
        store.mark_batch(job_id, batch_no, {"state": "skipped", "updated_at": now()})
        raise JobAborted(f"job {job_id} was stopped: {work.abort.get('message')}")

    stop_reason = _why_not_send(work)
    if stop_reason is not None:
        log.warning("job_id=%s batch_no=%d not sent: %s", job_id, batch_no, stop_reason)
        store.mark_batch(
            job_id, batch_no, _ended("skipped", stop_reason, f"not sent: {stop_reason}", now())
        )
        return BatchReport(job_id, batch_no, len(work.task_ids), 0, 0, 0, 0)

    done = store.finished_task_ids(job_id, work.task_ids)
    todo = [task_id for task_id in work.task_ids if task_id not in done]
    report = BatchReport(job_id, batch_no, len(work.task_ids), len(done), 0, 0, 0)
    if not todo:
        log.info("job_id=%s batch_no=%d: all %d tasks already done", job_id, batch_no, len(done))
        store.mark_batch(job_id, batch_no, {"state": "done", "updated_at": now()})
        return report

    started = now()
    store.mark_batch(
        job_id,
        batch_no,
        {
            "state": "running",
            "try_number": try_number,
            "worker": worker,
            "started_at": started,
            "updated_at": started,
        },
    )
    payloads = store.task_payloads(todo)
    vanished = [task_id for task_id in todo if task_id not in payloads]
    present = [task_id for task_id in todo if task_id in payloads]
    by_wire_id = {str(task_id): task_id for task_id in present}
    scope = answer_scope(completer, work.model) if work.use_cache else None
    hits: dict[Any, CachedAnswer] = {}
    if cache is not None and scope is not None:
        hits = cache.lookup(
            scope, work.instructions, work.llm_params, {t: payloads[t] for t in present}
        )
        present = [task_id for task_id in present if task_id not in hits]

    def record_call(call: CallRecord) -> None:
        document = call_document(job_id, batch_no, try_number, call)
        if document["billed"] and not store.claim_billing(call.idempotency_key):
            # The service bills an idempotency key once; another record (the first answer,
            # or a replay that arrived first) already counts this usage.
            document.update(usage={"input_tokens": 0, "output_tokens": 0}, cost_usd=0.0)
            document["billed"] = False
        store.record_call(document)
        store.add_spend(job_id, document["cost_usd"])

    outcomes = (
        completer.complete(
            [LLMTask(str(task_id), payloads[task_id]) for task_id in present],
            instructions=work.instructions,
            model=work.model,
            params=work.llm_params or None,
            idempotency_key=idempotency_base(job_id, batch_no),
            on_call=record_call,
        )
        if present
        else []
    )

    finished_at = now()
    results = [
        result_document(
            job_id, batch_no, by_wire_id[o.task_id], o, finished_at, review_below=work.review_below
        )
        for o in outcomes
        if o.status in (OutcomeStatus.SUCCEEDED, OutcomeStatus.FAILED)
    ]
    results += [missing_task_result(job_id, batch_no, task_id, finished_at) for task_id in vanished]
    results += [cached_result_document(job_id, batch_no, t, hits[t], finished_at) for t in hits]
    store.save_results(results)
    if cache is not None and scope is not None:
        cache.store(
            scope,
            work.instructions,
            work.llm_params,
            (
                (payloads[by_wire_id[o.task_id]], CachedAnswer(o.output, o.confidence, o.model))
                for o in outcomes
                if o.status is OutcomeStatus.SUCCEEDED
            ),
        )

    statuses = Counter(o.status for o in outcomes)
    report = BatchReport(
        job_id,
        batch_no,
        len(work.task_ids),
        len(done),
        len(present),
        statuses[OutcomeStatus.SUCCEEDED] + len(hits),
        statuses[OutcomeStatus.FAILED] + len(vanished),
        len(hits),
    )
    log.info(
        "job_id=%s batch_no=%d try=%d sent=%d cached=%d succeeded=%d failed=%d retryable=%d "
        "aborted=%d",
        job_id,
        batch_no,
        try_number,
        report.sent,
        report.cached,
        report.succeeded,
        report.failed,
        statuses[OutcomeStatus.RETRYABLE],
        statuses[OutcomeStatus.ABORTED],
    )

    aborted = [o for o in outcomes if o.status is OutcomeStatus.ABORTED]
    if aborted:
        reason = aborted[0]
        message = f"{reason.error_message} (job stopped early; nothing more is sent)"
        store.abort_job(job_id, reason.error_type or "aborted", message, finished_at)
        store.mark_batch(
            job_id, batch_no, _ended("aborted", reason.error_type, message, finished_at)
        )
        raise JobAborted(f"job {job_id} stopped: {message}")

    unanswered = [o for o in outcomes if o.status is OutcomeStatus.RETRYABLE]
    if unanswered:
        kinds = Counter(o.error_type or "unknown" for o in unanswered)
        example = unanswered[0]
        message = (
            f"{len(unanswered)} of {len(present)} tasks got no usable answer "
            f"({', '.join(f'{k}: {n}' for k, n in kinds.most_common())}; e.g. "
            f"{example.error_message}); the retry sends only those tasks"
        )
        store.mark_batch(
            job_id,
            batch_no,
            _ended("incomplete", kinds.most_common(1)[0][0], message, finished_at),
        )
        raise BatchIncomplete(f"job {job_id} batch {batch_no}: {message}")

    store.mark_batch(job_id, batch_no, _ended("done", None, None, finished_at))
    return report


def _ended(state: str, error_type: str | None, message: str | None, at: datetime) -> dict[str, Any]:
    error = {"type": error_type, "message": message} if error_type else None
    return {"state": state, "last_error": error, "finished_at": at, "updated_at": at}


def _why_not_send(work: BatchWork) -> str | None:
    """Return why this batch must not send anything (cancel, spent budget), or None."""
    if work.cancel:
        return ErrorType.CANCELLED.value
    if work.budget_spent:
        return ErrorType.BUDGET_EXHAUSTED.value
    return None


def result_document(
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
    doubtful = outcome.confidence is not None and outcome.confidence < (review_below or 0.0)
    if succeeded and doubtful:
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


def placeholder_result(
    job_id: str,
    batch_no: int | None,
    task_id: Any,
    status: ResultStatus,
    error_type: str,
    message: str,
    at: datetime,
) -> Document:
    """Return a result for a task the service never answered."""
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
        "usage": {"input_tokens": 0, "output_tokens": 0},
        "model": None,
        "batch_no": batch_no,
        "updated_at": at,
    }


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
