"""Wire protocols: how tasks become a request body and a response body becomes per-task results.

Two protocols: `batch` (the batch LLM API contract, `POST /v1/batch`) and `openai` (chat
completions with a strict JSON schema, for OpenAI and compatible servers).
An adapter is pure (no I/O): the client owns transport, retries and bookkeeping.
Adding a protocol means adding one small class here and registering it in
`ADAPTERS`; the connection's `adapter` setting picks it by name.
"""

from __future__ import annotations

import json
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
    whole_request: str | None = None
    """Why the answer failed as a whole although it was a 200 (`output_truncated`,
    `content_filtered`): the client splits a request of several tasks to isolate the cause,
    and applies `items` as they are to a request of one."""


class Adapter(Protocol):
    """One wire protocol."""

    name: str
    models_path: str
    path: str
    """Where requests go, appended to the endpoint's URL (as `CallRecord.endpoint` shows)."""

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
        items, unknown, unattributed = parse_results(
            body.get("results"), sent_ids, self.transient_item_errors
        )
        model = body.get("model")
        return ParsedResponse(
            items=items,
            usage=parse_usage(body.get("usage")),
            model=model if isinstance(model, str) else None,
            unknown_ids=unknown,
            unattributed=unattributed,
        )

    def parse_models(self, body: Any) -> list[str]:
        """Read `{"data": [{"id": ...}, ...]}`, the OpenAI-style model list."""
        return parse_model_list(body)


OPENAI_PREAMBLE = (
    "You complete a batch of independent tasks. The user message is a JSON object "
    '{"tasks": [{"id": "<id>", "input": <any JSON>}, ...]}. Apply the instructions below to '
    "each task's input on its own, and answer with one JSON object "
    '{"results": [{"id": "<id>", "output": <output>, "confidence": <0 to 1>}, ...]} holding '
    "exactly one result per task, its id copied exactly. If a task's input cannot be "
    'processed as instructed, answer {"id": "<id>", "error": {"type": "invalid_input", '
    '"message": "<why>"}} for that task instead.'
)
"""The fixed system text that explains the JSON contract; the job's instructions follow it."""
RESPONSE_SCHEMA_NAME = "task_results"
OUTPUT_SCHEMA_PARAM = "output_schema"
"""Job param holding the JSON schema of one task's output; it goes into the response schema."""
DEFAULT_OUTPUT_SCHEMA: dict[str, Any] = {"type": "string"}
"""Without `output_schema` each output is text: a strict schema cannot say "any JSON value"."""
PARAM_ALIASES = {"max_output_tokens": "max_tokens"}
"""Batch-contract param names that OpenAI spells differently."""
RESERVED_PARAMS = frozenset(
    {"model", "messages", "response_format", "stream", "stream_options", "n", "tools",
     "tool_choice", "functions", "function_call"}
)  # fmt: skip
"""Request fields the adapter owns: a job's params may not override the JSON contract."""


def system_prompt(instructions: str | None) -> str:
    """Return the system message the OpenAI adapter sends for a job's instructions."""
    if not instructions:
        return OPENAI_PREAMBLE
    return f"{OPENAI_PREAMBLE}\n\nInstructions:\n{instructions}"


