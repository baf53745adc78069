"""The simulator's HTTP server: batch and OpenAI endpoints, faults, idempotency, stats.

A request to `/v1/batch` or `/v1/chat/completions` goes through these steps, and each step's
failure is answered without going further:

    read body (413) -> auth (401) -> validate (400/422/413/404)
    -> admit: concurrency (429) and requests-per-minute (429)      <- "accepted" from here on
    -> idempotency: replay a stored answer, or wait for the first request with the same key
    -> request faults: 5xx or random 429 (not processed, not billed)
    -> process: sleep the latency, build results with item faults, bill, store for idempotency
    -> deliver: maybe slow, then reset, truncated or whole
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import itertools
import json
import logging
import math
import random
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from llm_batch.simulator.config import ITEM_FAULTS, REQUEST_FAULTS, SimulatorConfig
from llm_batch.simulator.outputs import (
    PROMPT_OVERHEAD_TOKENS,
    canonical_json,
    count_tokens,
    expected_output,
    input_tokens,
    task_result,
)

logger = logging.getLogger("llm_batch.simulator")

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
ADMIN_MAX_BODY_BYTES = 1_048_576
DISCARD_LIMIT_BYTES = 64 * 1_048_576
"""An oversized body up to this size is read and thrown away so the connection stays usable."""
IDEMPOTENCY_WAIT_S = 120.0
"""How long a request waits for an earlier one with the same key before processing on its own."""
KEEP_ALIVE_IDLE_S = 300
SHUTDOWN_POLL_S = 0.1
"""How often the accept loop checks for a stop request: a SIGTERM takes effect this fast."""


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


@dataclass(frozen=True)
class Billing:
    """What one processed request is billed for."""

    received_ids: tuple[str, ...]
    billed_ids: tuple[str, ...]
    input_tokens: int
    output_tokens: int


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


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


# -- HTTP -------------------------------------------------------------------------------------


class SimulatorHandler(BaseHTTPRequestHandler):
    """Serve one connection; HTTP/1.1 keep-alive, so possibly many requests."""

    server: SimulatorServer
    protocol_version = "HTTP/1.1"
    server_version = "llm-batch-simulator/1"
    disable_nagle_algorithm = True
    """Headers and body go out as two writes: with Nagle on, the second waits for a delayed ACK."""
    timeout = KEEP_ALIVE_IDLE_S

    @property
    def state(self) -> SimulatorState:
        return self.server.state

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._send_json(200, {"status": "ok"})
        elif url.path == "/stats":
            query = parse_qs(url.query)
            self._send_json(
                200,
                self.state.stats(
                    per_task=_flag(query, "per_task"), requests=_flag(query, "requests")
                ),
            )
        elif url.path == "/admin/config":
            self._send_json(200, self.state.config.to_dict())
        elif url.path.startswith("/v1/"):
            self._serve_api_get(url.path)
        else:
            self._send_json(404, _error_body("not_found", f"no such path {url.path}"))

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if path in PROCESSING_PATHS:
            self._serve_processing(path)
        elif path.startswith("/v1/"):
            self.state.count_request(path)
            with contextlib.suppress(ApiError):
                self._read_body(ADMIN_MAX_BODY_BYTES)
            if path == MODELS_PATH:
                error = ApiError(405, "method_not_allowed", f"use GET for {path}")
            else:
                error = ApiError(404, "not_found", f"no such endpoint {path}")
            self._send_api(error, path)
        elif path == "/admin/config":
            self._serve_admin_config()
        elif path == "/admin/reset":
            with contextlib.suppress(ApiError):
                self._read_body(ADMIN_MAX_BODY_BYTES)
            self.state.reset()
            self._send_json(200, {"status": "reset"})
        else:
            with contextlib.suppress(ApiError):
                self._read_body(ADMIN_MAX_BODY_BYTES)
            self._send_json(404, _error_body("not_found", f"no such path {path}"))

    def _method_not_allowed(self) -> None:
        with contextlib.suppress(ApiError):
            self._read_body(ADMIN_MAX_BODY_BYTES)
        self._send_json(405, _error_body("method_not_allowed", f"{self.command} is not supported"))

    do_PUT = do_PATCH = do_DELETE = _method_not_allowed

    # -- processing endpoints -------------------------------------------------------------

    def _serve_processing(self, endpoint: str) -> None:
        state = self.state
        config = state.config
        state.count_request(endpoint)
        state.enter()
        request: ApiRequest | None = None
        admitted = False
        idempotency_key = self.headers.get("Idempotency-Key") or None
        try:
            body = self._read_body(config.max_body_bytes)
            self._authorize()
            if endpoint == BATCH_PATH:
                request = parse_batch_request(body, config)
            else:
                request = parse_chat_request(body, config)
            state.admit(config)
            admitted = True
            self._process(request, config, idempotency_key)
        except ApiError as error:
            self._send_api(error, endpoint, config)
            if admitted and request is not None:
                faults = (error.fault,) if error.fault else ()
                state.record(request, error.status, idempotency_key, faults=faults)
        except (ConnectionError, TimeoutError):
            raise
        except Exception:
            logger.exception("bug in the simulator while serving %s", endpoint)
            self.close_connection = True
            self._send_api(ApiError(500, "internal", "simulator bug; see its log"), endpoint)
        finally:
            if admitted:
                state.release()
            state.leave()

    def _process(
        self, request: ApiRequest, config: SimulatorConfig, idempotency_key: str | None
    ) -> None:
        state = self.state
        claim: Claim | None = None
        if idempotency_key is not None:
            scope = (self._presented_key(), request.endpoint, idempotency_key)
            stored = state.claim_idempotency(scope, request.fingerprint, config)
            if isinstance(stored, bytes):
                replayed = {"Idempotent-Replayed": "true"}
                # Count first: a client that reads /stats right after the answer must see it.
                state.record(request, 200, idempotency_key, replayed=True)
                self._send_api(200, request.endpoint, config, stored, replayed)
                return
            claim = stored
        draw = state.draw(config, len(request.tasks))
        try:
            if draw.error_status is not None:
                state.count_fault("error_5xx")
                raise ApiError(
                    draw.error_status,
                    SERVER_ERROR_TYPES[draw.error_status],
                    f"simulated server error {draw.error_status}; retry with backoff",
                    fault="error_5xx",
                )
            if draw.rate_limited:
                state.count_fault("rate_limit")
                raise ApiError(
                    429,
                    "rate_limited",
                    "simulated rate limit; retry after 1 s",
                    retry_after_s=1,
                    fault="rate_limit",
                )
            time.sleep(draw.latency_s)
            if request.endpoint == BATCH_PATH:
                body, billing = batch_response(request, draw)
            else:
                body, billing = chat_response(request, draw, state.next_completion_id())
            state.bill(billing)
            self._count_item_faults(draw)
            if claim is not None:
                state.complete_idempotency(claim, body)
                claim = None
        finally:
            if claim is not None:
                state.abandon_idempotency(claim)
        status, faults = self._deliver(request, config, draw, body)
        state.record(request, status, idempotency_key, faults=faults)

    def _count_item_faults(self, draw: Draw) -> None:
        for kind, times in Counter(fault for fault in draw.item_faults if fault).items():
            self.state.count_fault(kind, times)

    def _deliver(
        self, request: ApiRequest, config: SimulatorConfig, draw: Draw, body: bytes
    ) -> tuple[int | None, tuple[str, ...]]:
        """Send a processed answer, maybe late, cut or not at all; return status and faults."""
        faults: list[str] = []
        if draw.slow:
            faults.append("slow")
            self.state.count_fault("slow")
            time.sleep(config.slow_ms / 1000)
        if draw.reset:
            faults.append("reset")
            self.state.count_fault("reset")
            self._reset_connection()
            if self.server.verbose:
                logger.info("%s %s reset (no answer)", self.command, request.endpoint)
            return None, tuple(faults)
        if draw.truncate:
            faults.append("truncate")
            self.state.count_fault("truncate")
            body = body[: len(body) // 2]
        self._send_api(200, request.endpoint, config, body)
        return 200, tuple(faults)

    def _reset_connection(self) -> None:
        """Close the connection with a TCP RST and no answer, as a crashing proxy would."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The socket closes for real (sending the RST) only once its file objects are closed;
        # http.server still flushes wfile after the handler returns, so give it a harmless one.
        self.wfile.close()
        self.rfile.close()
        self.connection.close()
        self.wfile = io.BytesIO()

    # -- other endpoints ------------------------------------------------------------------

    def _serve_api_get(self, path: str) -> None:
        self.state.count_request(path)
        if path in PROCESSING_PATHS:
            self._send_api(ApiError(405, "method_not_allowed", f"use POST for {path}"), path)
            return
        if path != MODELS_PATH:
            self._send_api(ApiError(404, "not_found", f"no such endpoint {path}"), path)
            return
        try:
            self._authorize()
        except ApiError as error:
            self._send_api(error, path)
            return
        models = [
            {"id": model, "object": "model", "created": 0, "owned_by": "simulator"}
            for model in self.state.config.models
        ]
        self._send_api(200, path, None, encode({"object": "list", "data": models}))

    def _serve_admin_config(self) -> None:
        try:
            changes = parse_json_object(self._read_body(ADMIN_MAX_BODY_BYTES) or b"{}", 400)
            config = self.state.update_config(changes) if changes else self.state.config
        except ApiError as error:
            self._send_bytes(error.status, error.body(), {})
            return
        except ValueError as exc:
            self._send_json(400, _error_body("invalid_config", str(exc)))
            return
        self._send_json(200, config.to_dict())

    # -- plumbing -------------------------------------------------------------------------

    def _authorize(self) -> None:
        expected = self.state.api_key
        if expected is None:
            return
        if not hmac.compare_digest(self._presented_key().encode(), expected.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "missing or wrong API key: send 'Authorization: Bearer <key>' with the key the "
                "simulator was started with (--api-key)",
            )

    def _presented_key(self) -> str:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    def _read_body(self, limit: int) -> bytes:
        """Read the body, or raise 411/400/413 (draining or closing so keep-alive stays sane)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "length_required", "send the body with a Content-Length header")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(length)
        except ValueError as exc:
            self.close_connection = True
            raise ApiError(400, "invalid_request", "Content-Length is not a valid size") from exc
        if length > limit:
            if length <= DISCARD_LIMIT_BYTES:
                self._discard(length)
            else:
                self.close_connection = True
            raise ApiError(
                413,
                "request_too_large",
                f"the request body has {length} bytes; the limit is {limit}: send fewer or "
                "smaller tasks",
            )
        return self.rfile.read(length) if length else b""

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 65_536))
            if not chunk:
                self.close_connection = True
                return
            length -= len(chunk)

    def _send_api(
        self,
        answer: ApiError | int,
        endpoint: str,
        config: SimulatorConfig | None = None,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Send an API answer (an error, or a status and body) and count its status."""
        extra = dict(headers or {})
        if isinstance(answer, ApiError):
            status, body = answer.status, answer.body()
            if answer.retry_after_s is not None:
                extra["Retry-After"] = str(answer.retry_after_s)
        else:
            status = answer
        if config is not None and endpoint in PROCESSING_PATHS:
            extra.update(self.state.ratelimit_headers(config))
        self.state.count_status(status)
        self._send_bytes(status, body, extra)

    def _send_json(self, status: int, payload: Any) -> None:
        self._send_bytes(status, encode(payload), {})

    def _send_bytes(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (for instance it timed out on a slow answer): nothing to send to.
            self.close_connection = True

    def version_string(self) -> str:
        return self.server_version

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if self.server.verbose:
            logger.info("%s %s %s", self.command, self.path.split("?", 1)[0], code)

    def log_error(self, format: str, *args: Any) -> None:
        text = format % args
        level = logging.DEBUG if "timed out" in text else logging.WARNING
        logger.log(level, "HTTP error from %s: %s", self.address_string(), text)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            logger.info(format, *args)


def _flag(query: Mapping[str, list[str]], name: str) -> bool:
    return any(value.lower() in ("1", "true", "yes") for value in query.get(name, []))


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message}}


