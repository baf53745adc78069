"""Which `llm_params` a job may send, checked before the job exists: pure, no I/O.

A job's `llm_params` go into every request body of every batch. Checked only when a
batch is built, a bad one fails every batch of the job, each of them several times,
and an unchecked one reaches the provider as it is (`service_tier`, `store`, a 1e9
`max_tokens`). `check_llm_params` is the gate at job creation: an allow-list of
sampling parameters per adapter, with types and ranges, an output-token ceiling taken
from the connection, and a size cap. The adapters keep their own in-batch checks as a
second line of defence.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from llm_hook.adapters import OUTPUT_SCHEMA_PARAM, RESERVED_PARAMS

MAX_LLM_PARAMS_BYTES = 8192
"""Cap on the canonical JSON of `llm_params`: it rides in every request and cache key.
Room for a structured `output_schema`; sampling parameters alone take a few dozen bytes."""
MAX_TOKEN_PARAMS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
"""Params that bound a request's output tokens."""
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
SEED_LIMIT = 2**63
"""Seeds are 64-bit signed integers at the providers."""

Check = Callable[[str, Any, int], "str | None"]
"""Return why `llm_params.<name>=value` is unusable, or None; the int is the token ceiling."""


def _number(low: float, high: float) -> Check:
    def check(name: str, value: Any, ceiling: int) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"llm_params.{name} must be a number from {low:g} to {high:g}, got {value!r}"
        if not math.isfinite(value) or not low <= value <= high:
            return f"llm_params.{name}={value!r} must be from {low:g} to {high:g}"
        return None

    return check


def _integer(low: int, high: int | None = None) -> Check:
    def check(name: str, value: Any, ceiling: int) -> str | None:
        top = high if high is not None else ceiling
        if isinstance(value, bool) or not isinstance(value, int):
            return f"llm_params.{name} must be a whole number, got {value!r}"
        if not low <= value <= top:
            return f"llm_params.{name}={value} must be from {low} to {top}"
        return None

    return check


def _max_tokens(name: str, value: Any, ceiling: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"llm_params.{name} must be a whole number >= 1, got {value!r}"
    if value > ceiling:
        return (
            f"llm_params.{name}={value} is above the connection's ceiling of {ceiling} "
            "output tokens: lower it, or raise `max_tokens_ceiling` in the connection's extra"
        )
    return None


def _stop(name: str, value: Any, ceiling: int) -> str | None:
    sequences = [value] if isinstance(value, str) else value
    if (
        not isinstance(sequences, list)
        or not 1 <= len(sequences) <= MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in sequences)
    ):
        return (
            f"llm_params.{name} must be a string or a list of 1 to {MAX_STOP_SEQUENCES} "
            f"non-empty strings of at most {MAX_STOP_CHARS} characters"
        )
    return None


def _schema(name: str, value: Any, ceiling: int) -> str | None:
    if not isinstance(value, dict) or not value:
        return f'llm_params.{name} must be a JSON schema object, e.g. {{"type": "string"}}'
    return None


SAMPLING: dict[str, Check] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "top_k": _integer(-1, 100_000),
    "seed": _integer(-SEED_LIMIT, SEED_LIMIT - 1),
    "stop": _stop,
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    **dict.fromkeys(MAX_TOKEN_PARAMS, _max_tokens),
}
"""Sampling parameters both protocols take."""

ALLOWED: dict[str, dict[str, Check]] = {
    "batch": SAMPLING,
    "openai": {
        **SAMPLING,
        "min_p": _number(0, 1),
        "repetition_penalty": _number(0, 2),
        OUTPUT_SCHEMA_PARAM: _schema,
    },
}
"""Per adapter: every `llm_params` name it may send, with its check."""


def check_llm_params(
    adapter: str,
    params: Mapping[str, Any] | None,
    *,
    max_tokens_ceiling: int,
    max_bytes: int = MAX_LLM_PARAMS_BYTES,
) -> list[str]:
    """Return what is wrong with a job's `llm_params` for this adapter; empty when usable.

    Each problem is a sentence that says what to change. `max_tokens_ceiling` is the
    connection's `max_tokens_ceiling` setting.
    """
    if params is None:
        return []
    if not isinstance(params, Mapping):
        return ['llm_params must be a JSON object, e.g. {"temperature": 0}']
    allowed = ALLOWED.get(adapter)
    if allowed is None:
        return [f"Unknown adapter {adapter!r}; known adapters: {', '.join(ALLOWED)}"]
    problems: list[str] = []
    try:
        size = len(
            json.dumps(params, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        )
    except (TypeError, ValueError) as exc:
        problems.append(f"llm_params must hold plain JSON values (no NaN or infinity): {exc}")
    else:
        if size > max_bytes:
            problems.append(
                f"llm_params take {size} bytes as JSON, more than the {max_bytes} allowed: "
                "keep to sampling parameters and a compact output_schema"
            )
    for name, value in params.items():
        if adapter == "openai" and name in RESERVED_PARAMS:
            problems.append(
                f"llm_params.{name} is set by the openai adapter itself: remove it from the "
                "job's llm_params"
            )
        elif name not in allowed:
            problems.append(
                f"llm_params.{name} is not a parameter the {adapter} adapter sends: remove it "
                f"(allowed: {', '.join(sorted(allowed))})"
            )
        else:
            problem = allowed[name](name, value, max_tokens_ceiling)
            if problem is not None:
                problems.append(problem)
    # Two names for one bound: which one the service obeys is unclear (and the openai
    # adapter sends max_output_tokens as max_tokens, so one would silently replace the other).
    bounds = [name for name in MAX_TOKEN_PARAMS if name in params]
    if len(bounds) > 1:
        problems.append(f"llm_params set {' and '.join(bounds)}: give only one output-token bound")
    return problems


def requested_max_tokens(params: Mapping[str, Any] | None) -> int | None:
    """Return the output-token bound `llm_params` ask for, or None when they set none."""
    for name in MAX_TOKEN_PARAMS:
        bound = (params or {}).get(name)
        if isinstance(bound, int) and not isinstance(bound, bool) and bound > 0:
            return bound
    return None
