"""What all workers share about each endpoint: its request and token budget, and its health.

Every worker's client asks `RateLimiter.acquire` before each request and tells
`RateLimiter.record` what came back. Both are read-modify-writes of one small
`EndpointRecord` per endpoint, kept in a `LimiterStore`: `MemoryLimiterStore` within a
process (tests, one-off scripts), `llm_batch.limiter_store.MongoLimiterStore` across processes
and machines. The math is pure and lives here, so every store behaves the same.

Budget. Requests (and tokens) are paced by GCRA, the "virtual scheduling" form of a
leaky bucket: each endpoint keeps the time its next request may start (`request_tat`);
a request reserves the slot at `max(now, request_tat)` and moves it on by
`window_s / limit`. Reserved slots are at least that far apart, so no rolling window
of `window_s` ever holds more than `limit` starts; a burst of workers is queued, not
refused. The limit in force is the smaller of the configured one and the one the
service announces in `x-ratelimit-limit-*`, times `factor` (halved by a 429, regrown by
successes), times `1 - headroom` (slack for network jitter between the slot and arrival).

Health. `active` -> `overloaded` (429/503: nobody sends before `until`) -> `active` again
once `until` passes. `active` -> `unreachable` (a connect failure, or
`FAILURES_TO_UNREACHABLE` failed attempts in a row): rests for a doubling cooldown, then
one worker at a time claims a probe (a lease in `until`); a probe's success makes it
`active`, its failure doubles the rest. Times are wall-clock seconds (`time.time`):
workers on several machines compare them, so their clocks must be synchronized (NTP).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

HEADROOM = 0.05
"""Share of each limit left unused: slack for jitter between a reserved slot and arrival."""
MIN_FACTOR = 0.1
"""A run of 429s never slows an endpoint below this share of its limit."""
RELAX_STEP = 0.05
"""Share of the limit regained per success after a 429 halved it."""
FAILURES_TO_UNREACHABLE = 3
"""Failed attempts in a row (5xx, timeouts, resets) that make an endpoint unreachable."""
PROBE_LEASE_S = 30.0
"""How long other workers leave an unreachable endpoint alone while one worker probes it."""


class EndpointState(str, Enum):
    """The health of an endpoint as all workers see it."""

    ACTIVE = "active"
    """Requests go to it (subject to its budget)."""
    OVERLOADED = "overloaded"
    """It answered 429 or 503, or announced no requests remaining: nothing is sent before
    `until`, then it is active again."""
    UNREACHABLE = "unreachable"
    """Connections to it fail: it rests until `until`, then one worker probes it."""


class Feedback(str, Enum):
    """What one attempt says about the endpoint that handled it."""

    SUCCEEDED = "succeeded"
    """A usable answer."""
    RATE_LIMITED = "rate_limited"
    """429."""
    OVERLOADED = "overloaded"
    """503."""
    UNREACHABLE = "unreachable"
    """No connection could be made (refused, connect timeout, DNS)."""
    FAILED = "failed"
    """Another transient failure: 5xx, read timeout, reset, unreadable body."""
    REJECTED = "rejected"
    """A final answer about the request (400, 401, 404, 413, ...): the endpoint is up."""


@dataclass(frozen=True)
class EndpointPolicy:
    """How one endpoint is limited and rested: from the connection's settings."""

    endpoint_id: str
    rpm: int = 0
    """Requests per `window_s`; 0: none configured (the service's headers may still set one)."""
    tpm: int = 0
    """Tokens per `window_s`; 0: none configured."""
    window_s: float = 60.0
    cooldown_base_s: float = 1.0
    cooldown_max_s: float = 60.0


@dataclass(frozen=True)
class EndpointRecord:
    """What all workers share about one endpoint; one document in the store."""

    state: EndpointState = EndpointState.ACTIVE
    until: float = 0.0
    """End of the cooldown (overloaded, unreachable) or of a probe's lease."""
    failures: int = 0
    """Failed attempts since the last answer."""
    request_tat: float = 0.0
    """When the next request may start (GCRA's theoretical arrival time)."""
    token_tat: float = 0.0
    """When the next request's tokens may start flowing."""
    factor: float = 1.0
    """Share of the limit in use: halved by a 429, regrown by successes."""
    learned_rpm: int = 0
    """The limit from `x-ratelimit-limit-requests`; 0: never announced."""
    learned_tpm: int = 0

    def to_document(self) -> dict[str, Any]:
        """Return the record as plain values for a store."""
        document = asdict(self)
        document["state"] = self.state.value
        return document

    @classmethod
    def from_document(cls, document: Mapping[str, Any] | None) -> EndpointRecord:
        """Read a record written by `to_document`; unknown fields are ignored."""
        if not document:
            return cls()
        values = {name: document[name] for name in cls.__dataclass_fields__ if name in document}
        values["state"] = EndpointState(values.get("state", EndpointState.ACTIVE.value))
        return cls(**values)


