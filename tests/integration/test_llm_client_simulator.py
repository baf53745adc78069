"""LLMClient against the real simulator over HTTP: outputs, faults, idempotency, auth."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from llm_batch_dev.simulator import expected_output
from llm_hook import (
    CallRecord,
    ClientSettings,
    LLMClient,
    LLMHook,
    LLMTask,
    OutcomeStatus,
    TaskOutcome,
)
from tests.conftest import Simulator

pytestmark = pytest.mark.integration

INSTRUCTIONS = "Summarise the ticket in one line."
StartSimulator = Callable[..., Simulator]


def fast_settings(sim: Simulator, **overrides: Any) -> ClientSettings:
    """Settings with small timeouts and backoffs, so fault tests take a moment, not minutes."""
    values: dict[str, Any] = {
        "base_url": sim.url,
        "api_key": sim.api_key,
        "model": "sim-small",
        "connect_timeout_s": 2.0,
        "timeout_s": 2.0,
        "max_attempts": 8,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.05,
        "max_retry_after_s": 0.05,
        "max_rounds": 8,
        "price_input_per_1k": 1.0,
        "price_output_per_1k": 2.0,
    }
    values.update(overrides)
    return ClientSettings(**values)


@pytest.fixture
def clients() -> Iterator[Callable[[ClientSettings], LLMClient]]:
    made: list[LLMClient] = []

    def make(settings: ClientSettings) -> LLMClient:
        client = LLMClient(settings)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def make_tasks(batch: int, n: int = 10) -> list[LLMTask]:
    return [
        LLMTask(
            f"b{batch}-t{i:02d}", {"ticket": i, "text": f"printer {i} on fire", "tags": [batch]}
        )
        for i in range(n)
    ]


def assert_all_correct(tasks: list[LLMTask], outcomes: list[TaskOutcome], model: str) -> None:
    assert [o.task_id for o in outcomes] == [t.id for t in tasks]
    for task, outcome in zip(tasks, outcomes, strict=True):
        assert outcome.status is OutcomeStatus.SUCCEEDED, outcome
        assert outcome.output == expected_output(task.input, instructions=INSTRUCTIONS, model=model)


def test_round_trip_returns_the_expected_output_for_every_task(
    start_simulator: StartSimulator, clients: Callable[[ClientSettings], LLMClient]
) -> None:
    sim = start_simulator(latency_ms=1)
    client = clients(fast_settings(sim))
    calls: list[CallRecord] = []
    tasks = make_tasks(0)

    outcomes = client.complete(
        tasks, instructions=INSTRUCTIONS, idempotency_key="job-rt:batch-0", on_call=calls.append
    )

    assert_all_correct(tasks, outcomes, "sim-small")
    assert all(o.attempts == 1 and o.model == "sim-small" for o in outcomes)
    assert all(o.confidence is not None and 0 <= o.confidence <= 1 for o in outcomes)
    (call,) = calls
    assert (call.http_status, call.error_type, call.endpoint) == (200, None, f"{sim.url}/v1/batch")
    stats = sim.stats()
    assert stats["tasks_billed"] == len(tasks)
    assert call.usage.input_tokens == stats["input_tokens_billed"]
    assert call.usage.output_tokens == stats["output_tokens_billed"]
    assert call.cost_usd == pytest.approx(
        (call.usage.input_tokens * 1.0 + call.usage.output_tokens * 2.0) / 1000
    )


def test_another_model_is_used_when_asked(
    start_simulator: StartSimulator, clients: Callable[[ClientSettings], LLMClient]
) -> None:
    sim = start_simulator(latency_ms=1)
    tasks = make_tasks(0, 3)
    outcomes = clients(fast_settings(sim)).complete(
        tasks, instructions=INSTRUCTIONS, model="sim-large"
    )
    assert_all_correct(tasks, outcomes, "sim-large")


def test_every_task_succeeds_with_correct_outputs_despite_faults(
    start_simulator: StartSimulator, clients: Callable[[ClientSettings], LLMClient]
) -> None:
    sim = start_simulator(
        latency_ms=1,
        seed=20240501,
        error_5xx_rate=0.2,
        rate_limit_rate=0.1,
        reset_rate=0.1,
        truncate_rate=0.1,
        drop_id_rate=0.1,
        duplicate_id_rate=0.1,
        unknown_id_rate=0.1,
        malformed_item_rate=0.1,
        item_error_rate=0.1,
    )
    client = clients(fast_settings(sim))
    calls: list[CallRecord] = []

    for batch in range(5):
        tasks = make_tasks(batch)
        outcomes = client.complete(
            tasks,
            instructions=INSTRUCTIONS,
            idempotency_key=f"job-faults:batch-{batch}",
            on_call=calls.append,
        )
        assert_all_correct(tasks, outcomes, "sim-small")

    stats = sim.stats()
    # The faults really happened, and the client saw them.
    assert set(stats["faults_injected"]) >= {"error_5xx", "reset", "drop_id", "unknown_id"}
    assert {c.error_type for c in calls} >= {"connection_error"}
    assert any(c.http_status is not None and c.http_status >= 500 for c in calls)
    assert len(calls) == stats["requests_total"]


def test_reset_after_processing_is_retried_with_the_same_key_and_billed_once(
    start_simulator: StartSimulator, clients: Callable[[ClientSettings], LLMClient]
) -> None:
    sim = start_simulator(latency_ms=1, reset_rate=1.0)
    client = clients(fast_settings(sim))
    tasks = make_tasks(0)
    calls: list[CallRecord] = []

    def heal_after_first_reset(call: CallRecord) -> None:
        calls.append(call)
        if call.error_type == "connection_error":
            sim.configure(reset_rate=0.0)

    outcomes = client.complete(
        tasks,
        instructions=INSTRUCTIONS,
        idempotency_key="job-reset:batch-0",
        on_call=heal_after_first_reset,
    )

    assert_all_correct(tasks, outcomes, "sim-small")
    assert [c.error_type for c in calls] == ["connection_error", None]
    assert calls[0].idempotency_key == calls[1].idempotency_key is not None
    stats = sim.stats()
    assert stats["faults_injected"].get("reset") == 1
    assert stats["tasks_billed"] == len(tasks)
    assert stats["replays"] == 1


def test_without_a_key_the_same_reset_is_billed_twice(
    start_simulator: StartSimulator, clients: Callable[[ClientSettings], LLMClient]
) -> None:
    # The contrast that shows what the key buys.
    sim = start_simulator(latency_ms=1, reset_rate=1.0)
    client = clients(fast_settings(sim))
    tasks = make_tasks(0)

    def heal(call: CallRecord) -> None:
        if call.error_type == "connection_error":
            sim.configure(reset_rate=0.0)

    outcomes = client.complete(tasks, instructions=INSTRUCTIONS, on_call=heal)

    assert_all_correct(tasks, outcomes, "sim-small")
    assert sim.stats()["tasks_billed"] == 2 * len(tasks)


def test_a_fresh_client_redoing_the_same_work_is_replayed_not_billed(
    start_simulator: StartSimulator, clients: Callable[[ClientSettings], LLMClient]
) -> None:
    # As when a worker dies after the service answered and Airflow retries the batch.
    sim = start_simulator(latency_ms=1)
    tasks = make_tasks(0)
    first = clients(fast_settings(sim)).complete(
        tasks, instructions=INSTRUCTIONS, idempotency_key="job-kill:batch-0"
    )
    again = clients(fast_settings(sim)).complete(
        list(reversed(tasks)), instructions=INSTRUCTIONS, idempotency_key="job-kill:batch-0"
    )
    assert {o.task_id: o.output for o in first} == {o.task_id: o.output for o in again}
    stats = sim.stats()
    assert stats["tasks_billed"] == len(tasks)
    assert stats["replays"] == 1


def test_a_wrong_key_aborts_every_task_after_one_request(
    start_simulator: StartSimulator, clients: Callable[[ClientSettings], LLMClient]
) -> None:
    sim = start_simulator(latency_ms=1)
    client = clients(fast_settings(sim, api_key="not-the-key", conn_id="llm_default"))
    tasks = make_tasks(0)

    outcomes = client.complete(tasks, instructions=INSTRUCTIONS)

    assert {o.status for o in outcomes} == {OutcomeStatus.ABORTED}
    assert {o.error_type for o in outcomes} == {"unauthorized"}
    message = outcomes[0].error_message or ""
    assert "API key" in message and "'llm_default'" in message
    assert "not-the-key" not in message
    stats = sim.stats()
    assert stats["requests_total"] == 1
    assert stats["tasks_billed"] == 0


def test_an_unknown_model_aborts_with_a_hint(
    start_simulator: StartSimulator, clients: Callable[[ClientSettings], LLMClient]
) -> None:
    sim = start_simulator(latency_ms=1)
    outcomes = clients(fast_settings(sim)).complete(make_tasks(0, 2), model="gpt-nope")
    assert {o.status for o in outcomes} == {OutcomeStatus.ABORTED}
    assert {o.error_type for o in outcomes} == {"not_found"}
    assert "gpt-nope" in (outcomes[0].error_message or "")


def test_test_connection_succeeds_and_spends_nothing(
    start_simulator: StartSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = start_simulator(latency_ms=1)
    monkeypatch.setenv(
        "AIRFLOW_CONN_LLM_SIM",
        json.dumps(
            {
                "conn_type": "llm_batch",
                "host": sim.url,
                "password": sim.api_key,
                "extra": {"model": "sim-small"},
            }
        ),
    )
    hook = LLMHook(llm_conn_id="llm_sim")

    ok, message = hook.test_connection()
    hook.get_conn().close()

    assert ok, message
    assert sim.url in message
    stats = sim.stats()
    assert stats["tasks_billed"] == 0
    assert stats["input_tokens_billed"] == stats["output_tokens_billed"] == 0
    assert stats["requests_by_endpoint"] == {"/v1/models": 1}


def test_test_connection_reports_a_wrong_key(
    start_simulator: StartSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = start_simulator(latency_ms=1)
    monkeypatch.setenv(
        "AIRFLOW_CONN_LLM_SIM",
        json.dumps(
            {
                "conn_type": "llm_batch",
                "host": sim.url,
                "password": "wrong-key-123",
                "extra": {"model": "sim-small"},
            }
        ),
    )
    ok, message = LLMHook(llm_conn_id="llm_sim").test_connection()
    assert not ok
    assert "API key" in message and "llm_sim" in message
    assert "wrong-key-123" not in message
