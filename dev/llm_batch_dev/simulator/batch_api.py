"""The simulator's provider batch API: files and batches, on a clock you can set.

Speaks OpenAI's Batch API: `POST /v1/files` (multipart, purpose `batch`), `GET /v1/files/{id}`
and `/content`, `POST /v1/batches`, `GET /v1/batches[/{id}]`, `POST /v1/batches/{id}/cancel`.
A batch moves `validating -> in_progress -> finalizing -> completed` on the times set in the
config (`batch_*_s`); `batch_outcome` makes it fail validation or expire with
`batch_done_fraction` of its requests answered; a cancel passes through `cancelling`. Each
answered line is a chat completion built by the same code as `POST /v1/chat/completions`
(item faults included), billed when the batch ends; `batch_line_error_rate` sends a line to
the error file instead. Statuses are computed from the clock when asked, so no thread runs.
"""

from __future__ import annotations

import email.policy
import itertools
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.parser import BytesParser
from typing import Any

from llm_batch_dev.simulator.config import SimulatorConfig
from llm_batch_dev.simulator.protocol import (
    CHAT_PATH,
    ApiError,
    chat_response,
    encode,
    parse_chat_request,
)
from llm_batch_dev.simulator.state import SimulatorState

FILES_PATH = "/v1/files"
BATCHES_PATH = "/v1/batches"
BATCH_API_PREFIXES = (FILES_PATH, BATCHES_PATH)


@dataclass
class StoredFile:
    id: str
    purpose: str
    filename: str
    content: bytes
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
        }


@dataclass
class SimBatch:
    """One batch: its input lines, the config it was created under, and its clock marks."""

    id: str
    input_file_id: str
    metadata: dict[str, Any]
    lines: list[dict[str, Any]]
    config: SimulatorConfig
    created_at: float
    errors: list[dict[str, Any]] = field(default_factory=list)
    cancelled_at: float | None = None
    final_status: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: Counter[str] = field(default_factory=Counter)

    def phase(self, now: float) -> tuple[str, float]:
        """Return the status at `now` and the share of requests answered by then."""
        c = self.config
        if self.final_status is not None:
            return self.final_status, 1.0
        started = self.created_at + c.batch_validating_s
        if self.errors or c.batch_outcome == "failed":
            return ("validating" if now < started else "failed"), 0.0
        if self.cancelled_at is not None:
            done = _share(self.cancelled_at - started, c.batch_in_progress_s)
            if now < self.cancelled_at + c.batch_cancelling_s:
                return "cancelling", done
            return "cancelled", done
        if now < started:
            return "validating", 0.0
        if now < started + c.batch_in_progress_s:
            return "in_progress", _share(now - started, c.batch_in_progress_s)
        if now < started + c.batch_in_progress_s + c.batch_finalizing_s:
            return "finalizing", 1.0
        if c.batch_outcome == "expired":
            return "expired", c.batch_done_fraction
        return "completed", 1.0