@dataclass(frozen=True)
class Grant:
    """The answer to `acquire`."""

    usable: bool
    """False: the endpoint is cooling down until `until`; nothing was reserved."""
    wait_s: float = 0.0
    """Sleep this long, then send: the slot is reserved."""
    at: float = 0.0
    """When the reserved slot starts."""
    probe: bool = False
    """This request probes an endpoint that was unreachable."""
    state: EndpointState = EndpointState.ACTIVE
    until: float = 0.0
    record: EndpointRecord | None = None
    """The record as the grant left it, to tell later whether feedback changes anything."""


def effective_limit(configured: int, learned: int) -> int:
    """Return the tighter of two limits, 0 meaning none."""
    limits = [limit for limit in (configured, learned) if limit > 0]
    return min(limits) if limits else 0


def interval(window_s: float, limit: int, factor: float, headroom: float) -> float:
    """Return the seconds between slots that keep a window under `limit`."""
    return window_s / (limit * factor * (1.0 - headroom))


def reserve(
    record: EndpointRecord,
    policy: EndpointPolicy,
    tokens: int,
    now: float,
    *,
    force: bool = False,
    headroom: float = HEADROOM,
) -> tuple[EndpointRecord, Grant]:
    """Reserve the next slot for one request of about `tokens` tokens, or say why not.

    `force` skips the health check: the caller already waited out the cooldown.
    """
    if not force and record.state is not EndpointState.ACTIVE and record.until > now:
        return record, Grant(False, state=record.state, until=record.until, record=record)
    probe = not force and record.state is EndpointState.UNREACHABLE
    rpm = effective_limit(policy.rpm, record.learned_rpm)
    tpm = effective_limit(policy.tpm, record.learned_tpm)
    start = now
    if rpm:
        start = max(start, record.request_tat)
    if tpm:
        start = max(start, record.token_tat)
    updated = record
    if rpm:
        step = interval(policy.window_s, rpm, record.factor, headroom)
        updated = replace(updated, request_tat=start + step)
    if tpm:
        step = interval(policy.window_s, tpm, record.factor, headroom)
        updated = replace(updated, token_tat=start + max(tokens, 1) * step)
    if probe:
        # Other workers leave it alone while this probe is out; if this worker dies, the
        # lease runs out and another probes.
        updated = replace(updated, until=start + PROBE_LEASE_S)
    grant = Grant(
        True, wait_s=start - now, at=start, probe=probe, state=updated.state, until=updated.until
    )
    return updated, replace(grant, record=updated)


def apply_feedback(
    record: EndpointRecord,
    policy: EndpointPolicy,
    feedback: Feedback,
    now: float,
    *,
    headers: Mapping[str, str] | None = None,
    cooldown_s: float = 0.0,
    tokens_estimate: int = 0,
    tokens_used: int | None = None,
    headroom: float = HEADROOM,
) -> EndpointRecord:
    """Return the record after an attempt: health, learned limits, factor, token correction."""
    updated = learn_from_headers(record, headers or {}, now)
    if feedback is Feedback.SUCCEEDED or feedback is Feedback.REJECTED:
        cooling = updated.state is EndpointState.OVERLOADED and updated.until > now
        updated = replace(
            updated,
            failures=0,
            # Another worker's fresh 429 still stands; an answer proves reachability only.
            state=updated.state if cooling else EndpointState.ACTIVE,
            until=updated.until if cooling else 0.0,
        )
        if feedback is Feedback.SUCCEEDED and updated.factor < 1.0:
            updated = replace(updated, factor=min(1.0, updated.factor + RELAX_STEP))
    elif feedback is Feedback.RATE_LIMITED:
        until = max(updated.until if updated.state is not EndpointState.ACTIVE else 0.0,
                    now + cooldown_s)  # fmt: skip
        updated = replace(
            updated,
            state=EndpointState.OVERLOADED,
            until=until,
            factor=max(MIN_FACTOR, updated.factor / 2),
            # Whoever comes back first after the cooldown starts the pacing again.
            request_tat=max(updated.request_tat, until),
        )
    elif feedback is Feedback.OVERLOADED:
        until = max(updated.until if updated.state is not EndpointState.ACTIVE else 0.0,
                    now + cooldown_s)  # fmt: skip
        updated = replace(
            updated, state=EndpointState.OVERLOADED, until=until, failures=updated.failures + 1
        )
    elif feedback is Feedback.UNREACHABLE or feedback is Feedback.FAILED:
        failures = updated.failures + 1
        if feedback is Feedback.UNREACHABLE or failures >= FAILURES_TO_UNREACHABLE:
            rest = min(policy.cooldown_max_s, policy.cooldown_base_s * 2 ** (failures - 1))
            updated = replace(
                updated, state=EndpointState.UNREACHABLE, until=now + rest, failures=failures
            )
        else:
            updated = replace(updated, failures=failures)
    tpm = effective_limit(policy.tpm, updated.learned_tpm)
    if tpm and tokens_used is not None and tokens_used != tokens_estimate:
        # The reservation paid for an estimate; settle the difference with the actual usage.
        step = interval(policy.window_s, tpm, updated.factor, headroom)
        updated = replace(
            updated, token_tat=updated.token_tat + (tokens_used - tokens_estimate) * step
        )
    return updated


