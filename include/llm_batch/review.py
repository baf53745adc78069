"""Human review of answers: approve, reject or correct a result, with an append-only history.

One code path for the workspace's review queue and `llm-batch review JOB approve|reject|correct`.
A decision is a compare-and-set on the state the reviewer saw (status and number of earlier
decisions): of two reviewers deciding the same item, the second is told who decided it and
when, and nothing is overwritten. A decision is undone only by a later decision; the history
(`review_history` on the result) is never rewritten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any

from pymongo import ReturnDocument

from llm_batch import documents
from llm_batch.batching import result_id
from llm_batch.models import FINAL_JOB_STATES, ResultStatus
from llm_batch.processing import utcnow
from llm_batch.store import JobStore

log = logging.getLogger(__name__)

REJECTED_IN_REVIEW = "rejected_in_review"
"""`error.type` of a result a reviewer rejected (re-drive selects it like any failure)."""


class Decision(str, Enum):
    """What a reviewer can decide about an answer."""

    APPROVE = "approve"
    REJECT = "reject"
    CORRECT = "correct"


DECIDED = {Decision.APPROVE: "approved", Decision.REJECT: "rejected", Decision.CORRECT: "corrected"}
"""The word stored in `review.decision` and the history for each decision."""


class ReviewError(Exception):
    """A decision that was not recorded; the message says why and what to do."""


class ReviewConflict(ReviewError):
    """Someone else decided (or changed) the result since the reviewer saw it."""

    def __init__(self, message: str, current: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.current = dict(current)


@dataclass(frozen=True)
class Seen:
    """The state of a result as the reviewer saw it: the compare half of compare-and-set."""

    status: str
    decisions: int
    """How many decisions the result's history held (0: never reviewed)."""

    @classmethod
    def of(cls, result: Mapping[str, Any]) -> Seen:
        review = result.get("review") or {}
        return cls(status=str(result["status"]), decisions=int(review.get("count", 0)))


def decide(
    store: JobStore,
    job_id: str,
    task_id: Any,
    decision: Decision,
    *,
    by: str,
    seen: Seen | None = None,
    output: Any = None,
    note: str | None = None,
    now: Callable[[], datetime] = utcnow,
) -> dict[str, Any]:
    """Record a reviewer's decision on one result and return the result as it now is.

    `seen` is what the reviewer looked at; None means "as it is now" (a fresh read), which
    still refuses a result that is neither waiting for review nor reviewed before.
    """
    if not by:
        raise ReviewError("a decision needs the reviewer's name")
    rid = result_id(job_id, task_id)
    current = store.results.find_one({"_id": rid})
    if current is None:
        raise ReviewError(f"job {job_id} has no result for task {task_id!r}: check both ids")
    seen = seen or Seen.of(current)
    if Seen.of(current) != seen:
        raise ReviewConflict(conflict_message(current), current)
    if seen.status != ResultStatus.NEEDS_REVIEW.value and not current.get("review"):
        raise ReviewError(
            f"task {task_id!r} of job {job_id} is {seen.status}, not waiting for review: only "
            "needs_review answers (or answers already reviewed, to change a decision) are decided"
        )
    at = now()
    fields = _decided_fields(decision, current, by=by, output=output, note=note)
    entry = {
        "decision": DECIDED[decision],
        "by": by,
        "at": at,
        "note": note,
        "previous": {
            "status": current["status"],
            "output": current.get("output"),
            "error": current.get("error"),
        },
    }
    review = {"decision": DECIDED[decision], "by": by, "at": at, "count": seen.decisions + 1}
    compare: dict[str, Any] = {"_id": rid, "status": seen.status}
    if seen.decisions:
        compare["review.count"] = seen.decisions
    else:
        compare["review"] = None
    updated = store.results.find_one_and_update(
        compare,
        {
            "$set": {**fields, "review": review, "updated_at": at},
            "$push": {"review_history": entry},
        },
        return_document=ReturnDocument.AFTER,
    )
    if updated is None:
        latest = store.results.find_one({"_id": rid}) or current
        raise ReviewConflict(conflict_message(latest), latest)
    _follow(store, updated)
    log.info(
        "job_id=%s task_id=%s reviewed: %s by %s (was %s)",
        job_id,
        task_id,
        DECIDED[decision],
        by,
        current["status"],
    )
    return dict(updated)


def _decided_fields(
    decision: Decision, current: Mapping[str, Any], *, by: str, output: Any, note: str | None
) -> dict[str, Any]:
    """Return the result fields a decision sets."""
    if decision is Decision.APPROVE:
        return {"status": ResultStatus.SUCCEEDED.value, "error": None}
    if decision is Decision.REJECT:
        reason = f"rejected in review by {by}" + (f": {note}" if note else "")
        return {
            "status": ResultStatus.FAILED.value,
            "error": {"type": REJECTED_IN_REVIEW, "message": reason},
        }
    if output is None:
        raise ReviewError("a correction needs the corrected output (JSON)")
    fields: dict[str, Any] = {
        "status": ResultStatus.SUCCEEDED.value,
        "error": None,
        "output": output,
    }
    if "original_output" not in current:
        # The model's own answer, kept beside the correction however often it is corrected.
        fields["original_output"] = current.get("output")
    return fields


def _follow(store: JobStore, result: Mapping[str, Any]) -> None:
    """Carry a decision to the task's `last_result` and, once the job has ended, its counts."""
    job_id = result["job_id"]
    store.tasks.update_one(
        # Only while this job's answer is the task's latest: a later job's result stands.
        {"_id": result["task_id"], "last_result.job_id": job_id},
        {"$set": {"last_result": documents.last_result(result)}},
    )
    counts = {status.value: 0 for status in ResultStatus}
    counts.update(store.count_results(job_id))
    # A running job's counts are written by reconcile_job from the results themselves.
    store.jobs.update_one(
        {"_id": job_id, "state": {"$in": [state.value for state in FINAL_JOB_STATES]}},
        {"$set": {"counts": counts, "top_errors": store.top_errors(job_id)}},
    )


def conflict_message(current: Mapping[str, Any]) -> str:
    """Say who decided the result (and when) or how it changed since the reviewer saw it."""
    review = current.get("review")
    if review:
        at = review["at"]
        when = at.strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(at, datetime) else str(at)
        return (
            f"already reviewed by {review['by']} at {when} ({review['decision']}; now "
            f"{current['status']}): nothing was changed. Reload to see it, and decide again if "
            "you disagree"
        )
    return (
        f"the result changed since you loaded it (now {current['status']}): nothing was changed; "
        "reload and decide again"
    )
