"""`report` decides the run's state from the job's summary (it is the deciding teardown)."""

from __future__ import annotations

from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException

from llm_batch.orchestration.task_bodies import report

JOB = {"job_id": "job-1", "task_count": 20, "resumed": False}


def summary(state: str, **extra: Any) -> dict[str, Any]:
    counts = {"succeeded": 10, "failed": 0, "needs_review": 0, "cancelled": 10}
    return {"job_id": "job-1", "state": state, "counts": counts, "top_errors": [], **extra}


def test_a_succeeded_job_passes() -> None:
    report(summary("succeeded"), JOB)


def test_a_cancelled_job_fails_the_run_and_says_how_to_send_the_rest() -> None:
    with pytest.raises(AirflowFailException, match=r"was cancelled.*resume it with job_id=job-1"):
        report(summary("cancelled", stopped_in_airflow="failed"), JOB)


def test_a_run_an_operator_marked_success_stays_green_whatever_the_job() -> None:
    report(summary("cancelled", stopped_in_airflow="success"), JOB)


def test_a_partially_failed_job_fails_the_run_with_its_top_errors() -> None:
    failed = summary("partially_failed", top_errors=[{"type": "x", "count": 2, "example": "e"}])
    with pytest.raises(AirflowFailException, match=r"Top errors: x x2 \(e.g. e\)"):
        report(failed, JOB)


def test_no_summary_says_which_step_did_not_finish() -> None:
    with pytest.raises(AirflowFailException, match="reconcile_job did not finish for job job-1"):
        report(None, JOB)