def learn_from_headers(
    record: EndpointRecord, headers: Mapping[str, str], now: float
) -> EndpointRecord:
    """Adopt the limits a service announces, and rest an endpoint that says none remain."""
    lowered = {name.lower(): value for name, value in headers.items()}
    updated = record
    for kind in ("requests", "tokens"):
        limit = _int_header(lowered.get(f"x-ratelimit-limit-{kind}"))
        if limit and kind == "requests":
            updated = replace(updated, learned_rpm=limit)
        elif limit:
            updated = replace(updated, learned_tpm=limit)
        remaining = _int_header(lowered.get(f"x-ratelimit-remaining-{kind}"))
        reset_s = parse_duration(lowered.get(f"x-ratelimit-reset-{kind}"))
        if remaining == 0 and reset_s:
            until = now + reset_s
            if updated.state is EndpointState.ACTIVE or updated.until < until:
                updated = replace(updated, state=EndpointState.OVERLOADED, until=until)
    return updated


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str | None) -> float | None:
    """Read a reset time as OpenAI sends it (`6m0s`, `1.5s`, `120ms`) or bare seconds."""
    if not value or not value.strip():
        return None
    text = value.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
        seconds = sum(float(number) * scale[unit] for number, unit in parts)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _int_header(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


class LimiterStore(Protocol):
    """Where the records live: one atomic read-modify-write per call."""

    def load(self, endpoint_id: str) -> EndpointRecord:
        """Return the endpoint's record (a fresh one if there is none)."""
        ...

    def modify(
        self, endpoint_id: str, change: Callable[[EndpointRecord], tuple[EndpointRecord, T]]
    ) -> T:
        """Apply `change` atomically (it may run more than once) and return its result.

        A change that returns the record unchanged writes nothing.
        """
        ...


class MemoryLimiterStore:
    """Records in a dict: shared by the clients of one process."""

    def __init__(self) -> None:
        self._records: dict[str, EndpointRecord] = {}
        self._lock = threading.Lock()

    def load(self, endpoint_id: str) -> EndpointRecord:
        """Return the endpoint's record."""
        with self._lock:
            return self._records.get(endpoint_id, EndpointRecord())

    def modify(
        self, endpoint_id: str, change: Callable[[EndpointRecord], tuple[EndpointRecord, T]]
    ) -> T:
        """Apply `change` under the lock."""
        with self._lock:
            updated, result = change(self._records.get(endpoint_id, EndpointRecord()))
            self._records[endpoint_id] = updated
            return result


class RateLimiter:
    """Pace requests per endpoint and share endpoint health, through a `LimiterStore`."""

    def __init__(
        self,
        store: LimiterStore | None = None,
        *,
        clock: Callable[[], float] = time.time,
        headroom: float = HEADROOM,
    ) -> None:
        self.store: LimiterStore = store if store is not None else MemoryLimiterStore()
        self._clock = clock
        self.headroom = headroom

    def now(self) -> float:
        """Return the wall-clock time the records are kept in."""
        return self._clock()

    def acquire(self, policy: EndpointPolicy, tokens: int, *, force: bool = False) -> Grant:
        """Reserve a slot for one request on the endpoint, or report its cooldown."""
        now = self._clock()

        def change(record: EndpointRecord) -> tuple[EndpointRecord, Grant]:
            return reserve(record, policy, tokens, now, force=force, headroom=self.headroom)

        grant = self.store.modify(policy.endpoint_id, change)
        if grant.usable:
            # Time spent racing other writers is time already waited.
            grant = replace(grant, wait_s=max(0.0, grant.at - self._clock()))
        return grant

    def record(
        self,
        policy: EndpointPolicy,
        feedback: Feedback,
        *,
        grant: Grant | None = None,
        headers: Mapping[str, str] | None = None,
        cooldown_s: float = 0.0,
        tokens_estimate: int = 0,
        tokens_used: int | None = None,
    ) -> EndpointRecord | None:
        """Tell the store what an attempt showed; return the record, or None if unchanged.

        Given the attempt's grant, feedback that would change nothing in the record the
        grant saw (the common success) is not written.
        """
        now = self._clock()

        def updated_from(record: EndpointRecord) -> EndpointRecord:
            return apply_feedback(
                record,
                policy,
                feedback,
                now,
                headers=headers,
                cooldown_s=cooldown_s,
                tokens_estimate=tokens_estimate,
                tokens_used=tokens_used,
                headroom=self.headroom,
            )

        seen = grant.record if grant is not None else None
        if seen is not None and updated_from(seen) == seen:
            return None

        def change(record: EndpointRecord) -> tuple[EndpointRecord, EndpointRecord | None]:
            updated = updated_from(record)
            return updated, (updated if updated != record else None)

        return self.store.modify(policy.endpoint_id, change)

    def state(self, endpoint_id: str) -> EndpointRecord:
        """Return the endpoint's shared record (for logs, tests and operators)."""
        return self.store.load(endpoint_id)
