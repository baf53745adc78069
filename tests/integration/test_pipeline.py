"""The pipeline's logic against a real MongoDB-wire server and the simulator over HTTP.

Airflow's role (running batches, retrying them) is played by a loop here; the e2e tests
run the same code under a real scheduler.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from llm_batch.batching import batch_count
from llm_batch.jobs import create_job
from llm_batch.processing import BatchIncomplete, JobAborted, process_batch
from llm_batch.reconcile import reconcile_job
from llm_batch.request import InvalidJobRequest
from llm_batch.store import JobStore
from llm_batch_dev.simulator import expected_output
from llm_hook import LLMClient
from tests.conftest import Simulator
from tests.integration.conftest import PRICE_IN, PRICE_OUT

pytestmark = pytest.mark.integration


def seed(store: JobStore, count: int, *, invalid: frozenset[int] = frozenset()) -> list[str]:
    docs = []
    for i in range(count):
        payload: dict[str, Any] = {"text": f"document {i}", "n": i}
        if i in invalid:
            payload["simulate"] = "invalid_input"
        docs.append({"_id": f"t{i:05d}", "payload": payload})
    store.tasks.insert_many(docs)
    return [doc["_id"] for doc in docs]


def run_job(
    store: JobStore, client: LLMClient, job_id: str, *, max_tries: int = 6
) -> dict[int, int]:
    """Run every batch like Airflow would: retry a batch that raised, up to `max_tries`."""
    job = store.get_job(job_id)
    assert job is not None
    tries: dict[int, int] = {}
    for batch_no in range(batch_count(job["task_count"])):
        for try_number in range(1, max_tries + 1):
            tries[batch_no] = try_number
            try:
                process_batch(store, client, job_id, batch_no, try_number=try_number)
                break
            except BatchIncomplete:
                continue
    return tries


def assert_outputs_belong_to_their_tasks(store: JobStore, job_id: str) -> None:
    payloads = {doc["_id"]: doc["payload"] for doc in store.tasks.find()}
    for result in store.results.find({"job_id": job_id, "status": "succeeded"}):
        expected = expected_output(payloads[result["task_id"]], model="sim-small")
        assert result["output"] == expected, result["task_id"]


def test_a_job_ends_with_one_matching_result_per_task_and_totals_from_llm_calls(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    ids = seed(store, 95)
    start = create_job(store, {"filter": {}}, dag_id="d", run_id="r1", source="ui")
    assert start.task_count == 95 and start.batch_count == 10

    run_job(store, make_client(sim), start.job_id)
    summary = reconcile_job(store, start.job_id)

    assert summary.state == "succeeded"
    assert summary.counts["succeeded"] == 95
    assert store.results.count_documents({"job_id": start.job_id}) == 95
    assert sorted(r["task_id"] for r in store.results.find({"job_id": start.job_id})) == ids
    assert_outputs_belong_to_their_tasks(store, start.job_id)

    calls = list(store.llm_calls.find({"job_id": start.job_id}))
    assert summary.requests == len(calls) == 10
    assert summary.usage["input_tokens"] == sum(c["usage"]["input_tokens"] for c in calls)
    expected_cost = sum(
        c["usage"]["input_tokens"] * PRICE_IN / 1000
        + c["usage"]["output_tokens"] * PRICE_OUT / 1000
        for c in calls
    )
    assert summary.cost_usd == pytest.approx(expected_cost, rel=1e-6)
    stats = sim.stats()
    assert stats["tasks_billed"] == 95
    assert summary.usage["output_tokens"] == stats["output_tokens_billed"]

    job = store.get_job(start.job_id)
    assert job is not None and job["state"] == "succeeded" and job["counts"]["succeeded"] == 95
    task = store.tasks.find_one({"_id": "t00007"})
    assert task is not None
    assert task["last_result"]["job_id"] == start.job_id
    assert task["last_result"]["status"] == "succeeded"
    assert task["last_result"]["output"] == expected_output(
        {"text": "document 7", "n": 7}, model="sim-small"
    )


def test_faults_lose_nothing_and_bill_at_most_five_percent_extra(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(
        latency_ms=0,
        seed=11,
        error_5xx_rate=0.1,
        rate_limit_rate=0.05,
        reset_rate=0.05,
        drop_id_rate=0.02,
        unknown_id_rate=0.01,
        duplicate_id_rate=0.01,
        malformed_item_rate=0.01,
        item_error_rate=0.02,
    )
    seed(store, 300)
    start = create_job(store, {"filter": {}}, dag_id="d", run_id="r1", source="ui")
    run_job(store, make_client(sim), start.job_id)
    summary = reconcile_job(store, start.job_id)

    assert summary.counts["succeeded"] == 300, summary.top_errors
    assert store.results.count_documents({"job_id": start.job_id}) == 300
    assert_outputs_belong_to_their_tasks(store, start.job_id)
    stats = sim.stats()
    assert sum(stats["faults_injected"].values()) > 0
    assert stats["tasks_billed"] <= 1.05 * 300
    assert summary.usage["output_tokens"] == stats["output_tokens_billed"]


def test_item_level_invalid_input_fails_only_that_task_with_the_reason(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    seed(store, 20, invalid=frozenset({3, 14}))
    start = create_job(store, {"filter": {}}, dag_id="d", run_id="r1", source="ui")
    run_job(store, make_client(sim), start.job_id)
    summary = reconcile_job(store, start.job_id)

    assert summary.state == "partially_failed"
    assert summary.counts == {"succeeded": 18, "failed": 2, "needs_review": 0, "cancelled": 0}
    failed = store.results.find_one({"_id": f"{start.job_id}:t00003"})
    assert failed is not None and failed["error"]["type"] == "invalid_input"
    assert failed["output"] is None
    assert summary.top_errors[0]["type"] == "invalid_input"


def test_a_rerun_batch_sends_nothing_for_tasks_that_have_results(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    seed(store, 10)
    start = create_job(store, {"filter": {}}, dag_id="d", run_id="r1", source="ui")
    client = make_client(sim)
    process_batch(store, client, start.job_id, 0)
    before = sim.stats()["requests_total"]

    report = process_batch(store, client, start.job_id, 0, try_number=2)

    assert report.sent == 0 and report.already_done == 10
    assert sim.stats()["requests_total"] == before


def test_two_workers_on_one_batch_leave_exactly_one_result_per_task(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    """A zombie and its retry running the same batch at once: the first answer wins."""
    sim = start_simulator(latency_ms=200)
    seed(store, 10)
    start = create_job(store, {"filter": {}}, dag_id="d", run_id="r1", source="ui")
    errors: list[BaseException] = []

    def work(try_number: int) -> None:
        try:
            process_batch(store, make_client(sim), start.job_id, 0, try_number=try_number)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert store.results.count_documents({"job_id": start.job_id}) == 10
    # Same task set, same idempotency key: the service processed and billed it once, and the
    # audit trail counts the replayed answer at zero cost.
    stats = sim.stats()
    assert stats["tasks_billed"] == 10 and stats["replays"] == 1
    calls = list(store.llm_calls.find({"job_id": start.job_id}))
    assert sorted(c["replayed"] for c in calls) == [False, True]
    assert sum(c["usage"]["output_tokens"] for c in calls) == stats["output_tokens_billed"]


def test_a_refused_api_key_stops_the_job_and_spends_nothing_more(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    seed(store, 30)
    start = create_job(store, {"filter": {}}, dag_id="d", run_id="r1", source="ui")
    client = make_client(sim, api_key="wrong-key")

    with pytest.raises(JobAborted, match="API key"):
        process_batch(store, client, start.job_id, 0)
    for batch_no in (1, 2):
        with pytest.raises(JobAborted):
            process_batch(store, client, start.job_id, batch_no)
    summary = reconcile_job(store, start.job_id)

    assert sim.stats()["requests_total"] == 1
    assert summary.state == "failed"
    assert summary.counts["failed"] == 30
    assert {e["type"] for e in summary.top_errors} == {"job_aborted"}
    assert "API key" in summary.top_errors[0]["example"]


def test_an_exhausted_batch_is_explained_and_resuming_sends_only_unanswered_tasks(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    seed(store, 20)
    start = create_job(store, {"filter": {}}, dag_id="d", run_id="r1", source="ui")
    client = make_client(sim, max_attempts=2)
    process_batch(store, client, start.job_id, 0)
    sim.configure(error_5xx_rate=1.0)
    with pytest.raises(BatchIncomplete, match="10 of 10 tasks got no usable answer"):
        process_batch(store, client, start.job_id, 1)
    summary = reconcile_job(store, start.job_id)
    assert summary.state == "partially_failed"
    assert summary.top_errors[0]["type"] == "not_processed"
    assert "http_5" in summary.top_errors[0]["example"]
    assert f"job_id={start.job_id}" in summary.top_errors[0]["example"]

    sim.configure(error_5xx_rate=0.0)
    sim.reset()
    resumed = create_job(
        store, {"filter": {}, "job_id": start.job_id}, dag_id="d", run_id="r2", source="ui"
    )
    assert resumed.resumed and resumed.job_id == start.job_id
    run_job(store, client, start.job_id)
    summary = reconcile_job(store, start.job_id)

    assert summary.state == "succeeded" and summary.counts["succeeded"] == 20
    billed = sim.stats(per_task=1)["billed_per_task"]
    assert sorted(billed) == [f"t{i:05d}" for i in range(10, 20)]


def test_create_job_run_again_by_the_same_run_keeps_its_job_and_resumes_it_once_closed(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    """A retried create_job, or one an operator cleared after the run ended, makes no new job."""
    seed(store, 20)
    clock = iter([datetime(2026, 12, 1, 3, 0, s, tzinfo=UTC) for s in range(0, 60, 7)])
    first = create_job(
        store, {"filter": {}}, dag_id="d", run_id="r1", source="ui", now=lambda: next(clock)
    )
    retried = create_job(
        store, {"filter": {}}, dag_id="d", run_id="r1", source="ui", now=lambda: next(clock)
    )
    assert retried.job_id == first.job_id and not retried.resumed
    assert store.jobs.count_documents({}) == 1

    sim = start_simulator(latency_ms=0)
    process_batch(store, make_client(sim), first.job_id, 0)
    assert reconcile_job(store, first.job_id).counts == {
        "succeeded": 10, "failed": 10, "needs_review": 0, "cancelled": 0,
    }  # fmt: skip
    cleared = create_job(
        store, {"filter": {}}, dag_id="d", run_id="r1", source="ui", now=lambda: next(clock)
    )
    assert cleared.job_id == first.job_id and cleared.resumed
    assert store.jobs.count_documents({}) == 1
    assert store.count_results(first.job_id) == {"succeeded": 10}
    assert create_job(store, {"filter": {}}, dag_id="d", run_id="r2", source="ui").job_id != (
        first.job_id
    )


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"task_ids": ["t00001", "nope-1", "nope-2"]}, "2 task id(s) not found"),
        ({"filter": {"payload.n": {"$gt": 10_000}}}, "matched no tasks"),
        ({"filter": {"$where": "sleep(100)"}}, "$where is not allowed"),
        ({"filter": "{not json"}, "not valid JSON"),
        ({"filter": {}, "limit": 5001}, "out of range"),
        ({"filter": {}, "limit": 0}, "out of range"),
    ],
)
def test_bad_requests_are_refused_before_any_write_or_llm_call(
    store: JobStore, conf: dict[str, Any], message: str
) -> None:
    seed(store, 5)
    with pytest.raises(InvalidJobRequest, match=re.escape(message)):
        create_job(store, conf, dag_id="d", run_id="r1", source="ui")
    assert store.jobs.count_documents({}) == 0
    assert store.results.count_documents({}) == 0


def test_ids_are_kept_in_the_order_given_and_objectid_hex_is_understood(store: JobStore) -> None:
    from bson import ObjectId

    oid = ObjectId()
    store.tasks.insert_many(
        [{"_id": "b", "payload": 1}, {"_id": "a", "payload": 2}, {"_id": oid, "payload": 3}]
    )
    start = create_job(
        store, {"task_ids": ["b", str(oid), "a"]}, dag_id="d", run_id="r", source="ui"
    )
    job = store.get_job(start.job_id, with_task_ids=True)
    assert job is not None and job["task_ids"] == ["b", oid, "a"]


def test_the_nightly_backlog_filter_takes_unsucceeded_tasks_and_counts_the_rest(
    store: JobStore,
) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "dags" / "llm_batch_nightly.py"
    spec = importlib.util.spec_from_file_location("nightly", path)
    assert spec is not None and spec.loader is not None
    nightly = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nightly)

    ids = seed(store, 30)
    store.tasks.update_many(
        {"_id": {"$in": ids[:10]}}, {"$set": {"last_result": {"status": "succeeded"}}}
    )
    store.tasks.update_many(
        {"_id": {"$in": ids[10:12]}}, {"$set": {"last_result": {"status": "failed"}}}
    )
    start = create_job(
        store,
        {"filter": nightly.BACKLOG_FILTER, "limit": 15},
        dag_id="llm_batch_nightly",
        run_id="scheduled__1",
        source="scheduled",
    )
    job = store.get_job(start.job_id, with_task_ids=True)
    assert job is not None
    assert job["task_ids"] == ids[10:25]
    assert job["selection_left_over"] == 5
    assert job["source"] == "scheduled"
