"""Alerts that lead to an action: fire only when someone must do something, and say what.

This module writes them; `llm_batch.orchestration.alert_channels.notify` delivers them (the
log, and e-mail or Slack through Airflow's notifiers on Airflow connections).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llm_batch import config
from llm_batch.quoting import ALERT_QUOTE_CHARS, quote_untrusted

REDRIVE = "`llm-batch submit --retry-of {job_id}`"
RESUME = "`llm-batch submit --all --job-id {job_id} --wait`"
NEXT_STEPS = {
    "invalid_input": "fix the payloads of the failed tasks, then re-drive them: " + REDRIVE,
    "content_filtered": "the provider's content filter blocked these inputs; review them "
    "(re-driving them unchanged will fail again)",
    "not_processed": "the LLM service kept failing (see llm_calls for status codes); when it is "
    "healthy, resume the job: " + RESUME,
    "job_aborted": "the service refused the connection llm_default (API key, model or URL): "
    "fix it, then resume: " + RESUME,
    "too_large": "these inputs exceed the service's request size: shorten them, then re-drive "
    "them: " + REDRIVE,
    "task_missing": "task documents were deleted while the job ran: recreate them if needed",
}
DEFAULT_NEXT_STEP = "inspect results with error.type {error_type!r} and re-drive: " + REDRIVE


@dataclass(frozen=True)
class Alert:
    """What went wrong with a job, and what to do next."""

    job_id: str
    kind: str
    """`failure_rate` or `deadline_missed`."""
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def failure_rate_alert(summary: Mapping[str, Any], threshold: float) -> Alert | None:
    """Return an alert if more than `threshold` of the job's tasks failed, else None."""
    total = int(summary.get("task_count") or 0)
    failed = int((summary.get("counts") or {}).get("failed", 0))
    if total == 0 or failed / total <= threshold:
        return None
    job_id = summary["job_id"]
    top = list(summary.get("top_errors") or [])
    lines = [
        f"LLM batch job {job_id}: {failed / total:.0%} of {total} tasks failed "
        f"(threshold {threshold:.0%}); counts {dict(summary.get('counts') or {})}.",
    ]
    lines += [_error_line(error) for error in top[:3]]
    if top:
        main = top[0]["type"]
        step = NEXT_STEPS.get(main, DEFAULT_NEXT_STEP)
        lines.append("Next: " + step.format(job_id=job_id, error_type=main))
    return Alert(job_id, "failure_rate", "\n".join(lines))


def deadline_alert(
    job: Mapping[str, Any] | None,
    run_id: str,
    deadline: str,
    progress: Mapping[str, int],
    top_errors: Sequence[Mapping[str, Any]] = (),
) -> Alert:
    """Return the alert for a run still going past its deadline, with the job's progress."""
    if job is None:
        return Alert(
            run_id,
            "deadline_missed",
            f"LLM batch run {run_id} is still running past its deadline of {deadline}, and no "
            "job was created for it yet. Next: look at the run's create_job task in the Airflow "
            "UI (it may be waiting for a worker or retrying a MongoDB error).",
        )
    job_id = job["_id"]
    total = int(job.get("task_count") or 0)
    answered = sum(progress.values())
    lines = [
        f"LLM batch job {job_id} (run {run_id}) is still running past its deadline of "
        f"{deadline}: {answered} of {total} tasks have a result"
        + (
            f" ({', '.join(f'{n} {s}' for s, n in sorted(progress.items()))})." if answered else "."
        ),
    ]
    lines += [_error_line(error) for error in top_errors[:3]]
    lines.append(
        f"Next: `llm-batch status {job_id}` shows progress; if batches wait in the pool "
        f"{config.POOL_NAME}, add slots or let it finish; if it should not finish, "
        f"`llm-batch cancel {job_id}` (or mark the run failed) stops it, and resuming it later "
        f"with job_id={job_id} sends only what is left."
    )
    return Alert(job_id, "deadline_missed", "\n".join(lines))


def _error_line(error: Mapping[str, Any]) -> str:
    """Return one error of a job for an alert: the provider's words one line, capped, escaped."""
    example = quote_untrusted(error["example"], ALERT_QUOTE_CHARS, markdown=False)
    return f"- {error['type']} x{error['count']}, e.g. {example}"
