"""Close a job: give every task exactly one terminal result and total the job's figures."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from llm_batch.batching import batch_of
from llm_batch.documents import placeholder_result
from llm_batch.models import ErrorType, JobState, ResultStatus
from llm_batch.processing import utcnow
from llm_batch.store import JobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSummary:
    """The figures of a finished job, as stored on the job document and shown to people."""

    job_id: str
    state: str
    task_count: int
    counts: dict[str, int]
    requests: int
    usage: dict[str, int]
    cost_usd: float
    wall_time_s: float | None
    top_errors: list[dict[str, Any]] = field(default_factory=list)
    backlog_skipped: dict[str, int] | None = None
    """A backlog job's tasks left out, per reason (`backlog.py`); None for other jobs."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """Return a few lines a person reads at the end of a run."""
        return render_summary(self.to_dict())


def render_summary(job: Mapping[str, Any]) -> str:
    """Render a job summary (or a job document's public fields) as a few readable lines."""
    counts = ", ".join(f"{n} {status}" for status, n in (job.get("counts") or {}).items())
    usage = job.get("usage") or {}
    wall = job.get("wall_time_s")
    lines = [
        f"job {job['job_id']}: {job['state']}",
        f"  tasks     {job.get('task_count')} ({counts})",
        f"  requests  {job.get('requests', 0)} LLM requests",
        f"  tokens    {usage.get('input_tokens', 0)} in, {usage.get('output_tokens', 0)} out",
        f"  cost      ${float(job.get('cost_usd') or 0):.4f}",
        f"  wall time {wall:.1f} s" if wall is not None else "  wall time (still running)",
    ]
    if job.get("run_id"):
        lines.append(f"  run       {job.get('dag_id')} / {job['run_id']}")
    skipped = job.get("backlog_skipped") or (job.get("backlog") or {}).get("skipped")
    if skipped:
        lines.append(f"  skipped   {skipped_text(skipped)}")
    if job.get("provider_batch"):
        lines.append(f"  provider  {provider_batch_line(job['provider_batch'])}")
    lines += [
        f"  error     {e['type']} x{e['count']}: {e['example']}"
        for e in job.get("top_errors") or []
    ]
    return "\n".join(lines)


def skipped_text(skipped: Mapping[str, int]) -> str:
    """Say how many tasks the backlog left out, per reason."""
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in skipped.items())


def provider_batch_line(view: Mapping[str, Any]) -> str:
    """Say where a job's provider batches stand: status, and each batch's progress."""
    parts = []
    for batch in view.get("batches") or []:
        counts = batch.get("request_counts") or {}
        parts.append(
            f"{batch.get('id')} {batch.get('status')} "
            f"{counts.get('completed', 0)}/{counts.get('total', '?')}"
        )
    text = f"batch API {view.get('status')}"
    if parts:
        text += f" ({'; '.join(parts)})"
    if view.get("why"):
        text += f": {view['why']}"
    return text


