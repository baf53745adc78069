"""Operations over real Mongo-wire and HTTP: review routing, budgets, cancel, re-drive,
estimates and alerts. Airflow's part (running batches) is played by a loop, as in
test_pipeline.py; the e2e tests run the same code under a scheduler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llm_batch.alerts import failure_rate_alert
from llm_batch.estimate import estimate_job
from llm_batch.jobs import create_job
from llm_batch.processing import process_batch
from llm_batch.reconcile import reconcile_job
from llm_batch.request import default_of
from llm_batch.service import LLMService
from llm_batch.store import JobStore
from llm_hook import LLMClient
from tests.conftest import Simulator
from tests.integration.test_pipeline import run_job, seed

pytestmark = pytest.mark.integration


def service_of(client: LLMClient) -> LLMService:
    return LLMService.from_settings(client.settings)


def new_job(store: JobStore, run_id: str, **conf: Any) -> str:
    if "task_ids" not in conf and "retry_of" not in conf:
        conf["filter"] = {}
    return create_job(store, conf, dag_id="d", run_id=run_id, source="ui").job_id


def test_answers_below_the_review_threshold_end_as_needs_review_with_their_output(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    seed(store, 60)
    job_id = new_job(store, "r1", review_below=0.75)
    run_job(store, make_client(sim), job_id)
    summary = reconcile_job(store, job_id)

    results = list(store.results.find({"job_id": job_id}))
    low = [r for r in results if r["confidence"] < 0.75]
    assert low, "the simulator's confidences span 0.5..1; some must fall below 0.75"
    assert {r["status"] for r in low} == {"needs_review"}
    assert all(r["output"] is not None for r in low)
    assert {r["status"] for r in results if r["confidence"] >= 0.75} == {"succeeded"}
    assert summary.counts["needs_review"] == len(low)
    assert summary.state == "succeeded"


def test_a_budget_of_half_the_estimate_stops_sending_and_cancels_the_rest(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    ids = seed(store, 200)
    client = make_client(sim)
    calibration = new_job(store, "calibrate", task_ids=ids[:20])
    run_job(store, client, calibration)
    estimate = estimate_job(
        store, ids[20:], instructions=None, model=None, service=service_of(client)
    )
    budget = estimate.cost_usd / 2

    job_id = new_job(store, "r1", task_ids=ids[20:], max_cost_usd=budget)
    run_job(store, client, job_id)
    summary = reconcile_job(store, job_id)

    spent = sum(c["cost_usd"] for c in store.llm_calls.find({"job_id": job_id}))
    one_batch = estimate.cost_usd / estimate.requests
    # Sequential batches: at most one batch in flight when the budget is reached.
    assert budget <= spent <= budget + 1.5 * one_batch
    cancelled = list(store.results.find({"job_id": job_id, "status": "cancelled"}))
    assert cancelled and {r["error"]["type"] for r in cancelled} == {"budget_exhausted"}
    assert summary.counts["succeeded"] + len(cancelled) == 180
    assert sim.stats()["tasks_billed"] == 20 + summary.counts["succeeded"]


def test_the_estimate_is_within_ten_percent_of_the_actual_cost(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    ids = seed(store, 220)
    client = make_client(sim)
    run_job(store, client, new_job(store, "history", task_ids=ids[:20]))
    requests_before = sim.stats()["requests_total"]

    estimate = estimate_job(
        store, ids[20:], instructions=None, model=None, service=service_of(client)
    )
    assert sim.stats()["requests_total"] == requests_before, "estimating must send nothing"
    job_id = new_job(store, "real", task_ids=ids[20:])
    run_job(store, client, job_id)
    actual = reconcile_job(store, job_id).cost_usd
    assert estimate.cost_usd == pytest.approx(actual, rel=0.10)


def test_cancel_mid_job_sends_nothing_more_and_every_task_ends_once(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    from datetime import UTC, datetime

    sim = start_simulator(latency_ms=0)
    seed(store, 100)
    client = make_client(sim)
    job_id = new_job(store, "r1")
    for batch_no in range(4):
        process_batch(store, client, job_id, batch_no)
    assert store.request_cancel(job_id, datetime.now(UTC), "operator-test")
    sent_at_cancel = sim.stats()["requests_total"]
    for batch_no in range(4, 10):
        process_batch(store, client, job_id, batch_no)
    summary = reconcile_job(store, job_id)

    assert sim.stats()["requests_total"] == sent_at_cancel
    assert summary.state == "cancelled"
    assert summary.counts == {"succeeded": 40, "failed": 0, "needs_review": 0, "cancelled": 60}
    assert store.results.count_documents({"job_id": job_id}) == 100
    assert not store.request_cancel(job_id, datetime.now(UTC), "again"), "ended jobs stay ended"


def test_redrive_sends_exactly_the_failed_tasks_of_the_earlier_job(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    bad = frozenset({2, 13, 27})
    ids = seed(store, 30, invalid=bad)
    client = make_client(sim)
    first = new_job(store, "r1")
    run_job(store, client, first)
    reconcile_job(store, first)
    for i in bad:  # the operator fixes the payloads
        store.tasks.update_one({"_id": ids[i]}, {"$unset": {"payload.simulate": ""}})
    sim.reset()

    retry = create_job(store, {"retry_of": first}, dag_id="d", run_id="r2", source="ui")
    run_job(store, client, retry.job_id)
    summary = reconcile_job(store, retry.job_id)

    assert retry.task_count == 3
    assert sorted(sim.stats(per_task=1)["received_per_task"]) == sorted(ids[i] for i in bad)
    assert summary.counts["succeeded"] == 3


def finished_job_with_two_failures(store: JobStore, client: LLMClient, **conf: Any) -> str:
    seed(store, 10, invalid=frozenset({1, 4}))
    job_id = new_job(store, "r1", **conf)
    run_job(store, client, job_id)
    reconcile_job(store, job_id)
    return job_id


def test_a_redrive_asks_the_earlier_jobs_question_and_judges_its_answers_the_same_way(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    asked = {
        "instructions": "Tag it.",
        "model": "sim-large",
        "llm_params": {"temperature": 0.2},
        "review_below": 0.9,
        "alert_failure_rate": 0.5,
    }
    client = make_client(start_simulator(latency_ms=0))
    first = finished_job_with_two_failures(store, client, max_cost_usd=5.0, **asked)

    retry = create_job(store, {"retry_of": first}, dag_id="d", run_id="r2", source="ui")

    job = store.get_job(retry.job_id)
    assert job is not None and retry.task_count == 2
    assert {name: job["params"][name] for name in asked} == asked
    assert job["params"]["max_cost_usd"] is None, "a budget is the job's own"
    assert job["history"] == []


def test_a_redrive_that_asks_another_question_is_recorded_on_the_new_job(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    client = make_client(start_simulator(latency_ms=0))
    first = finished_job_with_two_failures(store, client, instructions="Tag it.", review_below=0.9)

    retry = create_job(
        store,
        {"retry_of": first, "instructions": "Summarise."},
        dag_id="d",
        run_id="r2",
        source="ui",
        triggered_by="alice",
    )

    job = store.get_job(retry.job_id)
    assert job is not None
    assert (job["params"]["instructions"], job["params"]["review_below"]) == ("Summarise.", 0.9)
    [entry] = job["history"]
    assert (entry["event"], entry["retry_of"], entry["by"]) == ("redriven", first, "alice")
    assert entry["changes"] == {"instructions": {"from": "Tag it.", "to": "Summarise."}}


def test_redrive_of_a_job_without_failures_is_refused(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    from llm_batch.request import InvalidJobRequest

    sim = start_simulator(latency_ms=0)
    seed(store, 10)
    first = new_job(store, "r1")
    run_job(store, make_client(sim), first)
    with pytest.raises(InvalidJobRequest, match="has no failed tasks to re-drive"):
        create_job(store, {"retry_of": first}, dag_id="d", run_id="r2", source="ui")


@pytest.mark.parametrize(("bad_share", "alerts"), [(0.4, True), (0.05, False)])
def test_an_alert_fires_at_forty_percent_failures_and_not_at_five(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
    bad_share: float,
    alerts: bool,
) -> None:
    sim = start_simulator(latency_ms=0)
    seed(store, 100, invalid=frozenset(range(int(100 * bad_share))))
    job_id = new_job(store, "r1")
    run_job(store, make_client(sim), job_id)
    threshold = default_of("alert_failure_rate")
    alert = failure_rate_alert(reconcile_job(store, job_id).to_dict(), threshold)
    assert (alert is not None) is alerts
    if alert is not None:
        assert "invalid_input" in alert.text and "40%" in alert.text


def test_a_late_runs_alert_gives_its_jobs_progress_and_none_once_the_job_ended(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    from llm_batch.orchestration.deadline import late_run_alert

    seed(store, 30, invalid=frozenset({3}))
    start = create_job(store, {"filter": {}}, dag_id="d", run_id="late-1", source="ui")
    process_batch(store, make_client(start_simulator(latency_ms=0)), start.job_id, 0)

    alert = late_run_alert(store, "d", "late-1", "03:00")
    assert alert is not None and alert.kind == "deadline_missed" and alert.job_id == start.job_id
    assert "10 of 30 tasks have a result (1 failed, 9 succeeded)." in alert.text
    assert "invalid_input x1" in alert.text

    not_created = late_run_alert(store, "d", "no-such-run", "03:00")
    assert not_created is not None and "create_job" in not_created.text

    reconcile_job(store, start.job_id)
    assert late_run_alert(store, "d", "late-1", "03:00") is None
