"""What a resume may change, and when Airflow says an earlier run has ended: no database."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from llm_batch.cache import CachedAnswer
from llm_batch.documents import cached_result
from llm_batch.jobs import resume_changes
from llm_batch.orchestration.task_bodies import run_still_active
from llm_batch.request import InvalidJobRequest, parse_job_request

JOB = {
    "_id": "job-1",
    "task_count": 30,
    "params": parse_job_request(
        {"filter": {"payload.lang": "en"}, "instructions": "Summarise.", "max_cost_usd": 2.0}
    ).to_document(),
}


def changes(**conf: Any) -> dict[str, Any]:
    return resume_changes(JOB, parse_job_request({"job_id": "job-1", **conf}))


def test_a_resume_with_the_forms_defaults_or_all_tasks_changes_nothing() -> None:
    assert changes(filter={}) == {}
    assert changes(filter={"payload.lang": "en"}, instructions="Summarise.", limit=5000) == {}


def test_a_resume_may_raise_the_budget_and_set_review_and_alerting() -> None:
    assert changes(filter={}, max_cost_usd=5.0, review_below=0.7, alert_failure_rate=0.5) == {
        "max_cost_usd": {"from": 2.0, "to": 5.0},
        "review_below": {"from": None, "to": 0.7},
        "alert_failure_rate": {"from": 0.3, "to": 0.5},
    }


def test_a_resume_names_every_field_it_refuses_to_change() -> None:
    with pytest.raises(InvalidJobRequest) as refused:
        changes(filter={"payload.lang": "de"}, instructions="Translate.", model="sim-large")
    problems = refused.value.problems
    assert [p.split(" cannot")[0] for p in problems] == ["instructions", "model", "the selection"]
    assert "filter" in problems[-1] and "submit a new job" in problems[-1]


def test_a_resume_from_the_form_with_its_own_limit_is_not_refused() -> None:
    """The llm_batch_job form always sends its limit (100); the job's tasks are a snapshot."""
    assert changes(filter={}, limit=100) == {}


def test_a_resume_may_change_how_an_expired_provider_batchs_rest_is_sent() -> None:
    assert changes(filter={}, resend_via="sync") == {
        "resend_via": {"from": "provider_batch", "to": "sync"}
    }


def test_a_resume_refuses_another_delivery_instead_of_ignoring_it() -> None:
    with pytest.raises(InvalidJobRequest, match="delivery cannot change when resuming"):
        changes(filter={}, delivery="provider_batch")


class FakeTaskInstance:
    def __init__(self, count: int, state: str | Exception) -> None:
        self.count, self.state = count, state

    def get_dr_count(self, dag_id: str, run_ids: list[str]) -> int:
        return self.count

    def get_dagrun_state(self, dag_id: str, run_id: str) -> str:
        if isinstance(self.state, Exception):
            raise self.state
        return self.state


@pytest.mark.parametrize(
    ("count", "state", "active"),
    [
        (1, "running", True),
        (1, "queued", True),
        (1, "success", False),
        (1, "failed", False),
        (0, "running", False),
        (1, RuntimeError("API server unreachable"), True),
    ],
)
def test_an_earlier_run_counts_as_ended_only_when_airflow_says_so(
    count: int, state: str | Exception, active: bool
) -> None:
    assert run_still_active(FakeTaskInstance(count, state), "d", "r1") is active


@pytest.mark.parametrize(
    ("confidence", "flagged", "review_below", "status"),
    [
        (0.6, False, 0.75, "needs_review"),
        (0.9, False, 0.75, "succeeded"),
        (0.6, False, None, "succeeded"),
        (0.9, True, None, "needs_review"),
    ],
)
def test_a_cached_answer_is_routed_to_review_like_a_fresh_one(
    confidence: float, flagged: bool, review_below: float | None, status: str
) -> None:
    answer = CachedAnswer({"a": 1}, confidence, "sim-small", needs_review=flagged)
    result = cached_result("job-1", 0, "t1", answer, datetime.now(UTC), review_below=review_below)
    assert result["status"] == status and result["cached"] is True
