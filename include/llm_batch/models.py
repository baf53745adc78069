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
