"""Estimate what a job will cost before anything is sent.

Input tokens are counted from the payloads with the common rule of thumb (about four
characters a token, plus a little framing per task). Output tokens cannot be known before
the model answers, so they come from history: the output tokens billed for recent requests of
the same model through the same connection (its endpoints), per task sent. Answers of other
models or other services say nothing about this one and are left out.

The estimate says how many answers it rests on. On a thin basis (fewer than
`SOLID_BASIS_ANSWERS`, or none: then `DEFAULT_OUTPUT_TOKENS` is assumed) it gives a range,
not a point. A `max_tokens` in `llm_params` bounds the output of every task: it is the range's
upper end, and caps the expectation.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llm_batch.batching import batch_count
from llm_batch.config import LOOKUP_CHUNK
from llm_batch.service import LLMService, Prices
from llm_batch.store import JobStore
from llm_hook.params import requested_max_tokens

__all__ = ["CostEstimate", "OutputBasis", "Prices", "estimate_job", "output_basis"]

CHARS_PER_TOKEN = 4
FRAMING_TOKENS_PER_TASK = 8
DEFAULT_OUTPUT_TOKENS = 64
HISTORY_SAMPLE = 1000
"""Recent billed requests of the model and connection whose output tokens are averaged."""
SOLID_BASIS_ANSWERS = 50
"""Answers from which the average is given as a point; below, as a range."""
THIN_SPREAD = 2.0
"""On a thin basis the range spans the average divided and multiplied by this (wider when the
answers seen spread further)."""
NO_BASIS_SPREAD = 4.0
"""Without any history, the assumed output spans this factor either way."""


@dataclass(frozen=True)
class OutputBasis:
    """Output tokens per task expected from history: the mean, its range, how many answers."""

    per_task: float
    low: float
    high: float
    answers: int


@dataclass(frozen=True)
class CostEstimate:
    """The expected spend of a job, its range, and what the expectation rests on."""

    task_count: int
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    model: str | None
    basis: str
    basis_answers: int
    """Answers of the same model and connection the output tokens are averaged over."""
    output_tokens_low: int
    output_tokens_high: int
    cost_usd_low: float
    cost_usd_high: float
    batch_cost_usd: float | None = None
    """The same tokens at the provider's batch prices (`delivery=provider_batch`), if known."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        return (
            f"estimate for {self.task_count} tasks in {self.requests} requests: "
            f"{self.input_tokens} input + {render_range(self.to_dict())} ({self.basis})"
            + (
                f"; through the provider's batch API (answered within 24 h): "
                f"${self.batch_cost_usd:.4f}"
                if self.batch_cost_usd is not None
                else ""
            )
        )


def render_range(estimate: Mapping[str, Any]) -> str:
    """Return the output tokens and cost of an estimate's dict: a range when it has one."""
    # An estimate recorded before ranges existed has none: it is a point.
    low = estimate.get("output_tokens_low", estimate["output_tokens"])
    high = estimate.get("output_tokens_high", estimate["output_tokens"])
    if low == high:
        return f"{estimate['output_tokens']} output tokens, ${estimate['cost_usd']:.4f}"
    return (
        f"{low} to {high} output tokens (about {estimate['output_tokens']}), "
        f"${estimate['cost_usd_low']:.4f} to ${estimate['cost_usd_high']:.4f} "
        f"(about ${estimate['cost_usd']:.4f})"
    )


