"""React to what happens to a job's Airflow run outside its tasks.

Called by the listener in `plugins/llm_batch_listener.py`, inside Airflow's own processes and
database session:

- an operator marks a running job's run failed (or success) in the UI or the REST API: the
  stop is left as an XCom of `create_job`, where `reconcile_job` (a teardown, so it still runs)
  reads it and cancels the job;
- a job's run ends: its summary becomes the run's note, shown on the run's page in the UI.

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

log = logging.getLogger(__name__)

NOTE_MAX_CHARS = 1000
"""Airflow's `dag_run_note.content` is a VARCHAR(1000)."""
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
    """Set the run's note to its job's summary; False when the run has none."""
    summary = _xcom_value(session, dag_run, config.RECONCILE_TASK_ID)
    if not isinstance(summary, Mapping) or not summary.get("job_id"):
        return False
    dag_run.note = merge_note(summary_note(summary), dag_run.note)
    return True


def summary_note(summary: Mapping[str, Any]) -> str:
    """Return a job summary as a short Markdown note."""
    counts = summary.get("counts") or {}
    usage = summary.get("usage") or {}
    wall = summary.get("wall_time_s")
    lines = [
        f"{NOTE_MARKER} {summary['job_id']}: {summary.get('state')}**",
        f"- tasks: {summary.get('task_count')} ("
        + ", ".join(f"{n} {status}" for status, n in counts.items())
        + ")",
        f"- LLM requests: {summary.get('requests', 0)}; tokens: "
        f"{usage.get('input_tokens', 0)} in, {usage.get('output_tokens', 0)} out; "
        f"cost: ${float(summary.get('cost_usd') or 0):.4f}",
        f"- wall time: {wall:.1f} s" if wall is not None else "- wall time: unknown",
    ]
    if summary.get("stopped_in_airflow"):
        lines.append(f"- stopped: the run was marked {summary['stopped_in_airflow']} in Airflow")
    for error in list(summary.get("top_errors") or [])[:3]:
        lines.append(f"- error `{error['type']}` x{error['count']}: {error['example']}")
    lines.append(f"- details: `llm-batch status {summary['job_id']}`")
    return _fit("\n".join(lines), NOTE_MAX_CHARS)


def merge_note(ours: str, existing: str | None) -> str:
    """Return our note, keeping below it a note a person wrote on the run."""
    if not existing or existing.startswith(NOTE_MARKER):
        return ours
    return _fit(f"{ours}\n\n---\n{existing}", NOTE_MAX_CHARS)


def _fit(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _xcom_value(session: Any, dag_run: Any, task_id: str) -> Any:
    """Return the return value of `task_id` in `dag_run`, or None."""
    from airflow.models.xcom import XComModel

    query = XComModel.get_many(
        run_id=dag_run.run_id,
        key="return_value",
        task_ids=task_id,
        dag_ids=dag_run.dag_id,
        map_indexes=-1,
        limit=1,
    )
    row = session.scalars(query).first()
    return None if row is None else XComModel.deserialize_value(row)
