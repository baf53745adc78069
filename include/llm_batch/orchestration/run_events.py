"""React to what happens to a job's Airflow run outside its tasks.

Called by the listener in `plugins/llm_batch_listener.py`, inside Airflow's own processes and
database session:

- an operator marks a running job's run failed (or success) in the UI or the REST API: the
  stop is left as an XCom of `create_job`, where `reconcile_job` (a teardown, so it still runs)
  reads it and cancels the job;
- a job's run ends: what came of it (the job's outcome, a dry run's estimate, or why the
  request was refused) becomes the run's note, shown on the run's page in the UI, and the
  run's pending deadline is cleared.

Runs of other DAGs are left alone: a run is a job's when `create_job` returned a job id.
Only the metadata DB is touched here, never MongoDB, so the API server and the scheduler need
no MongoDB connection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from llm_batch import config
from llm_batch.models import RESUMABLE_ERROR_TYPES
from llm_batch.quoting import cap, quote_untrusted

log = logging.getLogger(__name__)

NOTE_MAX_CHARS = 1000
"""Airflow's `dag_run_note.content` is a VARCHAR(1000)."""
NOTE_QUOTE_CHARS = 160
"""Longest error example a note quotes: three of them must fit the note."""
NOTE_MARKER = "**LLM batch job"
"""How our notes start: a note that starts otherwise is a person's, and is kept."""


def is_manual_change(msg: str) -> bool:
    """Return whether a listener's `msg` says a person set the run's state."""
    return "manually set" in msg


def record_operator_stop(dag_run: Any, state: str, session: Any) -> bool:
    """Leave `{"state", "at"}` for `reconcile_job`; False when the run is not a job's."""
    from airflow.models.xcom import XComModel

    job = _xcom_value(session, dag_run, config.CREATE_JOB_TASK_ID)
    if not isinstance(job, Mapping) or not job.get("job_id"):
        return False
    XComModel.set(
        config.STOPPED_XCOM_KEY,
        {"state": state, "at": datetime.now(UTC).isoformat()},
        dag_id=dag_run.dag_id,
        task_id=config.CREATE_JOB_TASK_ID,
        run_id=dag_run.run_id,
        # Stored as JSON, as the tasks' own XComs are: xcom_pull hands back the dict.
        serialize=False,
        session=session,
    )
    log.warning(
        "job_id=%s: run %s was marked %s by an operator; reconcile_job cancels what was not sent",
        job["job_id"],
        dag_run.run_id,
        state,
    )
    return True


def write_summary_note(dag_run: Any, session: Any) -> bool:
    """Set the run's note to what came of it; False when the run is not a job's.

    The outcome comes from `reconcile_job` (a job ran), else `create_job` (a dry run's
    estimate, or why the request was refused).
    """
    summary = _xcom_value(session, dag_run, config.RECONCILE_JOB_TASK_ID)
    if isinstance(summary, Mapping) and summary.get("job_id"):
        note = summary_note(summary)
    else:
        task_id = config.CREATE_JOB_TASK_ID
        created = _xcom_value(session, dag_run, task_id)
        refused = _xcom_value(session, dag_run, task_id, config.REJECTION_XCOM_KEY)
        if isinstance(created, Mapping) and created.get("dry_run"):
            note = dry_run_note(created.get("estimate") or {})
        elif refused:
            note = refused_note([str(problem) for problem in refused])
        else:
            return False
    dag_run.note = merge_note(note, dag_run.note)
    return True


def clear_deadlines(dag_run: Any, session: Any) -> int:
    """Drop the deadlines of an ended run that were not missed; return how many.

    Airflow prunes them when a run succeeds, not when it fails: a failed run's deadline stayed
    "upcoming" in the UI and fired a `deadline_missed` alert for a run long over.
    """
    from airflow.models.deadline import Deadline
    from sqlalchemy import select

    pending = session.scalars(
        select(Deadline).where(Deadline.dagrun_id == dag_run.id, ~Deadline.missed)
    ).all()
    for deadline in pending:
        session.delete(deadline)
    return len(pending)


