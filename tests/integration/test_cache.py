"""The response cache over a real MongoDB-wire server and the simulator."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo.database import Database

from llm_batch import config
from llm_batch.batching import batch_count
from llm_batch.cache import CachedAnswer, ResponseCache
from llm_batch.jobs import create_job
from llm_batch.processing import process_batch
from llm_batch.reconcile import reconcile_job
from llm_batch.store import JobStore
from llm_batch_dev.simulator import expected_output
from llm_hook import ClientSettings, LLMClient
from tests.conftest import Simulator
from tests.integration.test_pipeline import seed

pytestmark = pytest.mark.integration

StartSimulator = Callable[..., Simulator]
INSTRUCTIONS = "Summarise."
COMPARED = ("task_id", "status", "output", "confidence", "model", "error")


@pytest.fixture
def store(mongo_db: Database[Any]) -> JobStore:
    store = JobStore(mongo_db)
    store.ensure_indexes()
    return store


@pytest.fixture
def cache(store: JobStore) -> ResponseCache:
    cache = ResponseCache(store.db[config.LLM_CACHE], max_age_s=3600)
    cache.ensure_indexes()
    return cache


@pytest.fixture
def client(start_simulator: StartSimulator) -> Iterator[tuple[Simulator, LLMClient]]:
    sim = start_simulator(latency_ms=0)
    settings = ClientSettings(
        base_url=sim.url,
        api_key=sim.api_key,
        model="sim-small",
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        price_input_per_1k=1.0,
        price_output_per_1k=1.0,
    )
    llm = LLMClient(settings, rng=random.Random(3))
    yield sim, llm
    llm.close()


def run(
    store: JobStore, llm: LLMClient, cache: ResponseCache | None, run_id: str, **conf: Any
) -> str:
    start = create_job(
        store,
        {"filter": {}, "instructions": INSTRUCTIONS, **conf},
        dag_id="d",
        run_id=run_id,
        source="ui",
    )
    for batch_no in range(batch_count(start.task_count)):
        process_batch(store, llm, start.job_id, batch_no, cache=cache)
    reconcile_job(store, start.job_id)
    return start.job_id


def results(store: JobStore, job_id: str) -> dict[Any, dict[str, Any]]:
    return {
        doc["task_id"]: {name: doc.get(name) for name in COMPARED}
        for doc in store.results.find({"job_id": job_id})
    }


def test_rerunning_the_same_inputs_sends_nothing_and_gives_identical_results(
    store: JobStore, cache: ResponseCache, client: tuple[Simulator, LLMClient]
) -> None:
    sim, llm = client
    seed(store, 45)
    first = run(store, llm, cache, "r1")
    before = sim.stats()

    second = run(store, llm, cache, "r2")

    after = sim.stats()
    assert after["requests_total"] == before["requests_total"]
    assert after["tasks_billed"] == before["tasks_billed"] == 45
    assert results(store, second) == results(store, first)
    cached = list(store.results.find({"job_id": second}))
    assert len(cached) == 45
    assert all(doc["cached"] is True and doc["status"] == "succeeded" for doc in cached)
    assert all(doc["usage"] == {"input_tokens": 0, "output_tokens": 0} for doc in cached)
    assert store.llm_calls.count_documents({"job_id": second}) == 0
    job = store.get_job(second)
    assert job is not None
    assert job["counts"]["succeeded"] == 45 and job["cost_usd"] == 0.0
    payloads = {doc["_id"]: doc["payload"] for doc in store.tasks.find()}
    for doc in cached:
        expected = expected_output(
            payloads[doc["task_id"]], instructions=INSTRUCTIONS, model="sim-small"
        )
        assert doc["output"] == expected
    assert store.results.count_documents({"job_id": first, "cached": True}) == 0


def test_with_use_cache_off_every_task_is_sent_again(
    store: JobStore, cache: ResponseCache, client: tuple[Simulator, LLMClient]
) -> None:
    sim, llm = client
    seed(store, 45)
    first = run(store, llm, cache, "r1")
    before = sim.stats()

    second = run(store, llm, cache, "r2", use_cache=False)

    after = sim.stats()
    assert after["requests_total"] - before["requests_total"] == batch_count(45)
    assert after["tasks_billed"] - before["tasks_billed"] == 45
    assert results(store, second) == results(store, first)
    assert store.results.count_documents({"job_id": second, "cached": True}) == 0
    assert store.get_job(second)["params"]["use_cache"] is False  # type: ignore[index]


def test_failures_are_never_cached(
    store: JobStore, cache: ResponseCache, client: tuple[Simulator, LLMClient]
) -> None:
    sim, llm = client
    seed(store, 20, invalid=frozenset({3, 14}))
    run(store, llm, cache, "r1")
    assert store.db[config.LLM_CACHE].count_documents({}) == 18
    before = sim.stats(per_task=1)["billed_per_task"]

    second = run(store, llm, cache, "r2")

    billed = sim.stats(per_task=1)["billed_per_task"]
    resent = {task_id for task_id in billed if billed[task_id] > before.get(task_id, 0)}
    assert resent == {"t00003", "t00014"}
    failed = store.results.find({"job_id": second, "status": "failed"})
    assert {doc["task_id"] for doc in failed} == {"t00003", "t00014"}


def test_answers_older_than_the_max_age_are_asked_again(
    store: JobStore, client: tuple[Simulator, LLMClient]
) -> None:
    sim, llm = client
    seed(store, 10)
    now = [datetime.now(UTC)]
    cache = ResponseCache(store.db[config.LLM_CACHE], max_age_s=60, clock=lambda: now[0])
    run(store, llm, cache, "r1")
    now[0] += timedelta(seconds=61)
    before = sim.stats()["tasks_billed"]

    run(store, llm, cache, "r2")

    assert sim.stats()["tasks_billed"] - before == 10


def test_turning_the_cache_off_keeps_the_stored_answers_and_their_ttl(
    store: JobStore, cache: ResponseCache
) -> None:
    cache.store(
        {"adapter": "batch", "model": "m"},
        INSTRUCTIONS,
        {},
        [({"text": "a"}, CachedAnswer("ok", 0.9, "m"))],
    )

    ResponseCache(store.db[config.LLM_CACHE], max_age_s=0).ensure_indexes()

    ttl = store.db[config.LLM_CACHE].index_information()["created_at_ttl"]
    assert ttl["expireAfterSeconds"] == 3600
    assert store.db[config.LLM_CACHE].count_documents({}) == 1


def test_a_cache_that_is_off_creates_no_ttl_index(store: JobStore) -> None:
    ResponseCache(store.db["llm_cache_off"], max_age_s=0).ensure_indexes()
    assert "created_at_ttl" not in store.db["llm_cache_off"].index_information()


def test_another_model_or_other_instructions_are_another_question(
    store: JobStore, cache: ResponseCache, client: tuple[Simulator, LLMClient]
) -> None:
    sim, llm = client
    seed(store, 10)
    run(store, llm, cache, "r1")
    before = sim.stats()["tasks_billed"]

    run(store, llm, cache, "r2", model="sim-large")
    run(store, llm, cache, "r3", instructions="Translate.")
    run(store, llm, cache, "r4", llm_params={"temperature": 0.5})

    assert sim.stats()["tasks_billed"] - before == 30


def test_process_batch_wires_the_shared_limiter_and_the_cache(
    store: JobStore,
    mongo_uri: str,
    start_simulator: StartSimulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The DAG's task body, with its connections from the environment as Airflow gives them."""
    from llm_batch.orchestration import task_bodies

    sim = start_simulator(latency_ms=0)
    mongo_host = mongo_uri.removeprefix("mongodb://")
    monkeypatch.setenv("AIRFLOW_CONN_MONGO_DEFAULT", f"mongo://{mongo_host}/{store.db.name}")
    monkeypatch.setenv(
        "AIRFLOW_CONN_LLM_DEFAULT",
        json.dumps(
            {
                "conn_type": "llm_batch",
                "host": sim.url,
                "password": sim.api_key,
                "extra": {"model": "sim-small", "rpm": 600},
            }
        ),
    )
    seed(store, 20)
    task_bodies.response_cache(store).ensure_indexes()
    first = create_job(store, {"filter": {}}, dag_id="d", run_id="r1", source="ui")
    second = create_job(store, {"filter": {}}, dag_id="d", run_id="r2", source="ui")

    reports = [task_bodies.process_batch(first.job_id, n, try_number=1) for n in (0, 1)]
    reports += [task_bodies.process_batch(second.job_id, n, try_number=1) for n in (0, 1)]

    assert [r["sent"] for r in reports] == [10, 10, 0, 0]
    assert [r["cached"] for r in reports] == [0, 0, 10, 10]
    assert sim.stats()["tasks_billed"] == 20
    endpoint = store.db[config.LLM_ENDPOINTS].find_one({"_id": sim.url})
    assert endpoint is not None and endpoint["state"] == "active" and endpoint["request_tat"] > 0


