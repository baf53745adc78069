"""Airflow plugin: a listener on job runs' state changes (see `llm_batch.orchestration.run_events`).

- A person marks a job's run failed or success (UI or REST API, in the API server): the stop
  is recorded for `reconcile_job`, which cancels what was not sent.
- A job's run ends (in the scheduler): what came of it becomes the run's note.
- Either way the run is over: its pending deadline is cleared (no alert, not "upcoming").

Loaded by every Airflow process, task processes included: nothing is imported here beyond the
plugin base; the work is imported when a run changes state.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)


class JobRunListener:
    """Airflow calls these with the run and a message saying why its state changed."""

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        self._changed(dag_run, msg, "failed")

    @hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        self._changed(dag_run, msg, "success")

    def _changed(self, dag_run: Any, msg: str, state: str) -> None:
        from sqlalchemy.orm import object_session

        from llm_batch.orchestration import run_events

        try:
            session = object_session(dag_run)
            if session is None:
                log.warning("run %s is detached from a session; no job note", dag_run.run_id)
                return
            if run_events.is_manual_change(msg):
                ours = run_events.record_operator_stop(dag_run, state, session)
            else:
                ours = run_events.write_summary_note(dag_run, session)
            if ours:
                run_events.clear_deadlines(dag_run, session)
        except Exception:
            # A listener that raises would break the API call or the scheduler loop it runs in.
            log.exception("llm_batch listener failed for run %s", dag_run.run_id)


class LLMBatchPlugin(AirflowPlugin):
    name = "llm_batch"
    listeners = [JobRunListener()]