def payload_tokens(payload: Any, instructions: str | None) -> int:
    """Return the input tokens one task is expected to be billed for."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return math.ceil((len(text) + len(instructions or "")) / CHARS_PER_TOKEN) + (
        FRAMING_TOKENS_PER_TASK
    )


def output_basis(store: JobStore, service: LLMService, model: str) -> OutputBasis:
    """Return the output tokens per task of `model`'s recent requests through `service`.

    A service may answer with a dated name (`gpt-4o-mini-2024-07-18` for `gpt-4o-mini`):
    names that extend the model's after a `-` count as the model.
    """
    query: dict[str, Any] = {
        "endpoint": {"$in": list(service.call_urls)},
        "model": {"$regex": f"^{re.escape(model)}(-[0-9][-0-9]*)?$"},
        "usage.output_tokens": {"$gt": 0},
    }
    calls = list(
        store.llm_calls.find(query, {"usage.output_tokens": 1, "task_ids": 1})
        .sort("at", -1)
        .limit(HISTORY_SAMPLE)
    )
    per_call = [(call["usage"]["output_tokens"], len(call.get("task_ids") or ())) for call in calls]
    per_call = [(tokens, tasks) for tokens, tasks in per_call if tasks]
    answers = sum(tasks for _, tasks in per_call)
    if not answers:
        default = float(DEFAULT_OUTPUT_TOKENS)
        return OutputBasis(default, default / NO_BASIS_SPREAD, default * NO_BASIS_SPREAD, 0)
    mean = sum(tokens for tokens, _ in per_call) / answers
    if answers >= SOLID_BASIS_ANSWERS:
        return OutputBasis(mean, mean, mean, answers)
    seen = [tokens / tasks for tokens, tasks in per_call]
    return OutputBasis(
        mean, min(mean / THIN_SPREAD, *seen), max(mean * THIN_SPREAD, *seen), answers
    )


def estimate_job(
    store: JobStore,
    task_ids: Sequence[Any],
    *,
    instructions: str | None,
    model: str | None,
    service: LLMService,
    llm_params: Mapping[str, Any] | None = None,
) -> CostEstimate:
    """Estimate tokens and cost of sending `task_ids` once each through `service`."""
    model = model or service.model
    input_tokens = sum(payload_tokens(p, instructions) for p in _payloads(store, task_ids))
    history = output_basis(store, service, model)
    per_task, low, high = history.per_task, history.low, history.high
    bound = requested_max_tokens(llm_params)
    if bound is not None:
        # No task can be billed more output than it asks for: the true upper end.
        per_task, low, high = min(per_task, bound), min(low, bound), float(bound)
    count = len(task_ids)
    where = f"{model} through this connection"
    if not history.answers:
        basis = (
            f"no answers of {where} yet: assumed {DEFAULT_OUTPUT_TOKENS} output tokens a task, "
            f"range {low:.0f} to {high:.0f}"
        )
    elif history.answers < SOLID_BASIS_ANSWERS:
        basis = (
            f"only {history.answers} answers of {where} so far, averaging {history.per_task:.0f} "
            f"output tokens: a range of {low:.0f} to {high:.0f} a task"
        )
    else:
        basis = (
            f"output tokens averaged over {history.answers} recent answers of {where} "
            f"({history.per_task:.0f} a task)"
        )
    if bound is not None:
        basis += f"; llm_params cap the output at {bound} tokens a task"
    prices = service.prices
    return CostEstimate(
        task_count=count,
        requests=batch_count(count),
        input_tokens=input_tokens,
        output_tokens=round(per_task * count),
        cost_usd=round(prices.cost(input_tokens, per_task * count), 6),
        model=model,
        basis=basis,
        basis_answers=history.answers,
        output_tokens_low=round(low * count),
        output_tokens_high=round(high * count),
        cost_usd_low=round(prices.cost(input_tokens, low * count), 6),
        cost_usd_high=round(prices.cost(input_tokens, high * count), 6),
        batch_cost_usd=(
            round(service.batch_prices.cost(input_tokens, per_task * count), 6)
            if service.batch_prices is not None
            else None
        ),
    )


def _payloads(store: JobStore, task_ids: Sequence[Any]) -> Iterable[Any]:
    for start in range(0, len(task_ids), LOOKUP_CHUNK):
        yield from store.task_payloads(task_ids[start : start + LOOKUP_CHUNK]).values()
