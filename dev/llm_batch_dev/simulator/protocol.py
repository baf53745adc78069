"""The simulator's wire protocol: validating requests and building answers.

Two processing endpoints share it: `/v1/batch` (the project's batch protocol,
contracts/llm-batch-api.md) and `/v1/chat/completions` (OpenAI chat). A request that fails
validation raises `ApiError`, which is the answer to send; a valid one becomes an `ApiRequest`,
and its answer is built from the `Draw` of random choices made for it, with the `Billing` it
costs.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from typing import Any

from llm_batch_dev.simulator.config import SimulatorConfig
from llm_batch_dev.simulator.outputs import (
    PROMPT_OVERHEAD_TOKENS,
    canonical_json,
    count_tokens,
    expected_output,
    input_tokens,
    task_result,
)

BATCH_PATH = "/v1/batch"
CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
PROCESSING_PATHS = (BATCH_PATH, CHAT_PATH)

SERVER_ERROR_STATUSES = (500, 502, 503, 504)
SERVER_ERROR_TYPES = {500: "internal", 502: "bad_gateway", 503: "overloaded", 504: "timeout"}
ITEM_ERROR_MESSAGES = {
    "overloaded": "The model was overloaded while working on this task (simulated); retry it.",
    "internal": "An internal error hit this task (simulated); retry it.",
}


class ApiError(Exception):
    """A request answered with an error status instead of a result."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        retry_after_s: int | None = None,
        fault: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message
        self.retry_after_s = retry_after_s
        self.fault = fault
        """The injected fault kind that caused this answer, if any."""

    def body(self) -> bytes:
        return encode({"error": {"type": self.error_type, "message": self.message}})


@dataclass(frozen=True)
class Task:
    id: str
    input: Any


@dataclass(frozen=True)
class ApiRequest:
    """A validated request to a processing endpoint."""

    endpoint: str
    model: str
    instructions: str
    tasks: tuple[Task, ...]
    """Empty for a plain chat completion."""
    fingerprint: str
    """Hash of the whole body: an idempotency key reused with another body is refused."""
    messages: tuple[Any, ...] = ()
    user_text: str = ""
    json_mode: bool = False


@dataclass(frozen=True)
class Draw:
    """Every random choice for one request, drawn at once so a seed reproduces a request order."""

    error_status: int | None
    rate_limited: bool
    slow: bool
    reset: bool
    truncate: bool
    latency_s: float
    item_faults: tuple[str | None, ...]
    item_error_types: tuple[str, ...]
    order_seed: int
    """Seeds the shuffle of the results: the contract allows any order, so clients must cope."""


@dataclass(frozen=True)
class Billing:
    """What one processed request is billed for."""

    received_ids: tuple[str, ...]
    billed_ids: tuple[str, ...]
    input_tokens: int
    output_tokens: int


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- request parsing ----------------------------------------------------------------------


def parse_json_object(body: bytes, status: int) -> dict[str, Any]:
    """Decode a JSON object body, or raise `status` (400 for undecodable JSON)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise ApiError(status, "invalid_request", "the request body must be a JSON object")
    return payload


def parse_tasks(raw: Any, config: SimulatorConfig, status: int) -> tuple[Task, ...]:
    """Validate a `tasks` list: 1 to `max_tasks_per_request` objects with unique string ids."""
    if not isinstance(raw, list):
        raise ApiError(
            status, "invalid_request", 'tasks must be a list of {"id": "<string>", "input": <any>}'
        )
    if not raw:
        raise ApiError(status, "invalid_request", "tasks is empty: send at least one task")
    if len(raw) > config.max_tasks_per_request:
        raise ApiError(
            413,
            "too_many_tasks",
            f"{len(raw)} tasks in one request; the limit is {config.max_tasks_per_request}: "
            "split the batch",
        )
    tasks: list[Task] = []
    seen: set[str] = set()
    for position, item in enumerate(raw):
        if not isinstance(item, dict) or "input" not in item:
            raise ApiError(
                status,
                "invalid_request",
                f'tasks[{position}] must be an object with "id" and "input"',
            )
        task_id = item.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise ApiError(
                status,
                "invalid_request",
                f"tasks[{position}].id must be a non-empty string, got {type(task_id).__name__}",
            )
        if task_id in seen:
            raise ApiError(
                status,
                "invalid_request",
                f"task id {task_id!r} appears more than once; ids must be unique in a request",
            )
        seen.add(task_id)
        tasks.append(Task(task_id, item["input"]))
    return tuple(tasks)


def check_model(model: Any, config: SimulatorConfig, status: int) -> str:
    if not isinstance(model, str) or not model:
        raise ApiError(status, "invalid_request", "model must be a non-empty string")
    if model not in config.models:
        raise ApiError(
            404,
            "model_not_found",
            f"unknown model {model!r}; this service has: {', '.join(config.models)}",
        )
    return model


def fingerprint(payload: Any) -> str:
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def parse_batch_request(body: bytes, config: SimulatorConfig) -> ApiRequest:
    """Validate a `/v1/batch` body (400 bad JSON, 422 bad shape, 413 too many tasks, 404 model)."""
    payload = parse_json_object(body, 422)
    instructions = payload.get("instructions") or ""
    if not isinstance(instructions, str):
        raise ApiError(422, "invalid_request", "instructions must be a string")
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise ApiError(422, "invalid_request", "params must be an object")
    tasks = parse_tasks(payload.get("tasks"), config, 422)
    model = check_model(payload.get("model"), config, 422)
    return ApiRequest(BATCH_PATH, model, instructions, tasks, fingerprint(payload))


def message_text(content: Any) -> str:
    """Return the text of a chat message's content: a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        )
    raise ApiError(400, "invalid_request", "message content must be a string or a list of parts")


