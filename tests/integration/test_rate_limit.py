"""The rate limit shared through MongoDB: many workers, one budget, real sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo.database import Database

from llm_batch.limiter_store import MongoLimiterStore, mongo_rate_limiter
from llm_hook import CallRecord, ClientSettings, LLMClient, LLMTask, OutcomeStatus
from llm_hook.pacing import EndpointPolicy, RateLimiter
from tests.conftest import Simulator
from tests.unit.test_ratelimit import count_in_windows

pytestmark = pytest.mark.integration

StartSimulator = Callable[..., Simulator]
LIMIT = 120
WINDOW_S = 5.0
"""The per-minute property, checked over a window 12 times shorter so the test takes seconds."""
HEADROOM = 0.1
"""The default 5% is slack for the scheduling jitter between a reserved slot and the request
leaving (up to ~150 ms with 32 threads on 2 cores); against a window 12 times shorter the
same jitter weighs 12 times more, so the scaled test leaves 10%."""
WORKERS = 32
RUN_S = 20.0


def test_32_workers_sharing_the_mongo_limiter_never_exceed_the_limit_in_any_window(
    start_simulator: StartSimulator, mongo_db: Database[Any]
) -> None:
    """120 requests per minute across 32 workers, each with its own client.

    The window is scaled: the limiter counts 120 requests per `rate_window_s` = 5 s and
    the simulator enforces 120 per `rpm_window_s` = 5 s, the same property as 120 per
    minute, twelve times faster, so the test runs for 20 s (four windows) instead of four
    minutes (with 10% headroom instead of 5%, see HEADROOM). The simulator refuses
    anything over its limit with a 429, so its peak cannot
    exceed it; what shows the limiter works is that almost nothing was refused, that the
    attempts the workers made (429s included) never exceed the limit in any window at
    the moment they were sent, and that the budget was actually used.
    """
    sim = start_simulator(latency_ms=30, rpm_limit=LIMIT, rpm_window_s=WINDOW_S)
    settings = ClientSettings(
        base_url=sim.url,
        api_key=sim.api_key,
        model="sim-small",
        rpm=LIMIT,
        rate_window_s=WINDOW_S,
        timeout_s=10.0,
        max_retry_after_s=WINDOW_S,
        backoff_base_s=0.05,
        backoff_max_s=0.5,
    )
    records: list[CallRecord] = []
    failures: list[Any] = []
    deadline = time.monotonic() + RUN_S

    def worker(number: int) -> None:
        limiter = mongo_rate_limiter(mongo_db, headroom=HEADROOM)
        client = LLMClient(settings, rate_limiter=limiter)
        try:
            sent = 0
            while time.monotonic() < deadline:
                tasks = [LLMTask(f"w{number}-r{sent}-t{i}", {"n": i}) for i in range(10)]
                outcomes = client.complete(tasks, on_call=records.append)
                failures.extend(o for o in outcomes if o.status is not OutcomeStatus.SUCCEEDED)
                sent += 1
        except BaseException as exc:  # surfaced by the test
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=RUN_S + 60)

    stats = sim.stats()
    attempts = stats["requests_by_endpoint"]["/v1/batch"]
    rejected = stats["requests_by_status"].get("429", 0)
    succeeded = stats["requests_by_status"].get("200", 0)
    sent_at = [r.at.timestamp() for r in records]
    print(  # the figures behind the assertions, for the record
        f"attempts={attempts} 200={succeeded} 429={rejected} "
        f"share_429={rejected / attempts:.4f} peak_per_window={stats['peak_requests_per_minute']} "
        f"client_side_peak={count_in_windows(sent_at, WINDOW_S)}"
    )
    assert failures == []
    assert stats["peak_requests_per_minute"] <= LIMIT
    assert rejected / attempts < 0.01
    assert count_in_windows(sent_at, WINDOW_S) <= LIMIT
    assert len(records) == attempts
    # The limit is used, not merely respected: at least 80% of it over the run.
    assert succeeded >= 0.8 * LIMIT * RUN_S / WINDOW_S


def test_concurrent_acquires_through_mongo_reserve_distinct_evenly_spaced_slots(
    mongo_db: Database[Any],
) -> None:
    """The compare-and-swap loses no update: 16 threads x 10 acquires, one slot each."""
    policy = EndpointPolicy("http://llm.test", rpm=600, window_s=60.0)  # 0.1 s apart
    now = time.time()
    slots: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        limiter = RateLimiter(
            MongoLimiterStore(mongo_db["llm_endpoints"]), clock=lambda: now, headroom=0.0
        )
        for _ in range(10):
            grant = limiter.acquire(policy, 1)
            with lock:
                slots.append(grant.wait_s)

    threads = [threading.Thread(target=take) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(slots) == pytest.approx([i * 0.1 for i in range(160)])
    document = mongo_db["llm_endpoints"].find_one({"_id": "http://llm.test"})
    assert document is not None
    assert document["request_tat"] == pytest.approx(now + 16.0)
    assert document["updated_at"] <= datetime.now(UTC).replace(tzinfo=None)