class BatchApi:
    """Every file and batch the simulator holds; one lock, nothing slow under it."""

    def __init__(self, state: SimulatorState, clock: Callable[[], float] = time.time) -> None:
        self._state = state
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        """Forget every file and batch, and zero the counters."""
        with self._lock:
            self._files: dict[str, StoredFile] = {}
            self._batches: dict[str, SimBatch] = {}
            self._created = 0
            self._cancel_requests = 0

    def stats(self) -> dict[str, Any]:
        """Return the counters for `GET /stats` (`batch_api`)."""
        with self._lock:
            batches = list(self._batches.values())
            created, cancels, files = self._created, self._cancel_requests, len(self._files)
        statuses = Counter(self._view(batch)["status"] for batch in batches)
        return {
            "files": files,
            "batches_created": created,
            "cancel_requests": cancels,
            "batches_by_status": dict(statuses),
            "requests_in_batches": sum(len(batch.lines) for batch in batches),
        }

    def handle(
        self, method: str, path: str, query: Mapping[str, list[str]], body: bytes, content_type: str
    ) -> tuple[int, Any]:
        """Serve one call; return the status and a JSON value (or bytes for file content)."""
        parts = [part for part in path.split("/") if part][1:]  # without "v1"
        if parts[0] == "files":
            if method == "POST" and len(parts) == 1:
                return 200, self._upload(body, content_type)
            if method == "GET" and len(parts) in (2, 3):
                stored = self._file(parts[1])
                if len(parts) == 3 and parts[2] == "content":
                    return 200, stored.content
                if len(parts) == 2:
                    return 200, stored.to_dict()
        elif parts[0] == "batches":
            if method == "POST" and len(parts) == 1:
                return 200, self._create(body)
            if method == "GET" and len(parts) == 1:
                return 200, self._list(query)
            if method == "GET" and len(parts) == 2:
                return 200, self._view(self._batch(parts[1]))
            if method == "POST" and len(parts) == 3 and parts[2] == "cancel":
                return 200, self._cancel(parts[1])
        raise ApiError(404, "not_found", f"no such endpoint {method} {path}")

    # -- files ----------------------------------------------------------------------------

    def _upload(self, body: bytes, content_type: str) -> dict[str, Any]:
        form = parse_multipart(body, content_type)
        purpose = form.get("purpose", (None, b""))[1].decode("utf-8", "replace")
        if purpose != "batch":
            raise ApiError(400, "invalid_request", 'purpose must be "batch"')
        if "file" not in form:
            raise ApiError(400, "invalid_request", "the form has no `file` part")
        filename, content = form["file"]
        if len(content) > self._state.config.batch_max_file_bytes:
            raise ApiError(413, "file_too_large", "the file is larger than the batch file limit")
        return self._add_file(purpose, filename or "upload.jsonl", content).to_dict()

    def _add_file(self, purpose: str, filename: str, content: bytes) -> StoredFile:
        with self._lock:
            stored = StoredFile(
                f"file-sim-{next(self._ids)}", purpose, filename, content, int(self._clock())
            )
            self._files[stored.id] = stored
        return stored

    def _file(self, file_id: str) -> StoredFile:
        with self._lock:
            stored = self._files.get(file_id)
        if stored is None:
            raise ApiError(404, "not_found", f"no file {file_id}")
        return stored

    # -- batches --------------------------------------------------------------------------

    def _create(self, body: bytes) -> dict[str, Any]:
        try:
            payload = json.loads(body or b"{}")
        except ValueError as exc:
            raise ApiError(400, "invalid_request", "the body is not JSON") from exc
        if not isinstance(payload, dict):
            raise ApiError(400, "invalid_request", "the body must be a JSON object")
        if payload.get("endpoint") != CHAT_PATH:
            raise ApiError(400, "invalid_request", f"endpoint must be {CHAT_PATH}")
        if payload.get("completion_window") != "24h":
            raise ApiError(400, "invalid_request", 'completion_window must be "24h"')
        stored = self._file(str(payload.get("input_file_id")))
        config = self._state.config
        lines, errors = read_input(stored.content, config)
        metadata = payload.get("metadata") or {}
        with self._lock:
            batch = SimBatch(
                f"batch_sim_{next(self._ids)}",
                stored.id,
                dict(metadata) if isinstance(metadata, dict) else {},
                lines,
                config,
                self._clock(),
                errors,
            )
            self._batches[batch.id] = batch
            self._created += 1
        return self._view(batch)

    def _batch(self, batch_id: str) -> SimBatch:
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            raise ApiError(404, "not_found", f"no batch {batch_id}")
        return batch

    def _cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self._batch(batch_id)
        with self._lock:
            self._cancel_requests += 1
            status, _ = batch.phase(self._clock())
            if status in ("validating", "in_progress", "finalizing"):
                batch.cancelled_at = self._clock()
        return self._view(batch)

    def _list(self, query: Mapping[str, list[str]]) -> dict[str, Any]:
        limit = int((query.get("limit") or ["20"])[0])
        after = (query.get("after") or [""])[0]
        with self._lock:
            batches = sorted(self._batches.values(), key=lambda b: b.created_at, reverse=True)
        ids = [batch.id for batch in batches]
        start = ids.index(after) + 1 if after in ids else 0
        page = batches[start : start + limit]
        return {
            "object": "list",
            "data": [self._view(batch) for batch in page],
            "has_more": start + limit < len(batches),
        }

    def _view(self, batch: SimBatch) -> dict[str, Any]:
        """Return the batch object as the API shows it now, writing its files once it ends."""
        now = self._clock()
        status, done = batch.phase(now)
        if status in ("completed", "expired", "cancelled") and batch.final_status is None:
            self._finish(batch, status, done)
        total = len(batch.lines)
        counts = (
            dict(batch.counts)
            if batch.final_status
            else {"completed": math.floor(done * total), "failed": 0}
        )
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": CHAT_PATH,
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created_at),
            "errors": {"object": "list", "data": batch.errors} if status == "failed" else None,
            "request_counts": {
                "total": total,
                "completed": counts.get("completed", 0),
                "failed": counts.get("failed", 0),
            },
            "metadata": batch.metadata,
        }

    def _finish(self, batch: SimBatch, status: str, done: float) -> None:
        """Answer the first `done` share of the requests; the rest go to the error file."""
        with self._lock:
            if batch.final_status is not None:
                return
            batch.final_status = status
        answered = (
            math.floor(done * len(batch.lines)) if status != "completed" else len(batch.lines)
        )
        output: list[bytes] = []
        errors: list[bytes] = []
        for position, line in enumerate(batch.lines):
            if position >= answered:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                errors.append(encode(_error_line(line, code, f"the batch was {status} first")))
                batch.counts["failed"] += 1
                continue
            kind, record = self._answer(line, batch.config)
            (output if kind == "output" else errors).append(encode(record))
            batch.counts["completed" if kind == "output" else "failed"] += 1
        if output:
            batch.output_file_id = self._add_file(
                "batch_output", f"{batch.id}_output.jsonl", b"\n".join(output) + b"\n"
            ).id
        if errors:
            batch.error_file_id = self._add_file(
                "batch_output", f"{batch.id}_error.jsonl", b"\n".join(errors) + b"\n"
            ).id

    def _answer(self, line: dict[str, Any], config: SimulatorConfig) -> tuple[str, dict[str, Any]]:
        """Answer one input line as `POST /v1/chat/completions` would; say which file it goes to."""
        state = self._state
        draw = state.draw(config, 0)
        if draw.order_seed / 2**32 < config.batch_line_error_rate:
            return "error", _response_line(
                line, 500, {"error": {"type": "internal", "message": "simulated batch line error"}}
            )
        try:
            request = parse_chat_request(encode(line["body"]), config)
        except ApiError as error:
            return "error", _response_line(line, error.status, json.loads(error.body()))
        draw = state.draw(config, len(request.tasks))
        body, billing = chat_response(request, draw, state.next_completion_id())
        state.bill(billing)
        for kind, times in Counter(f for f in draw.item_faults if f).items():
            state.count_fault(kind, times)
        return "output", _response_line(line, 200, json.loads(body))