def parse_chat_request(body: bytes, config: SimulatorConfig) -> ApiRequest:
    """Validate an OpenAI chat completions body (400 for any problem, 413, 404 model)."""
    payload = parse_json_object(body, 400)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "invalid_request", "messages must be a non-empty list")
    system_parts: list[str] = []
    user_text: str | None = None
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(
                400, "invalid_request", f'messages[{position}] must be an object with a "role"'
            )
        text = message_text(message.get("content"))
        if message["role"] in ("system", "developer"):
            system_parts.append(text)
        elif message["role"] == "user":
            user_text = text
    if user_text is None:
        raise ApiError(400, "invalid_request", "messages must include a user message")
    json_mode = parse_response_format(payload.get("response_format"))
    temperature = payload.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float)
        or isinstance(temperature, bool)
        or not 0 <= temperature <= 2
    ):
        raise ApiError(400, "invalid_request", "temperature must be a number from 0 to 2")
    for name in ("max_tokens", "max_completion_tokens"):
        limit = payload.get(name)
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise ApiError(400, "invalid_request", f"{name} must be a positive integer")
    tasks = tasks_in_message(user_text, config)
    model = check_model(payload.get("model"), config, 400)
    return ApiRequest(
        CHAT_PATH,
        model,
        "\n".join(system_parts),
        tasks,
        fingerprint(payload),
        messages=tuple(messages),
        user_text=user_text,
        json_mode=json_mode,
    )


def parse_response_format(response_format: Any) -> bool:
    """Return whether the answer must be JSON."""
    if response_format is None:
        return False
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise ApiError(
            400,
            "invalid_request",
            'response_format must be {"type": "text" | "json_object" | "json_schema"}',
        )
    return kind != "text"


def tasks_in_message(user_text: str, config: SimulatorConfig) -> tuple[Task, ...]:
    """Return the tasks of a user message that is `{"tasks": [{"id", "input"}, ...]}` JSON."""
    if not user_text.lstrip().startswith("{"):
        return ()
    try:
        payload = json.loads(user_text)
    except json.JSONDecodeError:
        return ()
    if not isinstance(payload, dict) or not isinstance(payload.get("tasks"), list):
        return ()
    return parse_tasks(payload["tasks"], config, 400)


# -- results --------------------------------------------------------------------------------


def build_results(request: ApiRequest, draw: Draw) -> tuple[list[dict[str, Any]], Billing]:
    """Return the result items with the drawn item faults applied, and what they bill."""
    results: list[dict[str, Any]] = []
    billed: list[tuple[str, dict[str, int]]] = []
    sent_ids = {task.id for task in request.tasks}
    faulted = zip(request.tasks, draw.item_faults, draw.item_error_types, strict=True)
    for task, fault, error_type in faulted:
        if fault == "drop_id":
            continue
        if fault == "malformed_item":
            results.append({"id": task.id})
            continue
        item = task_result(task.input, instructions=request.instructions, model=request.model)
        if fault == "item_error":
            item = {
                "error": {"type": error_type, "message": ITEM_ERROR_MESSAGES[error_type]},
                "usage": {
                    "input_tokens": input_tokens(task.input, request.instructions),
                    "output_tokens": 0,
                },
            }
        billed.append((task.id, item["usage"]))
        if fault == "unknown_id":
            results.append({"id": unknown_id(task.id, sent_ids), **item})
        elif fault == "duplicate_id":
            results.extend([{"id": task.id, **item}, {"id": task.id, **item}])
        else:
            results.append({"id": task.id, **item})
    random.Random(draw.order_seed).shuffle(results)
    billing = Billing(
        received_ids=tuple(task.id for task in request.tasks),
        billed_ids=tuple(task_id for task_id, _ in billed),
        input_tokens=sum(usage["input_tokens"] for _, usage in billed),
        output_tokens=sum(usage["output_tokens"] for _, usage in billed),
    )
    return results, billing


def unknown_id(task_id: str, sent_ids: set[str]) -> str:
    """Return an id derived from `task_id` that the request did not send."""
    candidate = f"unknown-{hashlib.sha256(task_id.encode('utf-8')).hexdigest()[:12]}"
    while candidate in sent_ids:
        candidate += "x"
    return candidate


def batch_response(request: ApiRequest, draw: Draw) -> tuple[bytes, Billing]:
    results, billing = build_results(request, draw)
    usage = {"input_tokens": billing.input_tokens, "output_tokens": billing.output_tokens}
    return encode({"model": request.model, "results": results, "usage": usage}), billing


def chat_response(request: ApiRequest, draw: Draw, completion_id: str) -> tuple[bytes, Billing]:
    """Answer a chat completion; a `{"tasks": [...]}` user message gets `{"results": [...]}`."""
    if request.tasks:
        results, billing = build_results(request, draw)
        content = canonical_json({"results": results})
    else:
        output = expected_output(
            request.user_text, instructions=request.instructions, model=request.model
        )
        content = (
            canonical_json(output)
            if request.json_mode
            else f"{output['summary']} (digest {output['digest']})"
        )
        billing = Billing(
            received_ids=(),
            billed_ids=(),
            input_tokens=count_tokens(canonical_json(list(request.messages)))
            + PROMPT_OVERHEAD_TOKENS,
            output_tokens=count_tokens(content),
        )
    answer = {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": billing.input_tokens,
            "completion_tokens": billing.output_tokens,
            "total_tokens": billing.input_tokens + billing.output_tokens,
        },
    }
    return encode(answer), billing
