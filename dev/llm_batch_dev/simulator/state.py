"""What the simulator's request threads share: settings, counters, randomness, stored answers.

`SimulatorState` admits requests (concurrency and requests-per-minute limits), draws each
request's random choices, bills processed requests, keeps the idempotency store and the recent
request log, and reports it all for `GET /stats`.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llm_batch_dev.simulator.config import ITEM_FAULTS, REQUEST_FAULTS, SimulatorConfig
from llm_batch_dev.simulator.protocol import (
    ITEM_ERROR_MESSAGES,
    MODELS_PATH,
    PROCESSING_PATHS,
    SERVER_ERROR_STATUSES,
    ApiError,
    ApiRequest,
    Billing,
    Draw,
)

logger = logging.getLogger("llm_batch_dev.simulator")

IDEMPOTENCY_WAIT_S = 120.0
"""How long a request waits for an earlier one with the same key before processing on its own."""


@dataclass
class IdempotencyEntry:
    """The answer stored under one idempotency key, or the promise of it while processing."""

    fingerprint: str
    finished: threading.Event = field(default_factory=threading.Event)
    body: bytes | None = None


IdempotencyKey = tuple[str, str, str]
"""(api key presented, endpoint, Idempotency-Key header)."""


@dataclass(frozen=True)
class Claim:
    """The right, and duty, to process a request and settle its idempotency entry."""

    key: IdempotencyKey
    entry: IdempotencyEntry


class SimulatorState:
    """Everything request threads share: settings, counters, the random generator, stored answers.

    One lock guards it all; nothing slow ever runs under it.
    """

    def __init__(self, config: SimulatorConfig, api_key: str | None) -> None:
        self._lock = threading.Lock()
        self.config = config
        self.api_key = api_key or None
        self._rng = random.Random(config.seed)
        self._started = time.monotonic()
        self._in_flight = 0
        self._admitted = 0
        self._idempotency: OrderedDict[IdempotencyKey, IdempotencyEntry] = OrderedDict()
        self._completion_ids = itertools.count(1)
        self._zero_counters()

    def _zero_counters(self) -> None:
        self._requests_total = 0
        self._by_status: Counter[str] = Counter()
        self._by_endpoint: Counter[str] = Counter()
        self._peak_in_flight = self._in_flight
        self._tasks_received = 0
        self._tasks_billed = 0
        self._input_tokens_billed = 0
        self._output_tokens_billed = 0
        self._replays = 0
        self._faults: Counter[str] = Counter(dict.fromkeys((*REQUEST_FAULTS, *ITEM_FAULTS), 0))
        self._rejections: Counter[str] = Counter({"concurrency": 0, "rpm": 0})
        self._window: deque[float] = deque()
        self._peak_rpm = 0
        self._billed_per_task: Counter[str] = Counter()
        self._received_per_task: Counter[str] = Counter()
        self._records: deque[dict[str, Any]] = deque(maxlen=self.config.request_log_size)

    def next_completion_id(self) -> str:
        return f"chatcmpl-sim-{next(self._completion_ids)}"

    # -- settings -------------------------------------------------------------------------

    def update_config(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """Apply a partial settings update (raises ValueError if invalid)."""
        with self._lock:
            config = self.config.with_changes(changes)
            if "seed" in changes:
                self._rng = random.Random(config.seed)
            if config.request_log_size != self.config.request_log_size:
                self._records = deque(self._records, maxlen=config.request_log_size)
            self.config = config
            self._evict_idempotency()
        logger.info(
            "config changed: %s", ", ".join(f"{name}={changes[name]!r}" for name in sorted(changes))
        )
        return config

    def reset(self) -> None:
        """Zero the counters, forget stored answers, restart the random sequence from the seed."""
        with self._lock:
            self._zero_counters()
            self._idempotency.clear()
            self._rng = random.Random(self.config.seed)
        logger.info("counters and idempotency store reset")

    # -- counting -------------------------------------------------------------------------

    def count_request(self, path: str) -> None:
        """Count a request to the API (`/v1/...`); unknown paths share one key, "other"."""
        endpoint = path if path in (*PROCESSING_PATHS, MODELS_PATH) else "other"
        with self._lock:
            self._requests_total += 1
            self._by_endpoint[endpoint] += 1

    def count_status(self, status: int) -> None:
        with self._lock:
            self._by_status[str(status)] += 1

    def count_fault(self, kind: str, times: int = 1) -> None:
        with self._lock:
            self._faults[kind] += times

    def enter(self) -> None:
        """Count a processing request as in flight, from the moment the handler sees it."""
        with self._lock:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def admit(self, config: SimulatorConfig) -> None:
        """Take a concurrency slot and a requests-per-minute slot, or raise a 429."""
        with self._lock:
            if config.max_concurrency and self._admitted >= config.max_concurrency:
                self._rejections["concurrency"] += 1
                raise ApiError(
                    429,
                    "rate_limited",
                    f"too many concurrent requests (limit {config.max_concurrency}); retry shortly",
                    retry_after_s=1,
                )
            now = time.monotonic()
            self._prune_window(now)
            if config.rpm_limit and len(self._window) >= config.rpm_limit:
                self._rejections["rpm"] += 1
                wait_s = max(1, math.ceil(self._window[0] + config.rpm_window_s - now))
                raise ApiError(
                    429,
                    "rate_limited",
                    f"rate limit of {config.rpm_limit} requests per "
                    f"{config.rpm_window_s:g} s reached; "
                    f"retry after {wait_s} s",
                    retry_after_s=wait_s,
                )
            self._admitted += 1
            self._window.append(now)
            self._peak_rpm = max(self._peak_rpm, len(self._window))

    def release(self) -> None:
        """Give back the concurrency slot taken by `admit`."""
        with self._lock:
            self._admitted -= 1

    def _prune_window(self, now: float) -> None:
        while self._window and self._window[0] <= now - self.config.rpm_window_s:
            self._window.popleft()

    def ratelimit_headers(self, config: SimulatorConfig) -> dict[str, str]:
        """Return OpenAI's `x-ratelimit-*-requests` headers, or none without an rpm limit."""
        if not config.rpm_limit:
            return {}
        with self._lock:
            now = time.monotonic()
            self._prune_window(now)
            used = len(self._window)
            reset_s = math.ceil(self._window[0] + config.rpm_window_s - now) if used else 0
        return {
            "x-ratelimit-limit-requests": str(config.rpm_limit),
            "x-ratelimit-remaining-requests": str(max(0, config.rpm_limit - used)),
            "x-ratelimit-reset-requests": f"{reset_s}s",
        }

    def draw(self, config: SimulatorConfig, item_count: int) -> Draw:
        """Draw every random choice for one request of `item_count` tasks."""
        item_rates = [getattr(config, f"{kind}_rate") for kind in ITEM_FAULTS]
        with self._lock:
            rng = self._rng
            error = rng.random() < config.error_5xx_rate
            error_status = rng.choice(SERVER_ERROR_STATUSES)
            rate_limited = rng.random() < config.rate_limit_rate
            slow = rng.random() < config.slow_rate
            reset = rng.random() < config.reset_rate
            truncate = rng.random() < config.truncate_rate
            jitter = rng.uniform(-1.0, 1.0)
            item_faults: list[str | None] = []
            item_error_types: list[str] = []
            for _ in range(item_count):
                rolls = [rng.random() for _ in ITEM_FAULTS]
                hit = (
                    kind
                    for kind, roll, rate in zip(ITEM_FAULTS, rolls, item_rates, strict=True)
                    if roll < rate
                )
                item_faults.append(next(hit, None))
                item_error_types.append(rng.choice(tuple(ITEM_ERROR_MESSAGES)))
            order_seed = rng.getrandbits(32)
        latency_ms = max(0.0, config.latency_ms + jitter * config.latency_jitter_ms)
        return Draw(
            error_status=error_status if error else None,
            rate_limited=rate_limited,
            slow=slow,
            reset=reset,
            truncate=truncate,
            latency_s=latency_ms / 1000,
            item_faults=tuple(item_faults),
            item_error_types=tuple(item_error_types),
            order_seed=order_seed,
        )

    def bill(self, billing: Billing) -> None:
        with self._lock:
            self._tasks_received += len(billing.received_ids)
            self._received_per_task.update(billing.received_ids)
            self._tasks_billed += len(billing.billed_ids)
            self._billed_per_task.update(billing.billed_ids)
            self._input_tokens_billed += billing.input_tokens
            self._output_tokens_billed += billing.output_tokens

    def record(
        self,
        request: ApiRequest,
        status: int | None,
        idempotency_key: str | None,
        *,
        replayed: bool = False,
        faults: tuple[str, ...] = (),
    ) -> None:
        """Remember one accepted request for `GET /stats?requests=1`."""
        entry = {
            "at": round(time.time(), 3),
            "endpoint": request.endpoint,
            "status": status,
            "task_ids": [task.id for task in request.tasks],
            "idempotency_key": idempotency_key,
            "replayed": replayed,
            "faults": list(faults),
        }
        with self._lock:
            if replayed:
                self._replays += 1
            self._records.append(entry)

    # -- idempotency ----------------------------------------------------------------------

    def claim_idempotency(
        self, key: IdempotencyKey, fingerprint: str, config: SimulatorConfig
    ) -> bytes | Claim | None:
        """Return a stored answer to replay, a Claim to process and store, or None.

        None means an earlier request with this key is still unsettled after a long wait:
        process without storing rather than hang.
        """
        deadline = time.monotonic() + IDEMPOTENCY_WAIT_S
        while True:
            with self._lock:
                entry = self._idempotency.get(key)
                if entry is None:
                    entry = self._idempotency[key] = IdempotencyEntry(fingerprint)
                    self._evict_idempotency()
                    return Claim(key, entry)
                self._idempotency.move_to_end(key)
                if entry.fingerprint != fingerprint:
                    raise ApiError(
                        422,
                        "idempotency_key_reused",
                        f"Idempotency-Key {key[2]!r} was first used with a different request "
                        "body; send a new key for a different request",
                    )
                if entry.body is not None:
                    return entry.body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            entry.finished.wait(remaining)

    def complete_idempotency(self, claim: Claim, body: bytes) -> None:
        with self._lock:
            claim.entry.body = body
        claim.entry.finished.set()

    def abandon_idempotency(self, claim: Claim) -> None:
        """Forget a claim whose request did not end in a storable 200; waiters then process."""
        with self._lock:
            if self._idempotency.get(claim.key) is claim.entry:
                del self._idempotency[claim.key]
        claim.entry.finished.set()

    def _evict_idempotency(self) -> None:
        while len(self._idempotency) > self.config.idempotency_max_keys:
            self._idempotency.popitem(last=False)

    # -- reporting ------------------------------------------------------------------------

    def stats(self, *, per_task: bool = False, requests: bool = False) -> dict[str, Any]:
        with self._lock:
            self._prune_window(time.monotonic())
            snapshot: dict[str, Any] = {
                "requests_total": self._requests_total,
                "requests_by_status": dict(self._by_status),
                "requests_by_endpoint": dict(self._by_endpoint),
                "in_flight": self._in_flight,
                "peak_in_flight": self._peak_in_flight,
                "tasks_received": self._tasks_received,
                "tasks_billed": self._tasks_billed,
                "input_tokens_billed": self._input_tokens_billed,
                "output_tokens_billed": self._output_tokens_billed,
                "replays": self._replays,
                "faults_injected": dict(self._faults),
                "rejections": dict(self._rejections),
                "peak_requests_per_minute": self._peak_rpm,
                "requests_last_minute": len(self._window),
                "idempotency_keys": len(self._idempotency),
                "uptime_s": round(time.monotonic() - self._started, 3),
            }
            if per_task:
                snapshot["billed_per_task"] = dict(self._billed_per_task)
                snapshot["received_per_task"] = dict(self._received_per_task)
            if requests:
                snapshot["requests"] = list(self._records)
        return snapshot
