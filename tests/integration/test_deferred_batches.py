"""The deferred batch trigger against a real MongoDB-wire server and the simulator over HTTP.

The trigger runs in an event loop here as in the triggerer, with its connections from the
environment (as Airflow gives them); every batch of a job is in flight at once. Each test gets
the triggerer's shared clients afresh, on a clock it moves itself.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from airflow.sdk import BaseHook
from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent, TriggerEvent
from pymongo.errors import InvalidOperation

from llm_batch import config
from llm_batch.batching import batch_count
from llm_batch.jobs import create_job
from llm_batch.orchestration import batch_trigger
from llm_batch.orchestration.batch_trigger import ProcessBatchTrigger
from llm_batch.orchestration.shared_clients import SharedClients
from llm_batch.store import JobStore
from llm_hook.pacing import RateLimiter
from tests.conftest import Simulator
from tests.integration.test_pipeline import seed

pytestmark = pytest.mark.integration

StartSimulator = Callable[..., Simulator]


@pytest.fixture
def connections(
    store: JobStore, mongo_uri: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[[Simulator], None]:
    """Point `mongo_default` at the test database and `llm_default` at a simulator."""

    def point_at(sim: Simulator) -> None:
        host = mongo_uri.removeprefix("mongodb://")
        monkeypatch.setenv("AIRFLOW_CONN_MONGO_DEFAULT", f"mongo://{host}/{store.db.name}")
        monkeypatch.setenv(
            "AIRFLOW_CONN_LLM_DEFAULT",
            json.dumps(
                {
                    "conn_type": "llm_batch",
                    "host": sim.url,
                    "password": sim.api_key,
                    "extra": {
                        "model": "sim-small",
                        "backoff_base_s": 0.01,
                        "backoff_max_s": 0.05,
                        "max_retry_after_s": 0.2,
                        "price_input_per_1k": 1.0,
                        "price_output_per_1k": 1.0,
                    },
                }
            ),
        )
        monkeypatch.setenv("LLM_BATCH_CACHE_MAX_AGE_S", "0")

    return point_at


class Clock:
    """Monotonic seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(autouse=True)
def shared_clients(clock: Clock, monkeypatch: pytest.MonkeyPatch) -> Iterator[SharedClients]:
    """The triggerer's shared clients, new for each test (whose connections differ)."""
    clients = SharedClients(pool_maxsize=8, clock=clock)
    monkeypatch.setattr(batch_trigger, "BATCH_CLIENTS", clients)
    yield clients
    clients.close()


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the connection look-ups (in a triggerer, each a round trip to the api-server)."""
    counted: Counter[str] = Counter()
    look_up = BaseHook.get_connection.__func__  # type: ignore[attr-defined]

    def counting(cls: type, conn_id: str) -> Any:
        counted[conn_id] += 1
        return look_up(cls, conn_id)

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(counting))
    return counted


def run_triggers(triggers: list[ProcessBatchTrigger]) -> list[TriggerEvent]:
    """Run the triggers concurrently in one event loop; return each one's single event."""

    async def one(trigger: ProcessBatchTrigger) -> TriggerEvent:
        events = [event async for event in trigger.run()]
        assert len(events) == 1, events
        return events[0]

    async def every() -> list[TriggerEvent]:
        return list(await asyncio.gather(*(one(t) for t in triggers)))

    return asyncio.run(every())


def test_every_batch_of_a_job_in_flight_at_once_ends_once_with_faults_and_a_replay(
    store: JobStore, start_simulator: StartSimulator, connections: Callable[[Simulator], None]
) -> None:
    sim = start_simulator(
        latency_ms=200,
        seed=5,
        error_5xx_rate=0.1,
        rate_limit_rate=0.05,
        drop_id_rate=0.02,
    )
    connections(sim)
    task_ids = seed(store, 120)
    job = create_job(store, {"filter": {}}, dag_id="d", run_id="r", source="ui")
    batches = range(batch_count(len(task_ids)))

    events = run_triggers([ProcessBatchTrigger(job.job_id, n, 1) for n in batches])
    first_stats = sim.stats()
    # The Airflow retry of each failed batch, and a replay of every batch as after a triggerer
    # failover (same try, same idempotency key): nothing answered is sent or billed again.
    failed = [n for n, e in zip(batches, events, strict=True) if isinstance(e, TaskFailedEvent)]
    retried = run_triggers([ProcessBatchTrigger(job.job_id, n, 2) for n in failed])
    replayed = run_triggers([ProcessBatchTrigger(job.job_id, n, 1) for n in batches])

    assert all(isinstance(e, TaskSuccessEvent | TaskFailedEvent) for e in events)
    assert all(isinstance(e, TaskSuccessEvent) for e in retried + replayed)
    assert first_stats["peak_in_flight"] > 1, "the batches did not overlap"
    results = list(store.db.results.find({"job_id": job.job_id}))
    assert Counter(r["task_id"] for r in results) == Counter(task_ids)
    assert {r["status"] for r in results} == {"succeeded"}
    stats = sim.stats()
    assert sum(stats["faults_injected"].values()) > 0
    assert stats["tasks_billed"] <= 1.05 * len(task_ids)
    stored = store.get_job(job.job_id) or {}
    calls = list(store.db.llm_calls.find({"job_id": job.job_id}))
    assert stored["spent_usd"] == pytest.approx(sum(c["cost_usd"] for c in calls), abs=1e-9)


