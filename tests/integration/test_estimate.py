"""The dry-run estimate rests on the same connection and model, says on how many answers, and
gives a range when that basis is thin; over a real MongoDB-wire server and the simulator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llm_batch.estimate import SOLID_BASIS_ANSWERS, estimate_job
from llm_batch.jobs import create_job, estimate_request
from llm_batch.reconcile import reconcile_job
from llm_batch.service import LLMService
from llm_batch.store import JobStore
from llm_hook import LLMClient
from tests.conftest import Simulator
from tests.integration.test_pipeline import run_job

pytestmark = pytest.mark.integration


def seed_texts(store: JobStore, prefix: str, count: int, words: int) -> list[str]:
    docs = [
        {"_id": f"{prefix}{i:04d}", "payload": {"text": " ".join(["word"] * words) + f" {i}"}}
        for i in range(count)
    ]
    store.tasks.insert_many(docs)
    return [doc["_id"] for doc in docs]


def run(store: JobStore, client: LLMClient, run_id: str, ids: list[str], **conf: Any) -> float:
    job_id = create_job(
        store, {"task_ids": ids, **conf}, dag_id="d", run_id=run_id, source="ui"
    ).job_id
    run_job(store, client, job_id)
    return reconcile_job(store, job_id).cost_usd


def test_answers_through_another_service_are_no_basis_for_this_one(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    elsewhere, here = start_simulator(latency_ms=0), start_simulator(latency_ms=0)
    run(store, make_client(elsewhere), "other-service", seed_texts(store, "short", 20, 1))
    ids = seed_texts(store, "long", 40, 200)
    service = LLMService.from_settings(make_client(here).settings)

    estimate = estimate_job(store, ids, instructions=None, model=None, service=service)

    assert estimate.basis_answers == 0
    assert "no answers of sim-small through this connection yet" in estimate.basis
    assert estimate.cost_usd_low < estimate.cost_usd < estimate.cost_usd_high


def test_answers_of_another_model_on_the_same_connection_are_no_basis(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    client = make_client(sim)
    run(store, client, "large", seed_texts(store, "a", 20, 5), model="sim-large")

    estimate = estimate_job(
        store, seed_texts(store, "b", 10, 5), instructions=None, model=None,
        service=LLMService.from_settings(client.settings),
    )  # fmt: skip

    assert estimate.model == "sim-small" and estimate.basis_answers == 0


def test_a_thin_basis_gives_a_range_that_holds_the_actual_cost_and_says_how_thin(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    client = make_client(sim)
    service = LLMService.from_settings(client.settings)
    ids = seed_texts(store, "t", 60, 30)
    run(store, client, "history", ids[:20])

    estimate = estimate_job(store, ids[20:], instructions=None, model=None, service=service)
    actual = run(store, client, "real", ids[20:])

    assert estimate.basis_answers == 20 < SOLID_BASIS_ANSWERS
    assert "only 20 answers of sim-small through this connection" in estimate.basis
    assert estimate.output_tokens_low < estimate.output_tokens < estimate.output_tokens_high
    assert estimate.cost_usd_low <= actual <= estimate.cost_usd_high
    assert estimate.cost_usd == pytest.approx(actual, rel=0.10)


def test_a_solid_basis_gives_a_point(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    client = make_client(sim)
    ids = seed_texts(store, "t", SOLID_BASIS_ANSWERS + 10, 10)
    run(store, client, "history", ids[:SOLID_BASIS_ANSWERS])

    estimate = estimate_job(
        store, ids[SOLID_BASIS_ANSWERS:], instructions=None, model=None,
        service=LLMService.from_settings(client.settings),
    )  # fmt: skip

    assert estimate.basis_answers == SOLID_BASIS_ANSWERS
    assert estimate.output_tokens_low == estimate.output_tokens == estimate.output_tokens_high


def test_max_tokens_in_llm_params_is_the_upper_end_of_the_dry_run_estimate(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
) -> None:
    sim = start_simulator(latency_ms=0)
    service = LLMService.from_settings(make_client(sim).settings)
    seed_texts(store, "t", 30, 10)

    estimate = estimate_request(
        store, {"filter": {}, "llm_params": {"max_tokens": 20}, "dry_run": True}, service
    )

    assert estimate.output_tokens_high == 20 * 30
    assert estimate.output_tokens <= estimate.output_tokens_high
    assert "llm_params cap the output at 20 tokens a task" in estimate.basis
    assert sim.stats()["requests_total"] == 0
