"""Wire protocols: how tasks become a request body and a response body becomes per-task results.

An adapter is pure (no I/O): the client owns transport, retries and bookkeeping.
Adding a protocol means adding one small class here and registering it in
`ADAPTERS`; the connection's `adapter` setting picks it by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llm_hook.exceptions import LLMConfigError, LLMResponseError
from llm_hook.types import LLMTask, OutcomeStatus, Usage

MAX_MESSAGE_CHARS = 500
"""Server-provided messages are cut to this length before they reach outcomes."""


@dataclass(frozen=True)
class ItemResult:
    """What the response says about one task that was sent."""

    status: OutcomeStatus
    """SUCCEEDED, FAILED (permanent), or RETRYABLE (ask again in the next round)."""
    output: Any = None
    confidence: float | None = None
    usage: Usage = field(default_factory=Usage)
    error_type: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class ParsedResponse:
    """A 200 body, checked against what was sent."""

    items: dict[str, ItemResult]
    """Exactly one result per sent id."""
    usage: Usage
    """Call-level usage: what the service bills for the request."""
    model: str | None
    unknown_ids: tuple[str, ...] = ()
    """Ids in the response that were not sent; ignored."""
    unattributed: int = 0
    """Items without a usable id; ignored (their tasks show up as missing)."""


class Adapter(Protocol):
    """One wire protocol."""

    name: str
    models_path: str

    def build_request(
        self,
        tasks: Sequence[LLMTask],
        model: str,
        instructions: str | None,
        params: Mapping[str, Any] | None,
    ) -> tuple[str, dict[str, Any]]:
        """Return the path (appended to the base URL) and the JSON body for one request."""
        ...

    def parse_response(self, body: Any, sent_ids: Sequence[str]) -> ParsedResponse:
        """Map a decoded 200 body to one result per sent id; raise LLMResponseError if unusable."""
        ...

    def parse_models(self, body: Any) -> list[str]:
        """Return the model names listed by a decoded models body."""
        ...


class BatchAdapter:
    """The batch LLM API: up to 10 tasks per `POST /v1/batch`, results by task id."""

    name = "batch"
    models_path = "/v1/models"
    path = "/v1/batch"
    transient_item_errors = frozenset({"overloaded", "internal"})
    """Item error types worth asking again; every other type is permanent for that task."""

    def build_request(
        self,
        tasks: Sequence[LLMTask],
        model: str,
        instructions: str | None,
        params: Mapping[str, Any] | None,
    ) -> tuple[str, dict[str, Any]]:
        """Return the path and body of a batch request."""
        body: dict[str, Any] = {
            "model": model,
            "tasks": [{"id": task.id, "input": task.input} for task in tasks],
        }
        if instructions is not None:
            body["instructions"] = instructions
        if params:
            body["params"] = dict(params)
        return self.path, body

    def parse_response(self, body: Any, sent_ids: Sequence[str]) -> ParsedResponse:
        """Check every item against the sent ids; never trust an id blindly."""
        if not isinstance(body, dict):
            raise LLMResponseError("the response body is not a JSON object")
        results = body.get("results")
        if not isinstance(results, list):
            raise LLMResponseError("the response body has no `results` list")
        sent = set(sent_ids)
        by_id: dict[str, list[dict[str, Any]]] = {}
        unknown: list[str] = []
        unattributed = 0
        for item in results:
            item_id = item.get("id") if isinstance(item, dict) else None
            if not isinstance(item_id, str):
                unattributed += 1
            elif item_id not in sent:
                unknown.append(item_id)
            else:
                by_id.setdefault(item_id, []).append(item)
        items: dict[str, ItemResult] = {}
        for task_id in sent_ids:
            found = by_id.get(task_id, [])
            if not found:
                items[task_id] = _fault("missing_id", "the response had no result for this task")
            elif len(found) > 1:
                # Which copy is right is unknowable, so neither is used.
                items[task_id] = _fault(
                    "duplicate_id", f"the response had {len(found)} results for this task"
                )
            else:
                items[task_id] = self._parse_item(found[0])
        model = body.get("model")
        return ParsedResponse(
            items=items,
            usage=parse_usage(body.get("usage")),
            model=model if isinstance(model, str) else None,
            unknown_ids=tuple(unknown),
            unattributed=unattributed,
        )

    def parse_models(self, body: Any) -> list[str]:
        """Read `{"data": [{"id": ...}, ...]}`, the OpenAI-style model list."""
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list):
            raise LLMResponseError("the models response has no `data` list")
        return [
            entry["id"]
            for entry in data
            if isinstance(entry, dict) and isinstance(entry.get("id"), str)
        ]

    def _parse_item(self, item: dict[str, Any]) -> ItemResult:
        has_output = "output" in item
        error = item.get("error")
        if has_output and error is not None:
            return _fault("malformed_item", "the result had both an output and an error")
        usage = parse_usage(item.get("usage"))
        if has_output:
            return ItemResult(
                OutcomeStatus.SUCCEEDED,
                output=item["output"],
                confidence=_confidence(item.get("confidence")),
                usage=usage,
            )
        if not isinstance(error, dict) or not isinstance(error.get("type"), str):
            return _fault("malformed_item", "the result had neither an output nor a typed error")
        error_type = error["type"] or "unknown_error"
        status = (
            OutcomeStatus.RETRYABLE
            if error_type in self.transient_item_errors
            else OutcomeStatus.FAILED
        )
        return ItemResult(
            status,
            usage=usage,
            error_type=error_type,
            error_message=clip(error.get("message")) or f"the service reported {error_type}",
        )


ADAPTERS: dict[str, type[Adapter]] = {BatchAdapter.name: BatchAdapter}


def make_adapter(name: str) -> Adapter:
    """Return a fresh adapter for a protocol name."""
    try:
        return ADAPTERS[name]()
    except KeyError as exc:
        raise LLMConfigError(
            f"Unknown adapter {name!r}; known adapters: {', '.join(ADAPTERS)}."
        ) from exc


def parse_usage(value: Any) -> Usage:
    """Read `{"input_tokens": n, "output_tokens": m}`; anything unusable counts as zero."""
    if not isinstance(value, dict):
        return Usage()
    return Usage(_count(value.get("input_tokens")), _count(value.get("output_tokens")))


def error_detail(body: Any) -> tuple[str | None, str | None]:
    """Return the type and message of an error body `{"error": {"type": ..., "message": ...}}`."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None
    error_type = error.get("type")
    return (error_type if isinstance(error_type, str) and error_type else None), clip(
        error.get("message")
    )


def clip(message: Any) -> str | None:
    """Return a server message as a bounded string, or None if there is none."""
    if not isinstance(message, str) or not message:
        return None
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 1] + "…"


def _fault(error_type: str, message: str) -> ItemResult:
    return ItemResult(OutcomeStatus.RETRYABLE, error_type=error_type, error_message=message)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _confidence(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None
