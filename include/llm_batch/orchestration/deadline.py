"""The deadline alert's callback: Airflow's triggerer runs it when a job's run is late.

Named by path in the DAG (`dag_factory.job_deadline`), and imported by the DAG processor to
check that path: so only the standard library is imported at module level.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llm_batch.alerts import Alert
    from llm_batch.store import JobStore

log = logging.getLogger(__name__)


async def job_past_deadline(context: Mapping[str, Any] | None = None, **_: Any) -> str:
    """Alert that a job's run is past its deadline, with the job's progress so far.

    `context` is what Airflow passes: `{"dag_run": {...}, "deadline": {"deadline_time"}}`.
    Returns what was done, as text: Airflow stores it in the callback's (string) `output`.
    """
    dag_run = dict((context or {}).get("dag_run") or {})
    deadline = dict((context or {}).get("deadline") or {})
    run_id = str(dag_run.get("dag_run_id") or dag_run.get("run_id"))
    if dag_run.get("state") in ("success", "failed"):
        # Over before its deadline was checked (e.g. refused at once): nothing is late.
        log.info("run %s ended %s: no deadline alert", run_id, dag_run.get("state"))
        return f"no alert: run {run_id} has already ended ({dag_run.get('state')})"
    # The MongoDB client and the notifiers (their connection lookups too) are blocking: keep
    # them off the triggerer's loop.
    return await asyncio.to_thread(
        alert_late_run_once,
        str(dag_run.get("dag_id")),
        run_id,
        str(deadline.get("deadline_time")),
    )


def alert_late_run_once(dag_id: str, run_id: str, deadline: str) -> str:
    """Send the deadline alert for one run unless its job has ended; say what was done."""
    from llm_batch.alerts import deadline_alert
    from llm_batch.orchestration.alert_channels import notify

    try:
        from llm_batch.orchestration.task_bodies import open_store

        with open_store() as store:
            alert = late_run_alert(store, dag_id, run_id, deadline)
    except Exception as exc:
        # Late and unreadable is still late: alert with what is known.
        log.error("deadline alert for run %s: could not read the job (%s)", run_id, exc)
        alert = deadline_alert(None, run_id, deadline, {})
    if alert is None:
        return f"no alert: the job of run {run_id} has already ended"
    return "alerted: " + ", ".join(notify(alert))


def late_run_alert(store: JobStore, dag_id: str, run_id: str, deadline: str) -> Alert | None:
    """Return the alert for a late run, with its job's progress; None once the job has ended.

    A run whose job has ended is only closing (e.g. after a cancel): nothing to act on.
    """
    from llm_batch.alerts import deadline_alert
    from llm_batch.models import JobState

    job = store.job_of_run(dag_id, run_id)
    if job is not None and JobState(job["state"]).is_final:
        log.info(
            "run %s is past its deadline; its job %s ended %s", run_id, job["_id"], job["state"]
        )
        return None
    if job is None:
        return deadline_alert(None, run_id, deadline, {})
    return deadline_alert(
        job, run_id, deadline, store.count_results(job["_id"]), store.top_errors(job["_id"])
    )
