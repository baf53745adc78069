"""The simulator's settings: one validated, immutable dataclass."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

REQUEST_FAULTS = ("error_5xx", "rate_limit", "slow", "reset", "truncate")
"""Request-level fault kinds; each has a `<kind>_rate` setting."""

ITEM_FAULTS = ("drop_id", "duplicate_id", "unknown_id", "malformed_item", "item_error")
"""Item-level fault kinds, in the order they are tried on an item; each has a `<kind>_rate`."""


@dataclass(frozen=True)
class SimulatorConfig:
    """Every setting of the simulator, settable from `--config-json` and `POST /admin/config`.

    Construction validates everything, so an instance is always usable as is.
    """

    models: tuple[str, ...] = ("sim-small", "sim-large")
    """Model names the service knows; any other gets 404."""
    max_tasks_per_request: int = 10
    """More tasks than this in one request gets 413."""
    max_body_bytes: int = 1_048_576
    """A request body larger than this gets 413."""

    latency_ms: float = 50.0
    """Mean time spent processing a request (sleeping, not burning CPU)."""
    latency_jitter_ms: float = 0.0
    """Uniform +- spread around `latency_ms`; the sleep never goes below zero."""
    max_concurrency: int = 0
    """Requests processed at once; one more gets 429 with `Retry-After: 1`. 0 = unlimited."""
    rpm_limit: int = 0
    """Accepted requests in any rolling `rpm_window_s` window; one more gets 429. 0 = unlimited."""
    rpm_window_s: float = 60.0
    """The rolling window of `rpm_limit`, `peak_requests_per_minute` and the rate-limit
    headers. Tests shrink it to check a per-minute property in seconds."""

    error_5xx_rate: float = 0.0
    """Chance a request gets 500/502/503/504 instead of processing (not billed)."""
    rate_limit_rate: float = 0.0
    """Chance a request gets a random 429 with `Retry-After: 1` (not billed)."""
    slow_rate: float = 0.0
    """Chance a request is processed and billed, then answered only after `slow_ms` more."""
    slow_ms: float = 30_000.0
    """Extra delay of a slow request: meant to exceed the client's timeout."""
    reset_rate: float = 0.0
    """Chance a request is processed and billed, then its connection is reset with no answer."""
    truncate_rate: float = 0.0
    """Chance a request is processed and billed, then answered 200 with half its JSON body."""

    drop_id_rate: float = 0.0
    """Chance an item is left out of the results (not billed)."""
    duplicate_id_rate: float = 0.0
    """Chance an item is returned twice (billed once)."""
    unknown_id_rate: float = 0.0
    """Chance an item's result comes back under an id that was not sent (billed once)."""
    malformed_item_rate: float = 0.0
    """Chance an item comes back with neither `output` nor `error` (not billed)."""
    item_error_rate: float = 0.0
    """Chance an item gets the transient item error `overloaded` or `internal` (billed)."""

    batch_validating_s: float = 0.5
    """Batch API: seconds a new batch stays `validating`."""
    batch_in_progress_s: float = 1.0
    """Batch API: seconds a batch stays `in_progress` (its requests are answered over this time)."""
    batch_finalizing_s: float = 0.5
    """Batch API: seconds a batch stays `finalizing` before its terminal status."""
    batch_cancelling_s: float = 0.5
    """Batch API: seconds a cancelled batch stays `cancelling`."""
    batch_outcome: str = "completed"
    """Batch API: how batches end: `completed`, `failed` (validation fails) or `expired`."""
    batch_done_fraction: float = 0.6
    """Batch API: share of an `expired` batch's requests answered before it expired."""
    batch_line_error_rate: float = 0.0
    """Batch API: chance a request of a batch ends in the error file (HTTP 500), not answered."""
    batch_max_requests_per_file: int = 50_000
    """Batch API: most requests one input file may hold; more fails the batch."""
    batch_max_file_bytes: int = 200 * 1_048_576
    """Batch API: largest input file accepted (413 on upload)."""

    seed: int | None = None
    """Seed of the one random generator behind every random choice; None = unpredictable.
    Setting it (or `POST /admin/reset`) restarts the sequence."""
    idempotency_max_keys: int = 200_000
    """Idempotency keys remembered; the least recently used are forgotten first."""
    request_log_size: int = 20_000
    """Accepted-request records kept for `GET /stats?requests=1`."""

    def __post_init__(self) -> None:
        if isinstance(self.models, list):
            object.__setattr__(self, "models", tuple(self.models))
        for spec in fields(self):
            _validate(spec.name, getattr(self, spec.name))

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> SimulatorConfig:
        """Build a config from defaults overridden by `settings` (raises ValueError if invalid)."""
        return cls().with_changes(settings)

    @classmethod
    def from_json(cls, text: str) -> SimulatorConfig:
        """Build a config from a JSON object of settings (raises ValueError if invalid)."""
        try:
            settings = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"settings are not valid JSON: {exc}") from exc
        if not isinstance(settings, dict):
            raise ValueError('settings must be a JSON object such as {"latency_ms": 10}')
        return cls.from_mapping(settings)

    def with_changes(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """Return a copy with `changes` applied (raises ValueError naming the bad setting)."""
        known = {spec.name for spec in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(
                f"unknown setting(s) {', '.join(unknown)}; "
                f"known settings: {', '.join(sorted(known))}"
            )
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-ready values."""
        settings = asdict(self)
        settings["models"] = list(self.models)
        return settings


_INT_MINIMUMS = {
    "max_tasks_per_request": 1,
    "max_body_bytes": 1,
    "max_concurrency": 0,
    "rpm_limit": 0,
    "idempotency_max_keys": 1,
    "request_log_size": 1,
    "batch_max_requests_per_file": 1,
    "batch_max_file_bytes": 1,
}
_SECONDS = ("batch_validating_s", "batch_in_progress_s", "batch_finalizing_s", "batch_cancelling_s")
BATCH_OUTCOMES = ("completed", "failed", "expired")
_DURATIONS = ("latency_ms", "latency_jitter_ms", "slow_ms")
_RATES = (
    *(f"{kind}_rate" for kind in (*REQUEST_FAULTS, *ITEM_FAULTS)),
    "batch_done_fraction",
    "batch_line_error_rate",
)


def _validate(name: str, value: Any) -> None:
    """Raise ValueError, in words a person can act on, if `value` is not valid for `name`."""
    if name == "models":
        if not value or not all(isinstance(model, str) and model for model in value):
            raise ValueError(f"models must be a non-empty list of model names, got {value!r}")
    elif name == "seed":
        if value is not None and not _is_int(value):
            raise ValueError(f"seed must be an integer or null, got {value!r}")
    elif name in _INT_MINIMUMS:
        minimum = _INT_MINIMUMS[name]
        if not _is_int(value) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    elif name == "rpm_window_s":
        if not _is_number(value) or value <= 0:
            raise ValueError(f"rpm_window_s must be a number of seconds > 0, got {value!r}")
    elif name in _SECONDS:
        if not _is_number(value) or value < 0:
            raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
    elif name == "batch_outcome":
        if value not in BATCH_OUTCOMES:
            raise ValueError(
                f"batch_outcome must be one of {', '.join(BATCH_OUTCOMES)}, got {value!r}"
            )
    elif name in _DURATIONS:
        if not _is_number(value) or value < 0:
            raise ValueError(f"{name} must be a number of milliseconds >= 0, got {value!r}")
    elif name in _RATES and (not _is_number(value) or not 0 <= value <= 1):
        raise ValueError(f"{name} must be a probability from 0 to 1, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