def read_input(
    content: bytes, config: SimulatorConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the input file's request lines and the validation errors that fail the batch."""
    lines: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            errors.append({"code": "invalid_json_line", "message": "not JSON", "line": number})
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        if not isinstance(custom_id, str) or custom_id in seen:
            errors.append(
                {
                    "code": "invalid_custom_id",
                    "message": "missing or repeated custom_id",
                    "line": number,
                }
            )
            continue
        if (
            line.get("method") != "POST"
            or line.get("url") != CHAT_PATH
            or not isinstance(line.get("body"), dict)
        ):
            errors.append(
                {
                    "code": "invalid_request",
                    "message": f"each line must POST a body to {CHAT_PATH}",
                    "line": number,
                }
            )
            continue
        seen.add(custom_id)
        lines.append(line)
    if len(lines) > config.batch_max_requests_per_file:
        errors.append(
            {
                "code": "too_many_requests",
                "message": f"{len(lines)} requests, over the "
                f"{config.batch_max_requests_per_file} a file may hold",
                "line": None,
            }
        )
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the file holds no request", "line": None})
    return lines, errors


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Return each part of a `multipart/form-data` body by name: its file name and bytes."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, "invalid_request", "upload the file as multipart/form-data")
    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ApiError(400, "invalid_request", "the multipart body has no parts")
    form: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str):
            form[name] = (part.get_filename(), payload if isinstance(payload, bytes) else b"")
    return form


def _response_line(line: Mapping[str, Any], status: int, body: Any) -> dict[str, Any]:
    custom_id = line.get("custom_id")
    return {
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{custom_id}", "body": body},
        "error": None,
    }


def _error_line(line: Mapping[str, Any], code: str, message: str) -> dict[str, Any]:
    custom_id = line.get("custom_id")
    return {
        "id": f"batch_req_{custom_id}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def _share(elapsed: float, total: float) -> float:
    if total <= 0:
        return 1.0
    return min(1.0, max(0.0, elapsed / total))
