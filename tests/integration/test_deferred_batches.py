"""The deferred batch trigger against a real MongoDB-wire server and the simulator over HTTP.

The trigger runs in an event loop here as in the triggerer, with its connections from the
environment (as Airflow gives them); every batch of a job is in flight at once.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from llm_batch.batching import batch_count
from llm_batch.jobs import create_job
from llm_batch.orchestration.batch_trigger import ProcessBatchTrigger
from llm_batch.store import JobStore
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
