"""The values the LLM client takes and returns: plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any


class OutcomeStatus(str, Enum):
    """How one task ended inside one `LLMClient.complete` call."""

    SUCCEEDED = "succeeded"
    """The service returned an output for this task."""
    FAILED = "failed"
    """Permanent for this task (item error `invalid_input`, `content_filtered`, a 400/422,
    a 413 on a single task). Sending it again would fail again."""
    RETRYABLE = "retryable"
    """Still unresolved after the client's bounded attempts (5xx, timeouts, resets,
    item errors `overloaded`/`internal`, protocol faults). Safe to send again later."""
    ABORTED = "aborted"
    """The request hit 401/403/404: the job must stop and spend nothing more."""
    REFUSED = "refused"
    """The caller's `before_send` refused the next request (e.g. the budget is spent), so this
    task got no answer and nothing more was sent. `error_type` is the caller's reason."""


@dataclass(frozen=True)
class LLMTask:
    """One task to send: its id (unique within a request) and its JSON input."""

    id: str
    input: Any


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens, self.output_tokens + other.output_tokens
        )


@dataclass(frozen=True)
class TaskOutcome:
    """The final word on one task of a `complete` call."""

    task_id: str
    status: OutcomeStatus
    output: Any = None
    confidence: float | None = None
    usage: Usage = field(default_factory=Usage)
    error_type: str | None = None
    """Machine-readable reason when not succeeded, e.g. `invalid_input`, `http_503`,
    `timeout`, `missing_id`, `unauthorized`."""
    error_message: str | None = None
    """What happened and what to do next, for a person."""
    attempts: int = 1
    """HTTP requests that carried this task."""
    latency_ms: int = 0
    """Latency of the request that resolved this task (or of the last one tried)."""
    model: str | None = None


@dataclass(frozen=True)
class CallRecord:
    """One HTTP attempt, for the `llm_calls` audit trail. Emitted as it happens."""

    endpoint: str
    """Base URL + path of the attempt, without credentials."""
    attempt: int
    """1-based count of HTTP requests made by this `complete` call."""
    http_status: int | None
    """None when no response arrived (timeout, connection error)."""
    error_type: str | None
    """None for a 200 whose body parsed; else e.g. `http_429`, `timeout`, `connection_error`,
    `bad_json`."""
    latency_ms: int
    usage: Usage
    """Usage the service reported (what it bills); zero when it reported none."""
    cost_usd: float
    """Usage priced with the connection's per-1k-token prices."""
    task_ids: tuple[str, ...]
    model: str
    idempotency_key: str | None
    at: datetime
    """UTC time the request was sent."""
    replayed: bool = False
    """The service answered from its idempotency store: it billed this usage once, for an
    earlier request with the same key, whose answer may or may not have reached a client.
    Count it only if that earlier answer was not counted."""
