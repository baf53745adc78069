"""States and statuses of jobs and their results."""

from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    """Lifecycle of a job document: running -> reconciling -> a final state.

    A job is written `running` in the insert that creates it: there is no earlier state.
    """

    RUNNING = "running"
    RECONCILING = "reconciling"
    SUCCEEDED = "succeeded"
    PARTIALLY_FAILED = "partially_failed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_JOB_STATES


FINAL_JOB_STATES = frozenset(
    {JobState.SUCCEEDED, JobState.PARTIALLY_FAILED, JobState.FAILED, JobState.CANCELLED}
)


class JobSource(str, Enum):
    """Where a job's run came from (`jobs.source`), as the workspace's source filter names it."""

    UI = "ui"
    """The trigger form (Airflow names the run `manual__<time>`)."""
    CLI = "cli"
    """The CLI's submit command (runs named `cli__...`)."""
    API = "api"
    """A REST API client that chose its own run id."""
    SCHEDULED = "scheduled"
    """The schedule (the nightly run)."""
    BACKFILL = "backfill"
    """An Airflow backfill."""


def run_source(run_type: str, run_id: str) -> JobSource:
    """Return where a run came from, from Airflow's run type and the run id."""
    if run_type == "manual":
        if run_id.startswith("cli__"):
            return JobSource.CLI
        # The trigger form leaves the run id to Airflow (manual__<time>) unless one is typed.
        return JobSource.UI if run_id.startswith("manual__") else JobSource.API
    # Asset-triggered runs, like scheduled ones, are started by the scheduler, not a person.
    return JobSource.BACKFILL if run_type == "backfill" else JobSource.SCHEDULED


class ResultStatus(str, Enum):
    """The one terminal status every task of a job ends in."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    NEEDS_REVIEW = "needs_review"
    CANCELLED = "cancelled"


class ErrorType(str, Enum):
    """Error types the pipeline itself assigns (the LLM service's own types pass through)."""

    NOT_PROCESSED = "not_processed"
    """The task's batch gave up (retries exhausted) before the service answered for it."""
    JOB_ABORTED = "job_aborted"
    """The job stopped early (e.g. the service refused the API key) before this task was sent."""
    TASK_MISSING = "task_missing"
    """The source task document disappeared between job creation and its batch."""
    BUDGET_EXHAUSTED = "budget_exhausted"
    """The job's `max_cost_usd` was spent before this task was sent."""
    CANCELLED = "cancelled"
    """An operator cancelled the job before this task was sent."""


RESUMABLE_ERROR_TYPES = frozenset(
    {
        ErrorType.NOT_PROCESSED.value,
        ErrorType.JOB_ABORTED.value,
        ErrorType.BUDGET_EXHAUSTED.value,
        ErrorType.CANCELLED.value,
    }
)
"""Results with these error types mean "never answered": resuming the job sends them again."""

PERMANENT_ERROR_TYPES = frozenset(
    {"invalid_input", "content_filtered", "too_large", "output_too_large"}
)
"""Service-side failures of the task itself: asking again, with the same input, fails again.
The nightly backlog leaves tasks whose last result failed so."""