def results_schema(ids: Sequence[str], output_schema: Mapping[str, Any]) -> dict[str, Any]:
    """Return the strict JSON schema of `{"results": [...]}` for a request with these ids."""
    task_id = {"type": "string", "enum": list(ids)}
    answered = {
        "type": "object",
        "properties": {
            "id": task_id,
            "output": dict(output_schema),
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["id", "output", "confidence"],
        "additionalProperties": False,
    }
    refused = {
        "type": "object",
        "properties": {
            "id": task_id,
            "error": {
                "type": "object",
                "properties": {
                    "type": {"type": "string", "enum": ["invalid_input"]},
                    "message": {"type": "string"},
                },
                "required": ["type", "message"],
                "additionalProperties": False,
            },
        },
        "required": ["id", "error"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {"results": {"type": "array", "items": {"anyOf": [answered, refused]}}},
        "required": ["results"],
        "additionalProperties": False,
    }


class OpenAIAdapter:
    """OpenAI chat completions: up to 10 tasks as JSON in one `POST /v1/chat/completions`.

    Works with OpenAI and compatible servers (vLLM, Ollama, LiteLLM). The answer is
    constrained by a strict `json_schema` response format whose ids are an enum of the
    sent ids, and is then checked exactly as a batch response is.
    """

    name = "openai"
    models_path = "/v1/models"
    path = "/v1/chat/completions"
    transient_item_errors = BatchAdapter.transient_item_errors

    def build_request(
        self,
        tasks: Sequence[LLMTask],
        model: str,
        instructions: str | None,
        params: Mapping[str, Any] | None,
    ) -> tuple[str, dict[str, Any]]:
        """Return the path and body of a chat completion carrying the tasks as JSON."""
        options = dict(params or {})
        output_schema = options.pop(OUTPUT_SCHEMA_PARAM, None) or DEFAULT_OUTPUT_SCHEMA
        if not isinstance(output_schema, dict):
            raise ValueError(
                f"llm_params.{OUTPUT_SCHEMA_PARAM} must be a JSON schema object, e.g. "
                '{"type": "string"}'
            )
        reserved = sorted(RESERVED_PARAMS & set(options))
        if reserved:
            raise ValueError(
                f"llm_params {', '.join(reserved)} are set by the openai adapter itself: "
                "remove them from the job's llm_params"
            )
        try:
            user = json.dumps(
                {"tasks": [{"id": task.id, "input": task.input} for task in tasks]},
                sort_keys=True,
                ensure_ascii=False,
                separators=(",", ":"),
                allow_nan=False,
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Task inputs must be plain JSON values: {exc}") from exc
        body: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": system_prompt(instructions)},
                {"role": "user", "content": user},
            ],
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": RESPONSE_SCHEMA_NAME,
                    "strict": True,
                    "schema": results_schema([task.id for task in tasks], output_schema),
                },
            },
        }
        for key, value in options.items():
            body[PARAM_ALIASES.get(key, key)] = value
        return self.path, body

    def parse_response(self, body: Any, sent_ids: Sequence[str]) -> ParsedResponse:
        """Read `choices[0]`: its finish reason, then its content as a batch of results."""
        if not isinstance(body, dict):
            raise LLMResponseError("the response body is not a JSON object")
        choices = body.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(choice, dict) or not isinstance(message, dict):
            raise LLMResponseError("the response has no `choices[0].message`")
        finish = choice.get("finish_reason")
        raw_model = body.get("model")
        model = raw_model if isinstance(raw_model, str) else None
        usage = parse_openai_usage(body.get("usage"))

        refusal = message.get("refusal")
        if finish == "content_filter" or (isinstance(refusal, str) and refusal):
            error_type = "content_filtered" if finish == "content_filter" else "refused"
            reason = (
                "the service's content filter blocked the answer"
                if finish == "content_filter"
                else f"the model refused: {clip(refusal)}"
            )
            failed = ItemResult(OutcomeStatus.FAILED, error_type=error_type, error_message=reason)
            return ParsedResponse(
                dict.fromkeys(sent_ids, failed), usage, model, whole_request=error_type
            )
        try:
            content = _json_content(message.get("content"))
        except LLMResponseError:
            if finish != "length":
                raise
            # Permanent: the same request is cut at the same limit again, billed in full
            # each time; the client still splits a request of several tasks first.
            cut = ItemResult(
                OutcomeStatus.FAILED,
                error_type="output_truncated",
                error_message="the answer hit the max_tokens limit; raise max_tokens in "
                "llm_params or ask for a shorter output",
            )
            return ParsedResponse(
                dict.fromkeys(sent_ids, cut), usage, model, whole_request="output_truncated"
            )
        if not isinstance(content, dict):
            raise LLMResponseError("the message content is not a JSON object")
        items, unknown, unattributed = parse_results(
            content.get("results"), sent_ids, self.transient_item_errors
        )
        return ParsedResponse(
            items=items,
            usage=usage,
            model=model,
            unknown_ids=unknown,
            unattributed=unattributed,
        )

    def parse_models(self, body: Any) -> list[str]:
        """Read `{"data": [{"id": ...}, ...]}`."""
        return parse_model_list(body)


ADAPTERS: dict[str, type[Adapter]] = {
    BatchAdapter.name: BatchAdapter,
    OpenAIAdapter.name: OpenAIAdapter,
}


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


def parse_results(
    results: Any, sent_ids: Sequence[str], transient_item_errors: frozenset[str]
) -> tuple[dict[str, ItemResult], tuple[str, ...], int]:
    """Check a `results` list against the sent ids: one result per id, the rest reported.

    Returns the result per sent id, the ids that were not sent, and how many items had no
    usable id. Raises LLMResponseError if `results` is not a list.
    """
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
            items[task_id] = parse_item(found[0], transient_item_errors)
    return items, tuple(unknown), unattributed


def parse_item(item: dict[str, Any], transient_item_errors: frozenset[str]) -> ItemResult:
    """Read one result item: an `output`, or a typed `error`; anything else is a fault."""
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
        OutcomeStatus.RETRYABLE if error_type in transient_item_errors else OutcomeStatus.FAILED
    )
    return ItemResult(
        status,
        usage=usage,
        error_type=error_type,
        error_message=clip(error.get("message")) or f"the service reported {error_type}",
    )


def parse_model_list(body: Any) -> list[str]:
    """Read `{"data": [{"id": ...}, ...]}`, the OpenAI-style model list."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise LLMResponseError("the models response has no `data` list")
    return [
        entry["id"]
        for entry in data
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]


def parse_openai_usage(value: Any) -> Usage:
    """Read `{"prompt_tokens": n, "completion_tokens": m}`; anything unusable counts as zero."""
    if not isinstance(value, dict):
        return Usage()
    return Usage(_count(value.get("prompt_tokens")), _count(value.get("completion_tokens")))


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


def _json_content(content: Any) -> Any:
    """Decode a message's JSON text, tolerating the Markdown fence some servers wrap it in."""
    if not isinstance(content, str) or not content.strip():
        raise LLMResponseError("the message has no text content")
    text = content.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LLMResponseError("the message content is not valid JSON") from exc


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _confidence(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None
