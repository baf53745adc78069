"""Resume with a raised budget, and re-drive needs-review tasks, under a real scheduler."""

from __future__ import annotations

from typing import Any

import pymongo
import pytest

from tests.e2e.test_job_dag import seed_tasks, trigger, wait_for_run

pytestmark = pytest.mark.e2e


def test_a_budget_exhausted_job_resumed_with_a_raised_budget_finishes(airflow_stack: Any) -> None:
    db = pymongo.MongoClient(airflow_stack.mongo_uri, tz_aware=True)[airflow_stack.mongo_db_name]
    # More batches than pool slots: at most one request per slot passes the budget check.
    count = 10 * airflow_stack.pool_slots + 40
    ids = seed_tasks(db, "budget-", count)
    job_id = "e2e-budget-job"
    conf = {"task_ids": ids, "limit": count, "job_id": job_id}
    first = trigger(airflow_stack, {**conf, "max_cost_usd": 1e-6}, "e2e-budget-1")
    assert wait_for_run(airflow_stack, first) == "failed"
    job = db.jobs.find_one({"_id": job_id})
    assert job is not None and job["state"] == "cancelled"
    assert job["counts"]["cancelled"] >= count - 10 * airflow_stack.pool_slots
    unsent = db.results.count_documents({"job_id": job_id, "error.type": "budget_exhausted"})
    assert unsent == job["counts"]["cancelled"]

    second = trigger(airflow_stack, {**conf, "max_cost_usd": 100.0}, "e2e-budget-2")

    assert wait_for_run(airflow_stack, second) == "success"
    job = db.jobs.find_one({"_id": job_id})
    assert job is not None and job["state"] == "succeeded"
    assert job["counts"]["succeeded"] == count and job["run_id"] == second
    assert job["params"]["max_cost_usd"] == 100.0
    assert [(h["run_id"], h["changes"]) for h in job["history"]] == [
        (second, {"max_cost_usd": {"from": 1e-6, "to": 100.0}})
    ]
    assert db.results.count_documents({"job_id": job_id}) == count


def test_redriving_needs_review_tasks_gets_fresh_answers_not_cached_ones(
    airflow_stack: Any,
) -> None:
    db = pymongo.MongoClient(airflow_stack.mongo_uri)[airflow_stack.mongo_db_name]
    sim = airflow_stack.simulator
    ids = seed_tasks(db, "review-", 40)
    first = trigger(airflow_stack, {"task_ids": ids, "review_below": 0.75}, "e2e-review-1")
    assert wait_for_run(airflow_stack, first) == "success"
    job = db.jobs.find_one({"run_id": first})
    assert job is not None
    doubtful = {
        r["task_id"] for r in db.results.find({"job_id": job["_id"], "status": "needs_review"})
    }
    assert doubtful, "the simulator's confidences span 0.5..1; some must fall below 0.75"
    before = sim.stats(per_task=1)["billed_per_task"]

    second = trigger(
        airflow_stack,
        {"retry_of": job["_id"], "include_needs_review": True, "review_below": 0.75},
        "e2e-review-2",
    )

    assert wait_for_run(airflow_stack, second) == "success"
    billed = sim.stats(per_task=1)["billed_per_task"]
    assert {t for t in ids if billed.get(t, 0) > before.get(t, 0)} == doubtful
    redrive = db.jobs.find_one({"run_id": second})
    assert redrive is not None and redrive["task_count"] == len(doubtful)
    answers = list(db.results.find({"job_id": redrive["_id"]}))
    assert {a["task_id"] for a in answers} == doubtful
    assert not any(a.get("cached") for a in answers)
    assert all(a["usage"]["output_tokens"] > 0 for a in answers)
