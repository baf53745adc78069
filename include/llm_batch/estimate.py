"""Estimate what a job will cost before anything is sent.

Input tokens are counted from the payloads with the common rule of thumb (about four
characters a token, plus a little framing per task). Output tokens cannot be known before
the model answers, so they come from history: the average output tokens of recent
answered tasks of the same model. Without history, `DEFAULT_OUTPUT_TOKENS` is assumed and the
estimate says so.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from llm_batch.batching import batch_count
from llm_batch.config import LOOKUP_CHUNK
from llm_batch.store import JobStore

CHARS_PER_TOKEN = 4
FRAMING_TOKENS_PER_TASK = 8
DEFAULT_OUTPUT_TOKENS = 64
HISTORY_SAMPLE = 1000
"""Recent results of the model whose output tokens are averaged."""


@dataclass(frozen=True)
class Prices:
    """USD per 1000 tokens of one model."""

    input_per_1k: float
    output_per_1k: float

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.input_per_1k + output_tokens * self.output_per_1k) / 1000


@dataclass(frozen=True)
class CostEstimate:
    """The expected spend of a job, and what the expectation rests on."""

    task_count: int
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    model: str | None
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        return (
            f"estimate for {self.task_count} tasks in {self.requests} requests: "
            f"{self.input_tokens} input + {self.output_tokens} output tokens, "
            f"${self.cost_usd:.4f} ({self.basis})"
        )


def payload_tokens(payload: Any, instructions: str | None) -> int:
    """Return the input tokens one task is expected to be billed for."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return math.ceil((len(text) + len(instructions or "")) / CHARS_PER_TOKEN) + (
        FRAMING_TOKENS_PER_TASK
    )


def average_output_tokens(store: JobStore, model: str | None) -> tuple[float, int]:
    """Return the mean output tokens of recent answered tasks of `model`, and the sample size."""
    query: dict[str, Any] = {"status": {"$in": ["succeeded", "needs_review"]}}
    query["usage.output_tokens"] = {"$gt": 0}
    if model:
        query["model"] = model
    sample = list(
        store.results.find(query, {"usage.output_tokens": 1})
        .sort("updated_at", -1)
        .limit(HISTORY_SAMPLE)
    )
    if not sample:
        return float(DEFAULT_OUTPUT_TOKENS), 0
    return sum(doc["usage"]["output_tokens"] for doc in sample) / len(sample), len(sample)


def estimate_job(
    store: JobStore,
    task_ids: Sequence[Any],
    *,
    instructions: str | None,
    model: str | None,
    prices: Prices,
) -> CostEstimate:
    """Estimate tokens and cost of sending `task_ids` once each."""
    input_tokens = sum(payload_tokens(p, instructions) for p in _payloads(store, task_ids))
    per_task_output, sample = average_output_tokens(store, model)
    output_tokens = round(per_task_output * len(task_ids))
    basis = (
        f"output tokens averaged over {sample} recent answers of {model or 'any model'}"
        if sample
        else f"no answers of {model or 'any model'} yet: assumed {DEFAULT_OUTPUT_TOKENS} "
        "output tokens a task"
    )
    return CostEstimate(
        task_count=len(task_ids),
        requests=batch_count(len(task_ids)),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=round(prices.cost(input_tokens, output_tokens), 6),
        model=model,
        basis=basis,
    )


def _payloads(store: JobStore, task_ids: Sequence[Any]) -> Iterable[Any]:
    for start in range(0, len(task_ids), LOOKUP_CHUNK):
        yield from store.task_payloads(task_ids[start : start + LOOKUP_CHUNK]).values()


def prices_for(
    model: str | None, table: Mapping[str, Mapping[str, float]], default: Prices
) -> Prices:
    """Return the model's prices from a price table (`{model: {input_per_1k, output_per_1k}}`)."""
    entry = table.get(model or "")
    if entry is None:
        return default
    return Prices(float(entry["input_per_1k"]), float(entry["output_per_1k"]))
