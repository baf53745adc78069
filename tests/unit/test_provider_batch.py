"""The simulator's batch API state machine on a set clock, and the pure parts of delivery."""

from __future__ import annotations

import json
from typing import Any

import pytest
import urllib3

from llm_batch import provider_batch
from llm_batch.provider_batch import RequestLine, split
from llm_batch.request import InvalidJobRequest, parse_job_request
from llm_batch_dev.simulator.batch_api import BatchApi
from llm_batch_dev.simulator.config import SimulatorConfig
from llm_batch_dev.simulator.protocol import ApiError
from llm_batch_dev.simulator.state import SimulatorState
from llm_hook import ClientSettings
from llm_hook.adapters import OpenAIAdapter
from llm_hook.types import LLMTask


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_api(**settings: Any) -> tuple[BatchApi, Clock]:
    clock = Clock()
    config = SimulatorConfig.from_mapping(
        {
            "batch_validating_s": 1,
            "batch_in_progress_s": 10,
            "batch_finalizing_s": 1,
            "batch_cancelling_s": 1,
            "seed": 1,
            **settings,
        }
    )
    return BatchApi(SimulatorState(config, None), clock), clock


def input_file(requests: int) -> bytes:
    adapter = OpenAIAdapter()
    lines = []
    for n in range(requests):
        tasks = [LLMTask(f"t{n}-{i}", {"text": f"doc {n} {i}"}) for i in range(10)]
        path, body = adapter.build_request(tasks, "sim-small", "Tag it.", None)
        lines.append(
            json.dumps({"custom_id": f"job:batch:{n}", "method": "POST", "url": path, "body": body})
        )
    return ("\n".join(lines) + "\n").encode()


