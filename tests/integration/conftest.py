"""Fixtures for the integration tests: a store on a fresh database, clients on the simulator."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pymongo.database import Database

from llm_batch.store import JobStore
from llm_hook import ClientSettings, LLMClient
from tests.conftest import Simulator

PRICE_IN, PRICE_OUT = 0.5, 1.5  # USD per 1k tokens: large enough to compare sums


@pytest.fixture
def store(mongo_db: Database[Any]) -> JobStore:
    store = JobStore(mongo_db)
    store.ensure_indexes()
    return store


@pytest.fixture
def make_client() -> Iterator[Callable[..., LLMClient]]:
    clients: list[LLMClient] = []

    def _make(sim: Simulator, api_key: str | None = None, **overrides: Any) -> LLMClient:
        settings: dict[str, Any] = {
            "base_url": sim.url,
            "api_key": api_key or sim.api_key,
            "model": "sim-small",
            "timeout_s": 2.0,
            "connect_timeout_s": 1.0,
            "backoff_base_s": 0.01,
            "backoff_max_s": 0.05,
            "max_retry_after_s": 1.0,
            "price_input_per_1k": PRICE_IN,
            "price_output_per_1k": PRICE_OUT,
        }
        settings.update(overrides)
        client = LLMClient(ClientSettings(**settings), rng=random.Random(7))
        clients.append(client)
        return client

    yield _make
    for client in clients:
        client.close()
