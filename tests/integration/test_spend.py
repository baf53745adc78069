"""What a job spends, against a real MongoDB-wire server and the simulator over HTTP.

Each billed request's cost is counted exactly once, whatever write fails on the way, and a
budget is checked before every request: once spent, at most the requests already in flight
(one per pool slot) add to it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
from pymongo.database import Database
from pymongo.errors import AutoReconnect

from llm_batch.batching import batch_count
from llm_batch.jobs import create_job
from llm_batch.processing import BatchIncomplete, process_batch
from llm_batch.reconcile import reconcile_job
from llm_batch.store import JobStore
from llm_hook import LLMClient
from tests.conftest import Simulator
from tests.integration.conftest import PRICE_IN, PRICE_OUT
from tests.integration.test_pipeline import run_job, seed

pytestmark = pytest.mark.integration


def billed_by_service(sim: Simulator) -> float:
    """Return what the simulator billed, priced as the clients price it."""
    stats = sim.stats()
    return (
        stats["input_tokens_billed"] * PRICE_IN + stats["output_tokens_billed"] * PRICE_OUT
    ) / 1000


def recorded(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    return list(store.llm_calls.find({"job_id": job_id}))


class FaultyStore(JobStore):
    """A store on the real server whose `method` raises once, before or after its real write."""

    def __init__(self, db: Database[Any], method: str, when: str) -> None:
        super().__init__(db)
        self.fault: tuple[str, str] | None = (method, when)

    def _trip(self, method: str, when: str) -> None:
        if self.fault == (method, when):
            self.fault = None
            raise AutoReconnect(f"injected: connection lost {when} {method}")

    def record_call(self, call: dict[str, Any]) -> Any:
        self._trip("record_call", "before")
        stored = super().record_call(call)
        self._trip("record_call", "after")
        return stored

    def add_spend(self, job_id: str, cost_usd: float) -> None:
        self._trip("add_spend", "before")
        super().add_spend(job_id, cost_usd)
        self._trip("add_spend", "after")


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("method", ["record_call", "add_spend"])
def test_a_mongo_error_between_billing_and_spend_still_counts_the_cost_exactly_once(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
    method: str,
    when: str,
) -> None:
    sim = start_simulator(latency_ms=0)
    seed(store, 20)
    client = make_client(sim)
    job_id = create_job(
        store, {"filter": {}, "max_cost_usd": 1000.0}, dag_id="d", run_id="r1", source="ui"
    ).job_id
    faulty = FaultyStore(store.db, method, when)

    with pytest.raises(AutoReconnect, match="injected"):
        process_batch(faulty, client, job_id, 0, try_number=1)
    assert faulty.fault is None, "the fault must have been hit"
    # Airflow retries the batch: the same request goes again, and the service replays it.
    process_batch(store, client, job_id, 0, try_number=2)
    process_batch(store, client, job_id, 1, try_number=1)
    summary = reconcile_job(store, job_id)

    billed = billed_by_service(sim)
    assert billed > 0
    assert sum(c["cost_usd"] for c in recorded(store, job_id)) == pytest.approx(billed)
    assert summary.cost_usd == pytest.approx(billed)
    assert store.load_batch(job_id, 0).spent_usd == pytest.approx(billed), (
        "the budget must be held against everything billed"
    )
    assert (store.get_job(job_id) or {})["spent_usd"] == pytest.approx(billed)
    assert summary.counts["succeeded"] == 20


def test_a_budget_spent_mid_batch_stops_the_next_round_of_the_same_batch(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0, item_error_rate=0.5, seed=11)
    seed(store, 10)
    job_id = create_job(
        store, {"filter": {}, "max_cost_usd": 1e-9}, dag_id="d", run_id="r1", source="ui"
    ).job_id

    report = process_batch(store, make_client(sim, max_rounds=3), job_id, 0)
    summary = reconcile_job(store, job_id)

    assert sim.stats()["requests_total"] == 1, "only the request sent before the budget was spent"
    assert report.not_sent > 0, "the simulator's item errors must leave tasks for a next round"
    cancelled = list(store.results.find({"job_id": job_id, "status": "cancelled"}))
    assert len(cancelled) == report.not_sent
    assert {r["error"]["type"] for r in cancelled} == {"budget_exhausted"}
    assert summary.counts["succeeded"] + summary.counts["cancelled"] == 10
    batch = store.batches.find_one({"job_id": job_id, "batch_no": 0})
    assert batch is not None and batch["state"] == "skipped"


def test_concurrent_batches_overshoot_the_budget_by_at_most_one_request_per_slot(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    """README's bound: spend <= max_cost_usd + slots x (cost of the dearest request)."""
    slots = 4
    sim = start_simulator(latency_ms=100, seed=5)
    seed(store, 200)
    calibration = create_job(
        store, {"filter": {}, "limit": 10}, dag_id="d", run_id="calibrate", source="ui"
    ).job_id
    run_job(store, make_client(sim), calibration)
    one_request = billed_by_service(sim)
    sim.configure(item_error_rate=0.3)  # answers come in rounds: more requests per batch
    budget = one_request / 10
    job_id = create_job(
        store,
        {"filter": {"_id": {"$gte": "t00010"}}, "max_cost_usd": budget},
        dag_id="d",
        run_id="r1",
        source="ui",
    ).job_id
    todo: queue.Queue[int] = queue.Queue()
    for batch_no in range(batch_count(190)):
        todo.put(batch_no)

    def pool_slot() -> None:
        client = make_client(sim, max_rounds=4)
        while True:
            try:
                batch_no = todo.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(BatchIncomplete):
                process_batch(store, client, job_id, batch_no)

    workers = [threading.Thread(target=pool_slot) for _ in range(slots)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    summary = reconcile_job(store, job_id)

    calls = [c for c in recorded(store, job_id) if c["billed"]]
    dearest = max(c["cost_usd"] for c in calls)
    spent = billed_by_service(sim) - one_request
    assert spent == pytest.approx(summary.cost_usd)
    assert budget <= spent <= budget + slots * dearest
    assert summary.counts["cancelled"] > 0
    assert sum(summary.counts.values()) == 190
