"""The shared rate limit and endpoint health: pure math on a fake clock, in-memory store."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from llm_hook.pacing import (
    FAILURES_TO_UNREACHABLE,
    MIN_FACTOR,
    PROBE_LEASE_S,
    RELAX_STEP,
    EndpointPolicy,
    EndpointRecord,
    EndpointState,
    Feedback,
    MemoryLimiterStore,
    RateLimiter,
    apply_feedback,
    effective_limit,
    parse_duration,
    reserve,
)

EP = "http://llm-a.test"


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def limiter(clock: FakeClock, headroom: float = 0.0) -> RateLimiter:
    return RateLimiter(MemoryLimiterStore(), clock=clock, headroom=headroom)


def count_in_windows(starts: list[float], window_s: float) -> int:
    """Return the most starts in any half-open window (t - window_s, t].

    Starts a float rounding error short of a window apart count as a window apart.
    """
    starts = sorted(starts)
    most, first = 0, 0
    for last, at in enumerate(starts):
        while starts[first] <= at - window_s + 1e-9:
            first += 1
        most = max(most, last - first + 1)
    return most


# --- pacing --------------------------------------------------------------------------


def test_a_burst_is_queued_one_interval_apart() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP, rpm=120, window_s=60.0)
    waits = [rl.acquire(policy, 10).wait_s for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])


def test_an_idle_endpoint_grants_at_once() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP, rpm=120, window_s=60.0)
    rl.acquire(policy, 10)
    clock.advance(5)
    assert rl.acquire(policy, 10).wait_s == 0.0


@pytest.mark.parametrize("headroom", [0.0, 0.05])
def test_no_rolling_window_ever_holds_more_than_the_limit(headroom: float) -> None:
    """Many workers asking at random moments: the reserved starts obey every window."""
    clock = FakeClock()
    rl = limiter(clock, headroom)
    policy = EndpointPolicy(EP, rpm=120, window_s=5.0)
    rng = random.Random(3)
    starts = []
    for _ in range(2_000):
        clock.advance(rng.expovariate(60.0))  # asks at ~60/s, far above 24/s allowed
        grant = rl.acquire(policy, 10)
        starts.append(clock.now + grant.wait_s)
    assert count_in_windows(starts, 5.0) <= int(120 * (1 - headroom))
    # ... and the limit is used, not starved: the starts span about the time they need.
    assert max(starts) - min(starts) == pytest.approx(2_000 * 5.0 / (120 * (1 - headroom)), 0.01)


def test_headroom_leaves_a_share_of_the_limit_unused() -> None:
    clock = FakeClock()
    rl = limiter(clock, headroom=0.05)
    policy = EndpointPolicy(EP, rpm=100, window_s=60.0)
    rl.acquire(policy, 1)
    assert rl.acquire(policy, 1).wait_s == pytest.approx(60 / 95)


def test_without_limits_nothing_is_written() -> None:
    writes: list[EndpointRecord] = []

    class CountingStore(MemoryLimiterStore):
        def modify(self, endpoint_id: str, change: Callable[[EndpointRecord], Any]) -> Any:
            def spy(record: EndpointRecord) -> tuple[EndpointRecord, Any]:
                updated, result = change(record)
                if updated != record:
                    writes.append(updated)
                return updated, result

            return super().modify(endpoint_id, spy)

    rl = RateLimiter(CountingStore(), clock=FakeClock())
    policy = EndpointPolicy(EP)
    for _ in range(3):
        grant = rl.acquire(policy, 100)
        assert grant.usable and grant.wait_s == 0.0
        assert rl.record(policy, Feedback.SUCCEEDED, grant=grant) is None
    assert writes == []


def test_tokens_are_paced_and_settled_with_the_actual_usage() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP, tpm=1_000, window_s=60.0)  # 0.06 s per token
    first = rl.acquire(policy, 500)
    assert first.wait_s == 0.0
    # The estimate reserved 30 s of token time; the service reports 100 tokens used.
    rl.record(policy, Feedback.SUCCEEDED, grant=first, tokens_estimate=500, tokens_used=100)
    second = rl.acquire(policy, 500)
    assert second.wait_s == pytest.approx(6.0)


def test_the_request_and_token_budgets_both_hold() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP, rpm=60, tpm=6_000, window_s=60.0)
    assert rl.acquire(policy, 10).wait_s == 0.0
    assert rl.acquire(policy, 10).wait_s == pytest.approx(1.0)  # the request budget binds
    assert rl.acquire(policy, 1_000).wait_s == pytest.approx(2.0)
    assert rl.acquire(policy, 10).wait_s == pytest.approx(12.0)  # now the tokens bind


# --- learning from the service -------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "announced", "interval_s"),
    [(0, 60, 1.0), (120, 60, 1.0), (30, 60, 2.0), (120, None, 0.5)],
    ids=["announced-only", "announced-tighter", "configured-tighter", "configured-only"],
)
def test_the_tighter_of_configured_and_announced_limits_applies(
    configured: int, announced: int | None, interval_s: float
) -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP, rpm=configured, window_s=60.0)
    grant = rl.acquire(policy, 1)
    headers = {"x-ratelimit-limit-requests": str(announced)} if announced else {}
    rl.record(policy, Feedback.SUCCEEDED, grant=grant, headers=headers)
    clock.advance(100)
    rl.acquire(policy, 1)
    assert rl.acquire(policy, 1).wait_s == pytest.approx(interval_s)


def test_no_requests_remaining_rests_the_endpoint_until_the_reset() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP)
    grant = rl.acquire(policy, 1)
    headers = {
        "X-RateLimit-Limit-Requests": "100",
        "X-RateLimit-Remaining-Requests": "0",
        "X-RateLimit-Reset-Requests": "1m30s",
    }
    record = rl.record(policy, Feedback.SUCCEEDED, grant=grant, headers=headers)
    assert record is not None and record.state is EndpointState.OVERLOADED
    assert rl.acquire(policy, 1).usable is False
    clock.advance(89.9)
    assert rl.acquire(policy, 1).usable is False
    clock.advance(0.2)
    assert rl.acquire(policy, 1).usable is True


def test_a_429_halves_the_rate_rests_the_endpoint_and_successes_regrow_it() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP, rpm=60, window_s=60.0)
    grant = rl.acquire(policy, 1)
    record = rl.record(policy, Feedback.RATE_LIMITED, grant=grant, cooldown_s=5.0)
    assert record is not None
    assert (record.state, record.until, record.factor) == (EndpointState.OVERLOADED, 1005.0, 0.5)

    assert rl.acquire(policy, 1).usable is False
    clock.advance(5.0)
    first = rl.acquire(policy, 1)
    assert first.usable and first.wait_s == 0.0
    assert rl.acquire(policy, 1).wait_s == pytest.approx(2.0)  # 30 per minute now

    rl.record(policy, Feedback.SUCCEEDED, grant=first)
    assert rl.state(EP).factor == pytest.approx(0.5 + RELAX_STEP)
    for _ in range(20):
        rl.record(policy, Feedback.SUCCEEDED)
    assert rl.state(EP).factor == 1.0


def test_repeated_429s_never_slow_below_the_floor() -> None:
    record = EndpointRecord()
    for _ in range(20):
        record = apply_feedback(record, EndpointPolicy(EP), Feedback.RATE_LIMITED, 0.0)
    assert record.factor == MIN_FACTOR


def test_a_success_elsewhere_does_not_cut_short_another_workers_429_cooldown() -> None:
    policy = EndpointPolicy(EP)
    limited = apply_feedback(EndpointRecord(), policy, Feedback.RATE_LIMITED, 0.0, cooldown_s=10)
    after = apply_feedback(limited, policy, Feedback.SUCCEEDED, 1.0)
    assert (after.state, after.until) == (EndpointState.OVERLOADED, 10.0)
    later = apply_feedback(limited, policy, Feedback.SUCCEEDED, 11.0)
    assert (later.state, later.until) == (EndpointState.ACTIVE, 0.0)


# --- health --------------------------------------------------------------------------


def test_an_unreachable_endpoint_rests_doubling_then_one_worker_probes_it() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP, cooldown_base_s=1.0, cooldown_max_s=8.0)
    rests = []
    for _ in range(5):
        grant = rl.acquire(policy, 1, force=True)
        record = rl.record(policy, Feedback.UNREACHABLE, grant=grant)
        assert record is not None and record.state is EndpointState.UNREACHABLE
        rests.append(record.until - clock.now)
        clock.advance(record.until - clock.now)
    assert rests == [1.0, 2.0, 4.0, 8.0, 8.0]

    probe = rl.acquire(policy, 1)
    assert probe.usable and probe.probe
    other = rl.acquire(policy, 1)
    assert not other.usable and other.until == clock.now + PROBE_LEASE_S

    rl.record(policy, Feedback.SUCCEEDED, grant=probe)
    assert rl.state(EP).state is EndpointState.ACTIVE
    assert rl.acquire(policy, 1).usable


def test_a_failed_probe_doubles_the_rest() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP, cooldown_base_s=1.0)
    rl.record(policy, Feedback.UNREACHABLE)
    clock.advance(1.0)
    probe = rl.acquire(policy, 1)
    assert probe.probe
    record = rl.record(policy, Feedback.UNREACHABLE, grant=probe)
    assert record is not None and record.until == clock.now + 2.0


def test_a_probers_lease_runs_out_if_it_never_reports() -> None:
    clock = FakeClock()
    rl = limiter(clock)
    policy = EndpointPolicy(EP, cooldown_base_s=1.0)
    rl.record(policy, Feedback.UNREACHABLE)
    clock.advance(1.0)
    assert rl.acquire(policy, 1).probe
    clock.advance(PROBE_LEASE_S)
    assert rl.acquire(policy, 1).probe


def test_failures_in_a_row_make_an_endpoint_unreachable_and_an_answer_resets_them() -> None:
    policy = EndpointPolicy(EP, cooldown_base_s=1.0)
    record = EndpointRecord()
    for _ in range(FAILURES_TO_UNREACHABLE - 1):
        record = apply_feedback(record, policy, Feedback.FAILED, 0.0)
        assert record.state is EndpointState.ACTIVE
    answered = apply_feedback(record, policy, Feedback.REJECTED, 0.0)
    assert answered.failures == 0
    record = apply_feedback(record, policy, Feedback.FAILED, 0.0)
    assert record.state is EndpointState.UNREACHABLE


def test_a_503_rests_the_endpoint_as_overloaded() -> None:
    record = apply_feedback(
        EndpointRecord(), EndpointPolicy(EP), Feedback.OVERLOADED, 0.0, cooldown_s=3
    )
    assert (record.state, record.until, record.failures) == (EndpointState.OVERLOADED, 3.0, 1)


def test_force_sends_to_a_resting_endpoint_without_claiming_a_probe() -> None:
    record = apply_feedback(EndpointRecord(), EndpointPolicy(EP), Feedback.UNREACHABLE, 0.0)
    updated, grant = reserve(record, EndpointPolicy(EP), 1, 0.5, force=True)
    assert grant.usable and not grant.probe and updated == record


# --- pieces --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("12", 12.0),
        ("0.5", 0.5),
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("1.5s", 1.5),
        ("120ms", 0.12),
        ("1h2m3s", 3723.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("5x", None),
        ("-1", None),
    ],
)
def test_reset_durations_are_read_as_openai_writes_them(
    value: str | None, seconds: float | None
) -> None:
    assert parse_duration(value) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(
    ("configured", "learned", "limit"), [(0, 0, 0), (10, 0, 10), (0, 7, 7), (10, 7, 7), (5, 7, 5)]
)
def test_effective_limit_is_the_tighter_known_one(
    configured: int, learned: int, limit: int
) -> None:
    assert effective_limit(configured, learned) == limit


def test_records_survive_a_round_trip_through_a_document() -> None:
    record = replace(
        EndpointRecord(),
        state=EndpointState.UNREACHABLE,
        until=5.5,
        failures=2,
        request_tat=3.25,
        factor=0.5,
        learned_rpm=60,
    )
    document = record.to_document()
    assert document["state"] == "unreachable"
    assert EndpointRecord.from_document({**document, "_id": EP, "version": 3}) == record
    assert EndpointRecord.from_document(None) == EndpointRecord()