def reconcile_job(
    store: JobStore, job_id: str, *, now: Callable[[], datetime] = utcnow
) -> JobSummary:
    """Fill in a result for every task left without one, then total and close the job."""
    job = store.get_job(job_id, with_task_ids=True)
    if job is None:
        raise LookupError(f"job {job_id!r} does not exist")
    store.update_job(job_id, {"state": JobState.RECONCILING.value})
    at = now()
    abort = job.get("abort")
    task_ids: list[Any] = job.get("task_ids") or []
    # The audit trail, not the running total, says what was spent (a write may have failed).
    spent = store.job_spend(job_id)

    # One read of the results serves both the check and `last_result` (5000 docs: ~0.3 s on
    # the embedded server); they are read again only if placeholders were added.
    projection = dict.fromkeys(("task_id", "job_id", "status", "output", "error", "updated_at"), 1)
    results = store.job_results(job_id, projection)
    answered = {doc["task_id"] for doc in results}
    unanswered = [(i, t) for i, t in enumerate(task_ids) if t not in answered]
    if unanswered:
        errors = store.batch_errors(job_id)
        placeholders = []
        for position, task_id in unanswered:
            batch_no = batch_of(position)
            status, error_type, message = _why_unanswered(
                job, batch_no, errors.get(batch_no), spent
            )
            placeholders.append(
                placeholder_result(job_id, batch_no, task_id, status, error_type, message, at)
            )
        store.save_results(placeholders)
        log.warning("job_id=%s: %d tasks had no answer; marked failed", job_id, len(unanswered))
        results = store.job_results(job_id, projection)

    store.set_last_results(results)
    if job.get("backlog"):
        store.add_auto_attempt(job_id, [r["task_id"] for r in results if _attempted_and_failed(r)])
    counts = {status.value: 0 for status in ResultStatus}
    for result in results:
        counts[result["status"]] = counts.get(result["status"], 0) + 1
    totals = store.call_totals(job_id)
    state = JobState.CANCELLED if job.get("cancel") else _final_state(counts, aborted=bool(abort))

    finished_at = now()
    timings = job.get("timings") or {}
    started_at = timings.get("started_at") or timings.get("created_at")
    wall = (finished_at - _aware(started_at)).total_seconds() if started_at else None
    summary = JobSummary(
        job_id=job_id,
        state=state.value,
        task_count=len(task_ids),
        counts=counts,
        requests=totals["requests"],
        usage=totals["usage"],
        cost_usd=totals["cost_usd"],
        wall_time_s=round(wall, 3) if wall is not None else None,
        top_errors=store.top_errors(job_id),
        backlog_skipped=(job.get("backlog") or {}).get("skipped"),
    )
    store.update_job(
        job_id,
        {
            "state": state.value,
            "counts": counts,
            "requests": summary.requests,
            "usage": summary.usage,
            "cost_usd": summary.cost_usd,
            "spent_usd": summary.cost_usd,
            "top_errors": summary.top_errors,
            "timings.finished_at": finished_at,
            "wall_time_s": summary.wall_time_s,
        },
    )
    log.info(
        "job_id=%s reconciled: state=%s counts=%s requests=%d cost_usd=%.6f",
        job_id,
        state.value,
        counts,
        summary.requests,
        summary.cost_usd,
    )
    return summary


def _attempted_and_failed(result: Mapping[str, Any]) -> bool:
    """Return whether a result counts as an attempt toward the backlog's cap."""
    error_type = (result.get("error") or {}).get("type")
    return result["status"] == ResultStatus.FAILED.value and error_type not in NEVER_SENT


NEVER_SENT = frozenset({ErrorType.JOB_ABORTED.value, ErrorType.TASK_MISSING.value})
"""Failures of tasks the service never saw: they do not count toward the backlog's cap."""


def _why_unanswered(
    job: Mapping[str, Any], batch_no: int, batch_error: Mapping[str, Any] | None, spent: float
) -> tuple[ResultStatus, str, str]:
    """Return the status, error type and message of a task the service never answered."""
    job_id = job["_id"]
    abort, cancel = job.get("abort"), job.get("cancel")
    budget = (job.get("params") or {}).get("max_cost_usd")
    if abort:
        return ResultStatus.FAILED, ErrorType.JOB_ABORTED.value, f"not sent: {abort.get('message')}"
    if cancel:
        return (
            ResultStatus.CANCELLED,
            ErrorType.CANCELLED.value,
            f"not sent: the job was cancelled by {cancel.get('by', 'an operator')}",
        )
    if budget is not None and spent >= budget:
        return (
            ResultStatus.CANCELLED,
            ErrorType.BUDGET_EXHAUSTED.value,
            f"not sent: the job's budget of ${budget:g} was spent; raise max_cost_usd and "
            f"resume (job_id={job_id}) to send these tasks",
        )
    reason = batch_error.get("message") if batch_error else "the batch task did not finish"
    return (
        ResultStatus.FAILED,
        ErrorType.NOT_PROCESSED.value,
        f"batch {batch_no} gave up: {reason}. Resume the job (trigger it again with "
        f"job_id={job_id}) to send these tasks again",
    )


def _final_state(counts: dict[str, int], *, aborted: bool) -> JobState:
    total = sum(counts.values())
    done_well = counts[ResultStatus.SUCCEEDED.value] + counts[ResultStatus.NEEDS_REVIEW.value]
    if counts[ResultStatus.CANCELLED.value] and not counts[ResultStatus.FAILED.value]:
        return JobState.CANCELLED
    if done_well == total:
        return JobState.SUCCEEDED
    if aborted or done_well == 0:
        return JobState.FAILED
    return JobState.PARTIALLY_FAILED


def _aware(value: datetime) -> datetime:
    """Mongo hands back naive UTC datetimes unless the client is tz-aware."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)
