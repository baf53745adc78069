"""States, statuses and the validated shape of a job request."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class JobState(str, Enum):
    """Lifecycle of a job document: created -> running -> reconciling -> a final state."""

    CREATED = "created"
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


@dataclass(frozen=True)
class JobRequest:
    """What an operator asked for, checked for shape but not yet against the database."""

    task_ids: tuple[str, ...] | None
    """Explicit selection; None when selecting by `filter`."""
    filter: dict[str, Any] | None
    """A plain MongoDB query over `tasks`; None when selecting by `task_ids`."""
    limit: int
    instructions: str | None = None
    model: str | None = None
    job_id: str | None = None
    llm_params: dict[str, Any] = field(default_factory=dict)
    """Passed to the service as `params` (e.g. temperature)."""
    use_cache: bool = True
    """Answer tasks from stored answers to identical questions; false: ask the service."""
    retry_of: str | None = None
    """Re-drive: select the failed tasks of this earlier job."""
    include_needs_review: bool = False
    """With `retry_of`: also select that job's needs-review tasks."""
    review_below: float | None = None
    """Answers with a confidence below this end as `needs_review`, not `succeeded`."""
    max_cost_usd: float | None = None
    """Hard budget: once spent, nothing more is sent and the rest end `cancelled`."""
    alert_failure_rate: float = 0.30
    """Alert when more than this share of the job's tasks failed."""

    def to_document(self) -> dict[str, Any]:
        """Return the request as stored in `jobs.params`."""
        return {
            "task_ids": list(self.task_ids) if self.task_ids is not None else None,
            "filter": self.filter,
            "limit": self.limit,
            "instructions": self.instructions,
            "model": self.model,
            "llm_params": self.llm_params,
            "use_cache": self.use_cache,
            "retry_of": self.retry_of,
            "include_needs_review": self.include_needs_review,
            "review_below": self.review_below,
            "max_cost_usd": self.max_cost_usd,
            "alert_failure_rate": self.alert_failure_rate,
        }