def test_a_cancelled_jobs_triggers_send_nothing_and_end_the_task(
    store: JobStore, start_simulator: StartSimulator, connections: Callable[[Simulator], None]
) -> None:
    sim = start_simulator(latency_ms=0)
    connections(sim)
    seed(store, 30)
    job = create_job(store, {"filter": {}}, dag_id="d", run_id="r", source="ui")
    assert store.request_cancel(job.job_id, datetime.now(UTC), "a test")

    events = run_triggers([ProcessBatchTrigger(job.job_id, n, 1) for n in range(3)])

    assert all(isinstance(e, TaskSuccessEvent) for e in events)
    assert sim.stats()["requests_total"] == 0
    assert store.db.llm_calls.count_documents({"job_id": job.job_id}) == 0


def test_a_job_over_budget_is_not_sent_from_the_triggerer_either(
    store: JobStore, start_simulator: StartSimulator, connections: Callable[[Simulator], None]
) -> None:
    sim = start_simulator(latency_ms=0)
    connections(sim)
    seed(store, 40)
    job = create_job(
        store, {"filter": {}, "max_cost_usd": 0.000001}, dag_id="d", run_id="r", source="ui"
    )

    first = run_triggers([ProcessBatchTrigger(job.job_id, 0, 1)])
    sent_after_first = sim.stats()["requests_total"]
    rest = run_triggers([ProcessBatchTrigger(job.job_id, n, 1) for n in (1, 2, 3)])

    assert isinstance(first[0], TaskSuccessEvent) and sent_after_first >= 1
    assert all(isinstance(e, TaskSuccessEvent) for e in rest)
    assert sim.stats()["requests_total"] == sent_after_first


def test_the_batches_of_one_triggerer_share_one_mongo_client_and_read_each_connection_once(
    store: JobStore,
    start_simulator: StartSimulator,
    connections: Callable[[Simulator], None],
    shared_clients: SharedClients,
    lookups: Counter[str],
) -> None:
    connections(start_simulator(latency_ms=50))
    seed(store, 50)
    job = create_job(store, {"filter": {}}, dag_id="d", run_id="r", source="ui")

    events = run_triggers([ProcessBatchTrigger(job.job_id, n, 1) for n in range(5)])

    assert all(isinstance(e, TaskSuccessEvent) for e in events)
    assert store.db.results.count_documents({"job_id": job.job_id}) == 50
    assert lookups == Counter({config.MONGO_CONN_ID: 1, config.LLM_CONN_ID: 1})
    with shared_clients.store() as first, shared_clients.store() as second:
        assert first.db.client is second.db.client
        assert first.db.name == store.db.name


def test_a_rotated_llm_connection_is_used_after_the_ttl_and_not_before(
    store: JobStore,
    start_simulator: StartSimulator,
    connections: Callable[[Simulator], None],
    clock: Clock,
) -> None:
    old, new = start_simulator(api_key="old-key"), start_simulator(api_key="new-key")
    connections(old)
    seed(store, 30)
    job = create_job(store, {"filter": {}}, dag_id="d", run_id="r", source="ui")

    first = run_triggers([ProcessBatchTrigger(job.job_id, 0, 1)])
    connections(new)  # another host and key, as after a rotation
    clock.now = config.CONNECTION_TTL_S - 1
    within_ttl = run_triggers([ProcessBatchTrigger(job.job_id, 1, 1)])
    clock.now = config.CONNECTION_TTL_S + 1
    after_ttl = run_triggers([ProcessBatchTrigger(job.job_id, 2, 1)])

    assert all(isinstance(e, TaskSuccessEvent) for e in first + within_ttl + after_ttl)
    assert old.stats()["requests_total"] == 2
    assert new.stats()["requests_total"] == 1
    assert store.db.results.count_documents({"job_id": job.job_id}) == 30


def test_a_failed_batch_makes_the_next_one_read_the_connections_again(
    start_simulator: StartSimulator,
    connections: Callable[[Simulator], None],
    shared_clients: SharedClients,
) -> None:
    old, new = start_simulator(api_key="old-key"), start_simulator(api_key="new-key")
    connections(old)
    with pytest.raises(RuntimeError), shared_clients.llm_client(RateLimiter()):
        raise RuntimeError("the batch failed (e.g. the service refused the key)")
    connections(new)

    with shared_clients.llm_client(RateLimiter()) as client:
        assert [e.url for e in client.endpoints] == [new.url]


def test_a_replaced_mongo_client_is_closed_only_after_its_last_batch_is_done(
    store: JobStore,
    mongo_uri: str,
    connections: Callable[[Simulator], None],
    start_simulator: StartSimulator,
    shared_clients: SharedClients,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connections(start_simulator())
    host = mongo_uri.removeprefix("mongodb://")
    with shared_clients.store() as held:
        replaced = held.db.client
        monkeypatch.setenv(
            "AIRFLOW_CONN_MONGO_DEFAULT", f"mongo://{host}/{store.db.name}?appname=rotated"
        )
        clock.now = config.CONNECTION_TTL_S
        with shared_clients.store() as fresh:
            assert fresh.db.client is not replaced
            fresh.jobs.count_documents({})
        # The batch that holds the replaced client can still finish with it.
        held.jobs.count_documents({})
    with pytest.raises(InvalidOperation):
        replaced.admin.command("ping")
