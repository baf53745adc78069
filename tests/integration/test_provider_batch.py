"""Provider-batch delivery against the simulator's batch API over HTTP and a real MongoDB.

Each test drives the domain (`llm_batch.provider_batch`) as the operator and trigger do:
submit or re-attach, wait for a terminal status, read back, decide what follows, reconcile.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from llm_batch import provider_batch, provider_output
from llm_batch.cache import ResponseCache
from llm_batch.jobs import create_job
from llm_batch.orchestration.task_bodies import connection
from llm_batch.reconcile import reconcile_job
from llm_batch.store import JobStore
from llm_batch_dev.simulator import expected_output
from llm_hook import ClientSettings
from llm_hook.adapters import system_prompt
from llm_hook.batch_api import BatchApiClient
from tests.conftest import Simulator
from tests.integration.test_pipeline import seed

pytestmark = pytest.mark.integration

PRICE_IN, PRICE_OUT = 0.5, 1.5
FAST = {"batch_validating_s": 0.1, "batch_in_progress_s": 0.3, "batch_finalizing_s": 0.1}
StartSimulator = Callable[..., Simulator]


@pytest.fixture
def cache(store: JobStore) -> ResponseCache:
    cache = ResponseCache(store.db["llm_cache"], max_age_s=3600)
    cache.ensure_indexes()
    return cache


@pytest.fixture
def make_api() -> Iterator[Callable[..., BatchApiClient]]:
    made: list[BatchApiClient] = []

    def _make(sim: Simulator, **overrides: Any) -> BatchApiClient:
        values: dict[str, Any] = {
            "base_url": sim.url,
            "api_key": sim.api_key,
            "adapter": "openai",
            "model": "sim-small",
            "timeout_s": 5.0,
            "backoff_max_s": 0.05,
            "price_input_per_1k": PRICE_IN,
            "price_output_per_1k": PRICE_OUT,
            **overrides,
        }
        api = BatchApiClient(ClientSettings(**values))
        made.append(api)
        return api

    yield _make
    for api in made:
        api.close()


class LosesFirstCreateAnswer(requests.Session):
    """Sends every call to the server, but loses the answer to the first batch create."""

    lost = False

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        response = super().request(method, url, *args, **kwargs)
        if method == "POST" and url.endswith("/v1/batches") and not self.lost:
            self.lost = True
            raise requests.ReadTimeout("read timed out (the batch was created)")
        return response


def new_job(store: JobStore, task_ids: list[str], **conf: Any) -> str:
    created = create_job(
        store,
        {"task_ids": task_ids, "delivery": "provider_batch", **conf},
        dag_id="llm_batch_job",
        run_id=f"run-{time.monotonic_ns()}",
        source="ui",
    )
    return created.job_id


def deliver_round(
    store: JobStore, api: BatchApiClient, job_id: str, cache: ResponseCache | None = None
) -> tuple[list[dict[str, Any]], provider_output.Delivered]:
    """Submit (or re-attach), wait like the trigger, read back like execute_complete."""
    conn = connection(api)
    docs = provider_batch.attach_or_submit(store, api, conn, job_id, cache=cache)
    wait_until_ended(api, [doc["provider_batch_id"] for doc in docs])
    return docs, provider_output.read_back(store, api, conn, job_id, cache=cache)


def budget_for_two_of_three_requests(
    store: JobStore, start_simulator: StartSimulator, make_api: Callable[..., BatchApiClient]
) -> tuple[BatchApiClient, str]:
    """Return a client and a job of 3 requests with a budget ($1.40) for two of them.

    Each request: 10 x 145 input tokens (the system prompt counted with every task) and at
    most 400 output tokens (the ceiling), at half of $0.5/$1.5 per 1k: $0.6625.
    """
    api = make_api(start_simulator(**FAST), max_tokens_ceiling=400)
    return api, new_job(store, seed(store, 30), max_cost_usd=1.4)


def wait_until_ended(api: BatchApiClient, batch_ids: list[str], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(api.get_batch(b)["status"] in provider_batch.TERMINAL for b in batch_ids):
            return
        time.sleep(0.1)
    raise AssertionError(f"provider batches {batch_ids} did not end in {timeout_s} s")


def answered_once(store: JobStore, job_id: str, task_ids: list[str]) -> Counter[str]:
    results = list(store.results.find({"job_id": job_id}))
    assert Counter(r["task_id"] for r in results) == Counter(task_ids)
    return Counter(r["status"] for r in results)


class TestCompletedBatch:
    def test_every_task_answered_once_at_the_batch_price(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST)
        api = make_api(sim)
        task_ids = seed(store, 25)
        job_id = new_job(store, task_ids, instructions="Tag it.")

        docs, delivered = deliver_round(store, api, job_id)

        assert len(docs) == 1 and delivered.lines == 3 and delivered.succeeded == 25
        assert provider_output.next_step(store, job_id, delivered) == "done"
        summary = reconcile_job(store, job_id)
        assert summary.state == "succeeded"
        assert answered_once(store, job_id, task_ids) == {"succeeded": 25}
        payloads = {doc["_id"]: doc["payload"] for doc in store.tasks.find()}
        for result in store.results.find({"job_id": job_id}):
            assert result["output"] == expected_output(
                payloads[result["task_id"]],
                instructions=system_prompt("Tag it."),
                model="sim-small",
            )
        stats = sim.stats()
        assert stats["batch_api"]["batches_created"] == 1
        usage = summary.usage
        assert usage["output_tokens"] == stats["output_tokens_billed"]
        batch_price = (usage["input_tokens"] * PRICE_IN + usage["output_tokens"] * PRICE_OUT) / 2000
        assert summary.cost_usd == pytest.approx(batch_price, abs=1e-6)
        assert summary.requests == 3
        assert store.get_job(job_id)["provider_batch"]["status"] == "completed"

    def test_reading_back_twice_counts_the_cost_once(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST)
        api = make_api(sim)
        task_ids = seed(store, 10)
        job_id = new_job(store, task_ids)
        deliver_round(store, api, job_id)
        spent = store.get_job(job_id)["spent_usd"]
        # A worker died after reading back but before marking the batch reconciled.
        provider_batch.collection(store).update_many(
            {"job_id": job_id}, {"$set": {"reconciled": False}}
        )
        provider_output.read_back(store, api, connection(api), job_id)
        assert store.get_job(job_id)["spent_usd"] == pytest.approx(spent)
        assert reconcile_job(store, job_id).cost_usd == pytest.approx(spent)

    def test_answers_go_into_the_cache_and_answer_the_next_job(
        self,
        store: JobStore,
        cache: ResponseCache,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST)
        api = make_api(sim)
        task_ids = seed(store, 10)
        deliver_round(store, api, new_job(store, task_ids), cache)
        second = new_job(store, task_ids)
        docs = provider_batch.attach_or_submit(store, api, connection(api), second, cache=cache)
        assert docs == []
        assert answered_once(store, second, task_ids) == {"succeeded": 10}
        assert sim.stats()["batch_api"]["batches_created"] == 1

    def test_a_task_deleted_while_the_provider_worked_ends_task_missing_and_the_rest_stored(
        self,
        store: JobStore,
        cache: ResponseCache,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST)
        api = make_api(sim)
        task_ids = seed(store, 10)
        job_id = new_job(store, task_ids)
        conn = connection(api)
        docs = provider_batch.attach_or_submit(store, api, conn, job_id, cache=cache)
        store.tasks.delete_one({"_id": task_ids[3]})
        wait_until_ended(api, [doc["provider_batch_id"] for doc in docs])

        provider_output.read_back(store, api, conn, job_id, cache=cache)

        statuses = {r["task_id"]: r for r in store.results.find({"job_id": job_id})}
        assert statuses[task_ids[3]]["error"]["type"] == "task_missing"
        assert sum(r["status"] == "succeeded" for r in statuses.values()) == 9
        assert provider_batch.active_batches(store, job_id) == []
        assert cache.collection.count_documents({}) == 9


class TestReattach:
    def test_a_resumed_job_re_attaches_instead_of_submitting_again(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(batch_validating_s=0.1, batch_in_progress_s=1.0)
        api = make_api(sim)
        task_ids = seed(store, 20)
        job_id = new_job(store, task_ids)
        first = provider_batch.attach_or_submit(store, api, connection(api), job_id)
        create_job(
            store,
            {"task_ids": task_ids, "job_id": job_id, "delivery": "provider_batch"},
            dag_id="llm_batch_job",
            run_id="resumed",
            source="ui",
            # The run that submitted the batch ended without closing its job (its worker died).
            run_active=lambda dag_id, run_id: False,
        )
        again, delivered = deliver_round(store, api, job_id)
        assert [d["provider_batch_id"] for d in again] == [d["provider_batch_id"] for d in first]
        assert delivered.succeeded == 20
        assert sim.stats()["batch_api"]["batches_created"] == 1

    def test_a_create_whose_answer_is_lost_is_found_by_its_metadata_not_created_twice(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST)
        api = make_api(sim, max_attempts=3)
        api._session = LosesFirstCreateAnswer()
        task_ids = seed(store, 10)
        job_id = new_job(store, task_ids)

        docs, delivered = deliver_round(store, api, job_id)

        assert sim.stats()["batch_api"]["batches_created"] == 1
        assert docs[0]["provider_batch_id"]
        assert delivered.succeeded == 10

    def test_a_batch_created_but_never_recorded_is_found_by_its_metadata(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST)
        api = make_api(sim)
        task_ids = seed(store, 10)
        job_id = new_job(store, task_ids)
        docs = provider_batch.attach_or_submit(store, api, connection(api), job_id)
        # The worker died between the provider's answer and the write.
        provider_batch.collection(store).update_one(
            {"_id": docs[0]["_id"]}, {"$set": {"provider_batch_id": None}}
        )
        again, delivered = deliver_round(store, api, job_id)
        assert again[0]["provider_batch_id"] == docs[0]["provider_batch_id"]
        assert delivered.succeeded == 10
        assert sim.stats()["batch_api"]["batches_created"] == 1

    def test_a_batch_recorded_but_never_created_is_submitted_once(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST)
        api = make_api(sim)
        task_ids = seed(store, 10)
        job_id = new_job(store, task_ids)
        # The worker died after writing the tracking document, before the upload.
        provider_batch.collection(store).insert_one(
            {"_id": f"{job_id}:r0:dead:0", "job_id": job_id, "round": 0, "part": 0,
             "provider_batch_id": None, "status": "submitting", "reconciled": False,
             "requests": [], "created_at": provider_batch.utcnow()}
        )  # fmt: skip
        docs, delivered = deliver_round(store, api, job_id)
        assert len(docs) == 1 and delivered.succeeded == 10
        assert provider_batch.collection(store).count_documents({"job_id": job_id}) == 1
        assert sim.stats()["batch_api"]["batches_created"] == 1


class TestExpiredAndCancelled:
    def test_an_expired_batch_keeps_its_answers_and_re_sends_the_rest_once(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST, batch_outcome="expired", batch_done_fraction=0.6)
        api = make_api(sim)
        task_ids = seed(store, 100)
        job_id = new_job(store, task_ids)

        _, first = deliver_round(store, api, job_id)
        assert first.statuses == {"expired": 1}
        assert first.succeeded == 60 and first.unanswered == 40
        assert provider_output.next_step(store, job_id, first) == "resend"

        sim.configure(batch_outcome="completed")
        docs, second = deliver_round(store, api, job_id)
        assert second.succeeded == 40
        assert sum(len(r["task_ids"]) for r in docs[0]["requests"]) == 40
        assert provider_output.next_step(store, job_id, second) == "done"
        assert reconcile_job(store, job_id).state == "succeeded"
        assert answered_once(store, job_id, task_ids) == {"succeeded": 100}
        stats = sim.stats(per_task=1)
        assert stats["batch_api"]["batches_created"] == 2
        assert set(stats["billed_per_task"].values()) == {1}

    def test_a_second_expiry_is_not_re_sent_again(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST, batch_outcome="expired", batch_done_fraction=0.5)
        api = make_api(sim)
        task_ids = seed(store, 40)
        job_id = new_job(store, task_ids)
        deliver_round(store, api, job_id)
        _, second = deliver_round(store, api, job_id)
        assert provider_output.next_step(store, job_id, second) == "done"
        summary = reconcile_job(store, job_id)
        assert summary.counts["succeeded"] == 30 and summary.counts["failed"] == 10
        assert sim.stats()["batch_api"]["batches_created"] == 2

    def test_resend_via_sync_hands_the_rest_to_the_sync_batches(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST, batch_outcome="expired", batch_done_fraction=0.6)
        api = make_api(sim)
        job_id = new_job(store, seed(store, 20), resend_via="sync")
        _, delivered = deliver_round(store, api, job_id)
        assert provider_output.next_step(store, job_id, delivered) == "sync"

    def test_cancelling_the_job_cancels_the_provider_batch_and_keeps_what_was_answered(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(batch_validating_s=0, batch_in_progress_s=2.0, batch_cancelling_s=0.2)
        api = make_api(sim)
        task_ids = seed(store, 100)
        job_id = new_job(store, task_ids)
        docs = provider_batch.attach_or_submit(store, api, connection(api), job_id)
        time.sleep(1.0)
        store.request_cancel(job_id, provider_batch.utcnow(), "test")
        assert provider_batch.cancel(store, api, job_id) == 1
        assert api.get_batch(docs[0]["provider_batch_id"])["status"] == "cancelling"
        wait_until_ended(api, [docs[0]["provider_batch_id"]])
        delivered = provider_output.read_back(store, api, connection(api), job_id)
        assert delivered.statuses == {"cancelled": 1}
        assert 0 < delivered.succeeded < 100
        assert provider_output.next_step(store, job_id, delivered) == "done"
        summary = reconcile_job(store, job_id)
        assert summary.state == "cancelled"
        assert summary.counts["succeeded"] == delivered.succeeded
        assert summary.counts["cancelled"] == 100 - delivered.succeeded
        assert sim.stats()["batch_api"]["cancel_requests"] == 1


class TestChecksAndLimits:
    def test_item_faults_and_line_errors_are_checked_like_sync_answers(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(
            **FAST, seed=3, duplicate_id_rate=0.1, unknown_id_rate=0.1, batch_line_error_rate=0.2
        )
        api = make_api(sim)
        task_ids = seed(store, 100, invalid=frozenset({5}))
        job_id = new_job(store, task_ids)
        _, delivered = deliver_round(store, api, job_id)
        errors = Counter(
            c["error_type"] for c in store.llm_calls.find({"job_id": job_id}) if c["error_type"]
        )
        assert errors["internal"] > 0  # lines in the error file
        assert delivered.unanswered > 0
        batches = {b["batch_no"]: b for b in store.batches.find({"job_id": job_id})}
        kinds = {b["last_error"]["type"] for b in batches.values() if b.get("last_error")}
        assert kinds & {"duplicate_id", "missing_id"}
        failed = store.results.find_one({"job_id": job_id, "task_id": task_ids[5]})
        assert failed is None or failed["error"]["type"] == "invalid_input"
        sim.configure(duplicate_id_rate=0.0, unknown_id_rate=0.0, batch_line_error_rate=0.0)
        _, second = deliver_round(store, api, job_id)
        assert second.unanswered == 0
        counts = answered_once(store, job_id, task_ids)
        assert counts["failed"] == 1 and counts["succeeded"] == 99

    def test_a_file_over_the_limits_is_split_into_several_batches(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST, batch_max_requests_per_file=2)
        api = make_api(sim, batch_max_requests_per_file=2)
        task_ids = seed(store, 50)
        job_id = new_job(store, task_ids)
        docs, delivered = deliver_round(store, api, job_id)
        assert [len(d["requests"]) for d in docs] == [2, 2, 1]
        assert delivered.succeeded == 50
        assert len(store.get_job(job_id)["provider_batch"]["batches"]) == 3
        assert sim.stats()["batch_api"]["batches_created"] == 3

    def test_a_budget_below_the_upper_bound_sends_only_what_fits(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        api, job_id = budget_for_two_of_three_requests(store, start_simulator, make_api)
        docs, _ = deliver_round(store, api, job_id)
        assert sum(len(d["requests"]) for d in docs) == 2
        summary = reconcile_job(store, job_id)
        assert summary.counts["cancelled"] == 10
        assert summary.cost_usd <= 1.4

    def test_the_budget_is_held_against_the_audit_trail_not_the_running_total(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        api, job_id = budget_for_two_of_three_requests(store, start_simulator, make_api)
        # An earlier try was billed $0.70, then died before adding it to the job's spent_usd.
        store.llm_calls.insert_one({"job_id": job_id, "billed": True, "cost_usd": 0.7})
        docs, _ = deliver_round(store, api, job_id)
        # $0.70 left: one $0.6625 request fits, not two.
        assert sum(len(d["requests"]) for d in docs) == 1

    def test_a_batch_that_fails_validation_fails_its_tasks_without_a_re_send(
        self,
        store: JobStore,
        start_simulator: StartSimulator,
        make_api: Callable[..., BatchApiClient],
    ) -> None:
        sim = start_simulator(**FAST, batch_outcome="failed")
        api = make_api(sim)
        job_id = new_job(store, seed(store, 10))
        _, delivered = deliver_round(store, api, job_id)
        assert delivered.statuses == {"failed": 1}
        assert provider_output.next_step(store, job_id, delivered) == "done"
        summary = reconcile_job(store, job_id)
        assert summary.counts["failed"] == 10
        assert "failed" in summary.top_errors[0]["example"]


def test_the_dry_run_estimate_shows_both_deliveries(store: JobStore) -> None:
    from llm_batch.estimate import Prices, estimate_job
    from llm_batch.service import LLMService

    task_ids = seed(store, 20)
    service = LLMService(
        adapter="openai",
        model="sim-small",
        prices=Prices(PRICE_IN, PRICE_OUT),
        batch_prices=Prices(PRICE_IN / 2, PRICE_OUT / 2),
    )
    estimate = estimate_job(store, task_ids, instructions=None, model=None, service=service)
    assert estimate.batch_cost_usd == pytest.approx(estimate.cost_usd / 2, abs=1e-6)
    assert f"${estimate.batch_cost_usd:.4f}" in estimate.render()
    assert "provider's batch API" in estimate.render()