def summary_note(summary: Mapping[str, Any]) -> str:
    """Return a job summary as a short Markdown note whose first line says how it ended."""
    job_id = summary["job_id"]
    counts = summary.get("counts") or {}
    usage = summary.get("usage") or {}
    wall = summary.get("wall_time_s")
    errors = list(summary.get("top_errors") or [])
    lines = [
        f"{NOTE_MARKER} {job_id}: {outcome_line(summary)}**",
        f"- tasks: {summary.get('task_count')} ("
        + ", ".join(f"{n} {status}" for status, n in counts.items())
        + ")",
        f"- LLM requests: {summary.get('requests', 0)}; tokens: "
        f"{usage.get('input_tokens', 0)} in, {usage.get('output_tokens', 0)} out; "
        f"cost: ${float(summary.get('cost_usd') or 0):.4f}",
        f"- wall time: {wall:.1f} s" if wall is not None else "- wall time: unknown",
    ]
    if summary.get("backlog_skipped"):
        from llm_batch.reconcile import skipped_text

        lines.append(f"- backlog tasks not sent again: {skipped_text(summary['backlog_skipped'])}")
    if summary.get("provider_batch"):
        from llm_batch.reconcile import provider_batch_line

        lines.append(f"- provider: {provider_batch_line(summary['provider_batch'])}")
    if summary.get("stopped_in_airflow"):
        lines.append(f"- stopped: the run was marked {summary['stopped_in_airflow']} in Airflow")
    review = counts.get("needs_review") or 0
    if review:
        lines.append(
            f"- review: `llm-batch review {job_id}` lists the {review} answers (results with "
            f'`{{"job_id": "{job_id}", "status": "needs_review"}}`)'
        )
    if _unsent(summary):
        lines.append(f"- resume: trigger with Resume job = {job_id} (only unsent tasks are sent)")
    elif counts.get("failed"):
        lines.append(f"- re-drive: trigger with Re-drive = {job_id} (its failed tasks, a new job)")
    for error in errors[:3]:
        example = quote_untrusted(error["example"], NOTE_QUOTE_CHARS)  # the provider's words
        lines.append(f"- error `{error['type']}` x{error['count']}: {example}")
    lines.append(f"- details: `llm-batch status {job_id}`")
    return cap("\n".join(lines), NOTE_MAX_CHARS)


def outcome_line(summary: Mapping[str, Any]) -> str:
    """Return how the job ended and its key figure, for the note's first line."""
    counts = summary.get("counts") or {}
    total = summary.get("task_count") or sum(counts.values())
    state = summary.get("state")
    failed, review = counts.get("failed") or 0, counts.get("needs_review") or 0
    cancelled = counts.get("cancelled") or 0
    cost = f"${float(summary.get('cost_usd') or 0):.4f}"
    budget_hit = any(e.get("type") == "budget_exhausted" for e in summary.get("top_errors") or [])
    if state == "cancelled" and budget_hit:
        budget = summary.get("budget_usd")
        of_budget = f" of {_usd(float(budget))}" if budget is not None else ""
        return f"budget exhausted, {cost}{of_budget} spent; {cancelled} of {total} tasks not sent"
    if state == "cancelled":
        return f"cancelled, {cancelled} of {total} tasks not sent"
    if state == "succeeded" and review:
        return f"needs review, {review} of {total} answers below the confidence threshold"
    if state == "succeeded":
        return f"succeeded, {total} of {total} answered, {cost}"
    if state == "partially_failed":
        return f"partially failed, {failed} of {total} tasks failed"
    if state == "failed":
        return f"failed, {failed} of {total} tasks failed"
    return str(state)


def dry_run_note(estimate: Mapping[str, Any]) -> str:
    """Return a dry run's estimate as the run's note."""
    lines = [
        f"{NOTE_MARKER} dry run: {estimate.get('task_count')} tasks, about "
        f"${float(estimate.get('cost_usd') or 0):.4f}; nothing was sent**",
        f"- {estimate.get('requests')} LLM requests, about {estimate.get('input_tokens')} input "
        f"+ {estimate.get('output_tokens')} output tokens",
        f"- basis: {estimate.get('basis')}",
        "- to run it: trigger again with Dry run off",
    ]
    return cap("\n".join(lines), NOTE_MAX_CHARS)


def refused_note(problems: list[str]) -> str:
    """Return why the request was refused as the run's note, the first reason on line one."""
    first = problems[0] if problems else "see create_job's log"
    lines = [f"{NOTE_MARKER} refused, nothing was sent: {first}**"]
    lines += [f"- also: {problem}" for problem in problems[1:]]
    lines.append("- no job was created: fix the form (Trigger again) and run it again")
    return cap("\n".join(lines), NOTE_MAX_CHARS)


def _usd(amount: float) -> str:
    """Return a budget as dollars, cents-exact, or to the micro-dollar when below a cent."""
    return f"${amount:.2f}" if amount >= 0.01 else f"${amount:.6f}".rstrip("0").rstrip(".")


def _unsent(summary: Mapping[str, Any]) -> bool:
    """Return whether the job has tasks a resume would send again."""
    return any(e.get("type") in RESUMABLE_ERROR_TYPES for e in summary.get("top_errors") or [])


def merge_note(ours: str, existing: str | None) -> str:
    """Return our note, keeping below it a note a person wrote on the run."""
    if not existing or existing.startswith(NOTE_MARKER):
        return ours
    return cap(f"{ours}\n\n---\n{existing}", NOTE_MAX_CHARS)


def _xcom_value(
    session: Any, dag_run: Any, task_id: str, key: str = config.RETURN_VALUE_XCOM_KEY
) -> Any:
    """Return the XCom `key` (default: the return value) of `task_id` in `dag_run`, or None."""
    from airflow.models.xcom import XComModel

    query = XComModel.get_many(
        run_id=dag_run.run_id,
        key=key,
        task_ids=task_id,
        dag_ids=dag_run.dag_id,
        map_indexes=-1,
        limit=1,
    )
    row = session.scalars(query).first()
    return None if row is None else XComModel.deserialize_value(row)