class SimulatorServer(ThreadingHTTPServer):
    """A thread per connection; daemon threads, so stopping never waits for a slow answer."""

    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        *,
        config: SimulatorConfig,
        api_key: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.state = SimulatorState(config, api_key)
        self.verbose = verbose
        super().__init__(address, SimulatorHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name, which can stall on a box without DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            logger.debug("connection from %s ended: %s", client_address, error)
            return
        logger.exception("unexpected error while serving %s", client_address)


def make_server(
    host: str,
    port: int,
    *,
    config: SimulatorConfig | None = None,
    api_key: str | None = None,
    verbose: bool = False,
) -> SimulatorServer:
    """Bind a simulator to `host:port` (port 0 picks a free one); call `serve_forever` to run it."""
    return SimulatorServer(
        (host, port), config=config or SimulatorConfig(), api_key=api_key, verbose=verbose
    )


def serve(server: SimulatorServer) -> None:
    """Run `server` until SIGTERM or SIGINT; call from the main thread."""

    def stop(signum: int, frame: FrameType | None) -> None:
        logger.info("LLM simulator stopping on signal %d", signum)
        # shutdown() waits for serve_forever, which runs in this very thread: ask from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    config = server.state.config
    logger.info(
        "LLM simulator listening on http://%s:%s (models: %s; auth: %s; seed: %s)",
        host,
        port,
        ", ".join(config.models),
        "on" if server.state.api_key else "off",
        config.seed,
    )
    try:
        server.serve_forever(poll_interval=SHUTDOWN_POLL_S)
    finally:
        server.server_close()
        logger.info("LLM simulator stopped")