def submit(api: BatchApi, requests: int) -> str:
    body, content_type = urllib3.encode_multipart_formdata(
        {"purpose": "batch", "file": ("in.jsonl", input_file(requests))}
    )
    _, uploaded = api.handle("POST", "/v1/files", {}, body, content_type)
    create = {
        "input_file_id": uploaded["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"llm_batch_key": "k"},
    }
    _, batch = api.handle("POST", "/v1/batches", {}, json.dumps(create).encode(), "")
    return str(batch["id"])


def get(api: BatchApi, batch_id: str) -> dict[str, Any]:
    return dict(api.handle("GET", f"/v1/batches/{batch_id}", {}, b"", "")[1])


def lines_of(api: BatchApi, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = api.handle("GET", f"/v1/files/{file_id}/content", {}, b"", "")[1]
    return [json.loads(line) for line in content.splitlines()]


class TestSimulatorBatchLifecycle:
    def test_a_batch_moves_through_its_states_and_answers_every_request(self) -> None:
        api, clock = make_api()
        batch_id = submit(api, 5)
        seen = []
        for at in (0.5, 2, 11.5, 13):
            clock.now = 1000 + at
            seen.append(get(api, batch_id)["status"])
        assert seen == ["validating", "in_progress", "finalizing", "completed"]
        batch = get(api, batch_id)
        assert batch["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
        output = lines_of(api, batch["output_file_id"])
        assert sorted(line["custom_id"] for line in output) == [f"job:batch:{n}" for n in range(5)]
        body = output[0]["response"]["body"]
        assert output[0]["response"]["status_code"] == 200
        parsed = OpenAIAdapter().parse_response(body, [f"t0-{i}" for i in range(10)])
        assert {item.status.value for item in parsed.items.values()} == {"succeeded"}
        assert batch["error_file_id"] is None

    def test_an_expired_batch_answers_its_done_share_and_lists_the_rest_as_errors(self) -> None:
        api, clock = make_api(batch_outcome="expired", batch_done_fraction=0.6)
        batch_id = submit(api, 5)
        clock.now += 100
        batch = get(api, batch_id)
        assert batch["status"] == "expired"
        assert len(lines_of(api, batch["output_file_id"])) == 3
        errors = lines_of(api, batch["error_file_id"])
        assert [line["error"]["code"] for line in errors] == ["batch_expired"] * 2

    def test_a_cancel_passes_through_cancelling_and_keeps_the_answers_so_far(self) -> None:
        api, clock = make_api()
        batch_id = submit(api, 10)
        clock.now += 1 + 5  # half of in_progress
        assert api.handle("POST", f"/v1/batches/{batch_id}/cancel", {}, b"", "")[1]["status"] == (
            "cancelling"
        )
        clock.now += 2
        batch = get(api, batch_id)
        assert batch["status"] == "cancelled"
        assert len(lines_of(api, batch["output_file_id"])) == 5
        assert api.stats()["cancel_requests"] == 1

    def test_a_file_over_the_request_limit_fails_validation(self) -> None:
        api, clock = make_api(batch_max_requests_per_file=2)
        batch_id = submit(api, 3)
        clock.now += 2
        batch = get(api, batch_id)
        assert batch["status"] == "failed"
        assert batch["errors"]["data"][0]["code"] == "too_many_requests"
        assert batch["output_file_id"] is None

    def test_batches_are_listed_newest_first_page_by_page(self) -> None:
        api, clock = make_api()
        ids = []
        for _ in range(3):
            ids.append(submit(api, 1))
            clock.now += 1
        first = api.handle("GET", "/v1/batches", {"limit": ["2"]}, b"", "")[1]
        assert [b["id"] for b in first["data"]] == ids[::-1][:2] and first["has_more"]
        after = {"limit": ["2"], "after": [first["data"][-1]["id"]]}
        rest = api.handle("GET", "/v1/batches", after, b"", "")[1]
        assert [b["id"] for b in rest["data"]] == ids[:1] and not rest["has_more"]
        assert api.stats()["batches_created"] == 3

    def test_unknown_ids_get_404(self) -> None:
        api, _ = make_api()
        with pytest.raises(ApiError) as caught:
            api.handle("GET", "/v1/batches/nope", {}, b"", "")
        assert caught.value.status == 404


def line(n: int, size: int) -> RequestLine:
    return RequestLine(f"j:batch:{n}", n, [f"t{n}"], b"x" * size, 10)


class TestSplit:
    def test_split_keeps_each_file_within_the_request_limit(self) -> None:
        parts = split([line(n, 10) for n in range(5)], max_requests=2, max_bytes=10_000)
        assert [len(p) for p in parts] == [2, 2, 1]

    def test_split_keeps_each_file_within_the_byte_limit(self) -> None:
        parts = split([line(n, 99) for n in range(5)], max_requests=100, max_bytes=250)
        assert [len(p) for p in parts] == [2, 2, 1]

    def test_the_fingerprint_depends_on_the_content_only(self) -> None:
        lines = [line(n, 10) for n in range(3)]
        assert provider_batch.fingerprint(lines) == provider_batch.fingerprint(list(lines))
        assert provider_batch.fingerprint(lines) != provider_batch.fingerprint(lines[:2])


class TestDeliveryOption:
    def test_delivery_defaults_to_sync(self) -> None:
        request = parse_job_request({"filter": {}})
        assert (request.delivery, request.resend_via) == ("sync", "provider_batch")

    def test_delivery_takes_provider_batch(self) -> None:
        request = parse_job_request(
            {"filter": {}, "delivery": "provider_batch", "resend_via": "sync"}
        )
        assert request.to_document()["delivery"] == "provider_batch"

    def test_an_unknown_delivery_is_refused_with_the_choices(self) -> None:
        with pytest.raises(
            InvalidJobRequest, match="delivery 'fax' is not one of sync, provider_batch"
        ):
            parse_job_request({"filter": {}, "delivery": "fax"})

    def test_sync_jobs_and_fallbacks_run_the_mapped_batches(self) -> None:
        assert provider_batch.wants_sync_batches({"params": {"delivery": "sync"}})
        assert not provider_batch.wants_sync_batches({"params": {"delivery": "provider_batch"}})
        assert provider_batch.wants_sync_batches(
            {"params": {"delivery": "provider_batch"}, "provider_batch": {"then": "sync"}}
        )


class TestBatchPrices:
    def settings(self, **extra: Any) -> ClientSettings:
        return ClientSettings(
            base_url="http://x",
            api_key="k",
            model="m",
            adapter="openai",
            price_input_per_1k=1.0,
            price_output_per_1k=3.0,
            **extra,
        )

    def test_batch_prices_default_to_half_the_sync_prices(self) -> None:
        assert self.settings().batch_prices == (0.5, 1.5)

    def test_batch_prices_can_be_set(self) -> None:
        prices = self.settings(batch_price_input_per_1k=0.2, batch_price_output_per_1k=0.7)
        assert prices.batch_prices == (0.2, 0.7)

    def test_only_the_openai_adapter_has_a_provider_batch_api(self) -> None:
        assert self.settings().supports_provider_batch
        assert not ClientSettings(
            base_url="http://x", api_key="k", model="m"
        ).supports_provider_batch


class TestTrigger:
    def make(self) -> Any:
        from llm_batch.orchestration.provider_batch_trigger import ProviderBatchTrigger

        return ProviderBatchTrigger("job-1", llm_conn_id="llm", mongo_conn_id="mongo", poll_s=0.01)

    def test_the_trigger_serializes_to_what_rebuilds_it(self) -> None:
        import importlib

        path, kwargs = self.make().serialize()
        module, name = path.rsplit(".", 1)
        rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
        assert rebuilt.serialize() == (path, kwargs)

    def test_the_trigger_fires_once_every_batch_has_ended_and_survives_a_failed_poll(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import asyncio

        trigger = self.make()
        answers: list[Any] = [
            RuntimeError("mongo away"),
            {"done": False, "status": "in_progress"},
            {"done": True, "status": "completed", "job_id": "job-1"},
        ]

        def poll_once() -> dict[str, Any]:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return dict(answer)

        monkeypatch.setattr(trigger, "poll_once", poll_once)

        async def first_event() -> Any:
            async for event in trigger.run():
                return event
            return None

        event = asyncio.run(first_event())
        assert event.payload["status"] == "completed" and answers == []


class TestShowingTheStatus:
    VIEW = {
        "status": "in_progress",
        "batches": [
            {"id": "batch_1", "round": 0, "status": "in_progress",
             "request_counts": {"total": 200, "completed": 120, "failed": 0}},
        ],
    }  # fmt: skip

    def test_llm_batch_status_shows_the_provider_batch(self) -> None:
        from llm_batch.reconcile import render_summary

        text = render_summary({"job_id": "j", "state": "running", "provider_batch": self.VIEW})
        assert "provider  batch API in_progress (batch_1 in_progress 120/200)" in text

    def test_the_run_note_shows_the_provider_batch(self) -> None:
        from llm_batch.orchestration.run_events import summary_note

        note = summary_note({"job_id": "j", "state": "succeeded", "provider_batch": self.VIEW})
        assert "- provider: batch API in_progress (batch_1 in_progress 120/200)" in note
