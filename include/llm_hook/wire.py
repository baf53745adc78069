"""What the client's requests and answers are made of on the wire, as pure functions.

A request's canonical bytes, its Idempotency-Key and token estimate, the bearer auth,
what a `Retry-After` header and each status mean, and how long to back off before a retry.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import requests

from llm_hook.params import requested_max_tokens

PERMANENT_5XX = frozenset({501, 505})
"""Server errors that say the request itself can never work; every other 5xx may pass."""
REPLAYED_HEADER = "Idempotent-Replayed"
"""Response header a service sets when it answers a repeated Idempotency-Key from its store."""
ABORT_ERROR_TYPES = {401: "unauthorized", 403: "forbidden", 404: "not_found"}
PERMANENT_ERROR_TYPES = {400: "bad_request", 422: "unprocessable"}
OUTPUT_TOO_LARGE = "output_too_large"
"""Error type of a task whose answer is larger than the connection allows."""


def encode_body(body: Mapping[str, Any]) -> bytes:
    """Serialize a request body canonically: equal bodies give equal bytes."""
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"Task inputs and params must be plain JSON values: {exc}") from exc
    return text.encode("utf-8")


def derive_idempotency_key(base_key: str, body: bytes, round_no: int) -> str:
    """Return the Idempotency-Key of one request: sha256 of (base key, round, canonical body).

    The body holds the model, instructions, params and the tasks (sorted by id,
    with their inputs), so transport retries of a request reuse its key, and
    so does a fresh worker redoing the same unit of work: the service replays
    instead of billing twice. A later round or a 413 half is a different
    request with a different key. A key never names two different bodies,
    which servers reject (422) or, worse, answer with a stale reply.
    """
    digest = hashlib.sha256(json.dumps([base_key, round_no]).encode("utf-8"))
    digest.update(b"\n")
    digest.update(body)
    return digest.hexdigest()


def full_jitter_delay(rng: random.Random, failures: int, base_s: float, max_s: float) -> float:
    """Return a delay drawn uniformly from [0, min(max_s, base_s * 2**(failures-1))].

    Full jitter (tenacity's `wait_random_exponential`) keeps many uncoordinated
    workers from retrying against the service in lockstep.
    """
    return rng.uniform(0.0, min(max_s, base_s * 2 ** (failures - 1)))


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Return the seconds a `Retry-After` header asks for (delta-seconds or HTTP date)."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - now).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class BearerAuth(requests.auth.AuthBase):
    """Sets the bearer header; passed as `auth=` so a ~/.netrc cannot override it."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._api_key}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


def estimate_tokens(data: bytes, params: Mapping[str, Any] | None) -> int:
    """Guess a request's tokens before sending: its bytes / 4, plus its output bound.

    Without an output bound the output is guessed as large as the input. The rate
    limiter settles the difference once the service reports the real usage.
    """
    prompt = math.ceil(len(data) / 4)
    bound = requested_max_tokens(params)
    return 2 * prompt if bound is None else prompt + bound


def json_or_none(data: bytes | None) -> Any:
    """Decode a JSON body (UTF-8, -16 or -32, as `json.loads` detects); None if it is not."""
    if not data:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None
