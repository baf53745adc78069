"""The OpenAI adapter against the simulator's `/v1/chat/completions` over HTTP."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from pymongo.database import Database
from requests.adapters import HTTPAdapter

from llm_batch.jobs import create_job
from llm_batch.reconcile import reconcile_job
from llm_batch.store import JobStore
from llm_batch_dev.simulator import expected_output
from llm_hook import ClientSettings, LLMClient, LLMHook, LLMTask, OutcomeStatus
from llm_hook.adapters import system_prompt
from tests.conftest import Simulator
from tests.integration.test_pipeline import run_job, seed
from tests.unit.test_openai_adapter import assert_valid_openai_request

pytestmark = pytest.mark.integration

INSTRUCTIONS = "Summarise the ticket in one line."
StartSimulator = Callable[..., Simulator]


class RecordingAdapter(HTTPAdapter):
    """A real HTTP adapter that keeps a copy of every request body it sends."""

    def __init__(self) -> None:
        super().__init__(max_retries=0)
        self.bodies: list[dict[str, Any]] = []

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        if request.body:
            raw = request.body if isinstance(request.body, bytes) else request.body.encode()
            self.bodies.append(json.loads(raw))
        return super().send(request, *args, **kwargs)


@pytest.fixture
def recorded() -> Iterator[tuple[requests.Session, RecordingAdapter]]:
    session = requests.Session()
    adapter = RecordingAdapter()
    session.mount("http://", adapter)
    yield session, adapter
    session.close()


def settings(sim: Simulator, **overrides: Any) -> ClientSettings:
    values: dict[str, Any] = {
        "base_url": sim.url,
        "api_key": sim.api_key,
        "adapter": "openai",
        "model": "sim-small",
        "timeout_s": 2.0,
        "connect_timeout_s": 1.0,
        "max_attempts": 8,
        "max_rounds": 8,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "max_retry_after_s": 0.05,
    }
    values.update(overrides)
    return ClientSettings(**values)


def make_tasks(batch: int) -> list[LLMTask]:
    return [
        LLMTask(f"b{batch}-t{i}", {"ticket": i, "text": f"printer {i} jammed", "batch": batch})
        for i in range(10)
    ]


def test_round_trip_gives_every_task_its_own_output_and_bodies_match_openais_types(
    start_simulator: StartSimulator, recorded: tuple[requests.Session, RecordingAdapter]
) -> None:
    sim = start_simulator(latency_ms=0)
    session, adapter = recorded
    client = LLMClient(settings(sim, model="sim-large"), session=session)
    for batch in range(3):
        tasks = make_tasks(batch)
        outcomes = client.complete(
            tasks, instructions=INSTRUCTIONS, params={"temperature": 0, "max_tokens": 2000}
        )
        for task, outcome in zip(tasks, outcomes, strict=True):
            assert outcome.status is OutcomeStatus.SUCCEEDED, outcome
            assert outcome.output == expected_output(
                task.input, instructions=system_prompt(INSTRUCTIONS), model="sim-large"
            )
            assert outcome.model == "sim-large"
    assert len(adapter.bodies) == 3
    for body in adapter.bodies:
        assert_valid_openai_request(body)
    stats = sim.stats()
    assert stats["requests_by_endpoint"] == {"/v1/chat/completions": 3}
    assert stats["tasks_billed"] == 30


def test_item_faults_through_the_openai_endpoint_never_misattribute_an_output(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(
        latency_ms=0,
        seed=5,
        error_5xx_rate=0.1,
        reset_rate=0.05,
        drop_id_rate=0.05,
        duplicate_id_rate=0.05,
        unknown_id_rate=0.05,
        malformed_item_rate=0.05,
        item_error_rate=0.05,
    )
    client = LLMClient(settings(sim))
    for batch in range(10):
        tasks = make_tasks(batch)
        outcomes = client.complete(tasks, instructions=INSTRUCTIONS, idempotency_key=f"k{batch}")
        for task, outcome in zip(tasks, outcomes, strict=True):
            assert outcome.status is OutcomeStatus.SUCCEEDED, outcome
            assert outcome.output == expected_output(
                task.input, instructions=system_prompt(INSTRUCTIONS), model="sim-small"
            )
    client.close()
    assert sum(sim.stats()["faults_injected"].values()) > 0


def test_a_pipeline_job_over_the_openai_adapter_succeeds_with_costs_from_usage(
    mongo_db: Database[Any], start_simulator: StartSimulator
) -> None:
    sim = start_simulator(latency_ms=0)
    store = JobStore(mongo_db)
    store.ensure_indexes()
    seed(store, 35, invalid=frozenset({4}))
    start = create_job(
        store,
        {"filter": {}, "instructions": INSTRUCTIONS},
        dag_id="d",
        run_id="r1",
        source="ui",
    )
    client = LLMClient(settings(sim, price_input_per_1k=0.5, price_output_per_1k=1.5))
    run_job(store, client, start.job_id)
    client.close()
    summary = reconcile_job(store, start.job_id)

    assert summary.counts["succeeded"] == 34 and summary.counts["failed"] == 1
    failed = store.results.find_one({"job_id": start.job_id, "status": "failed"})
    assert failed is not None and failed["error"]["type"] == "invalid_input"
    payloads = {doc["_id"]: doc["payload"] for doc in store.tasks.find()}
    for result in store.results.find({"job_id": start.job_id, "status": "succeeded"}):
        assert result["output"] == expected_output(
            payloads[result["task_id"]], instructions=system_prompt(INSTRUCTIONS), model="sim-small"
        )
    calls = list(store.llm_calls.find({"job_id": start.job_id}))
    assert {c["endpoint"] for c in calls} == {sim.url + "/v1/chat/completions"}
    stats = sim.stats()
    assert summary.usage["input_tokens"] == stats["input_tokens_billed"]
    assert summary.usage["output_tokens"] == stats["output_tokens_billed"]
    assert summary.cost_usd == pytest.approx(
        stats["input_tokens_billed"] * 0.5 / 1000 + stats["output_tokens_billed"] * 1.5 / 1000
    )


def test_test_connection_lists_models_and_spends_nothing(
    start_simulator: StartSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = start_simulator(latency_ms=0)
    monkeypatch.setenv(
        "AIRFLOW_CONN_LLM_OPENAI",
        json.dumps(
            {
                "conn_type": "llm_batch",
                "host": sim.url,
                "password": sim.api_key,
                "extra": {"adapter": "openai", "model": "sim-large"},
            }
        ),
    )
    hook = LLMHook(llm_conn_id="llm_openai")
    ok, message = hook.test_connection()
    hook.get_conn().close()
    assert ok, message
    assert sim.stats()["requests_by_endpoint"] == {"/v1/models": 1}
    assert sim.stats()["tasks_billed"] == 0