def billed_again(sim: Simulator, before: dict[str, int]) -> set[str]:
    billed = sim.stats(per_task=1)["billed_per_task"]
    return {task_id for task_id, n in billed.items() if n > before.get(task_id, 0)}


def test_redriving_needs_review_tasks_asks_the_llm_again_instead_of_the_cache(
    store: JobStore, cache: ResponseCache, client: tuple[Simulator, LLMClient]
) -> None:
    sim, llm = client
    seed(store, 40)
    first = run(store, llm, cache, "r1", review_below=0.75)
    doubtful = {
        d["task_id"] for d in store.results.find({"job_id": first, "status": "needs_review"})
    }
    assert doubtful, "the simulator's confidences span 0.5..1; some must fall below 0.75"
    before = sim.stats(per_task=1)["billed_per_task"]

    redrive = run(
        store, llm, cache, "r2", filter=None, retry_of=first, include_needs_review=True,
        review_below=0.75,
    )  # fmt: skip

    assert billed_again(sim, before) == doubtful
    answers = list(store.results.find({"job_id": redrive}))
    assert {a["task_id"] for a in answers} == doubtful
    assert not any(a.get("cached") for a in answers)
    assert {a["status"] for a in answers} == {"needs_review"}, "still doubtful: still reviewed"


def test_a_cached_answer_below_the_review_threshold_is_asked_again_or_reviewed_when_allowed(
    store: JobStore, cache: ResponseCache, client: tuple[Simulator, LLMClient]
) -> None:
    sim, llm = client
    seed(store, 40)
    first = run(store, llm, cache, "r1")
    confidences = {d["task_id"]: d["confidence"] for d in store.results.find({"job_id": first})}
    low = {task_id for task_id, c in confidences.items() if c < 0.75}
    assert low and len(low) < 40
    before = sim.stats(per_task=1)["billed_per_task"]

    strict = run(store, llm, cache, "r2", review_below=0.75)

    assert billed_again(sim, before) == low, "only the doubtful answers are asked again"
    strict_results = {d["task_id"]: d for d in store.results.find({"job_id": strict})}
    assert {t for t, d in strict_results.items() if d.get("cached")} == set(confidences) - low
    assert {strict_results[t]["status"] for t in low} == {"needs_review"}
    before = sim.stats(per_task=1)["billed_per_task"]

    lenient = run(store, llm, cache, "r3", review_below=0.75, cache_below_review=True)

    assert billed_again(sim, before) == set()
    lenient_results = {d["task_id"]: d for d in store.results.find({"job_id": lenient})}
    assert all(d["cached"] for d in lenient_results.values())
    assert {t for t, d in lenient_results.items() if d["status"] == "needs_review"} == low
    assert all(lenient_results[t]["confidence"] == confidences[t] for t in confidences)


def test_an_answer_its_job_sent_to_review_is_not_reused_by_a_job_without_a_threshold(
    store: JobStore, cache: ResponseCache, client: tuple[Simulator, LLMClient]
) -> None:
    sim, llm = client
    seed(store, 40)
    first = run(store, llm, cache, "r1", review_below=0.75)
    doubtful = {
        d["task_id"] for d in store.results.find({"job_id": first, "status": "needs_review"})
    }
    before = sim.stats(per_task=1)["billed_per_task"]

    second = run(store, llm, cache, "r2")

    assert billed_again(sim, before) == doubtful
    cached = {d["task_id"] for d in store.results.find({"job_id": second, "cached": True})}
    assert cached == {f"t{i:05d}" for i in range(40)} - doubtful
