"""LLMClient against a purpose-built server on loopback: slow, huge and oversized answers.

The simulator answers well; these faults need a server that misbehaves on the wire
(a body that drips, stalls, or never ends), so a tiny one lives here, on real sockets.
"""

from __future__ import annotations

import json
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from llm_hook import CallRecord, ClientSettings, LLMClient, LLMTask, OutcomeStatus

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
Answer = Callable[["Handler", dict[str, Any]], None]


@dataclass
class Service:
    """A batch-protocol server whose every answer is written by `answer`."""

    answer: Answer
    keys: list[str | None] = field(default_factory=list)
    ids: list[list[str]] = field(default_factory=list)
    sent_bytes: int = 0
    """Body bytes the server got onto the socket before the client hung up."""
    done: threading.Event = field(default_factory=threading.Event)
    """Set when the last answer has been written, or its client has gone."""
    url: str = ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ThreadingHTTPServer

    @property
    def service(self) -> Service:
        return self.server.service  # type: ignore[attr-defined, no-any-return]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.service.keys.append(self.headers.get("Idempotency-Key"))
        self.service.ids.append([task["id"] for task in body["tasks"]])
        try:
            self.service.answer(self, body)
        finally:
            self.service.done.set()

    def head(self, length: int | None) -> None:
        """Send a 200's headers; without a length the body ends when the connection does."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if length is None:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(length))
        self.end_headers()

    def write(self, data: bytes) -> bool:
        """Write body bytes; False once the client has hung up."""
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return False
        self.service.sent_bytes += len(data)
        return True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], Service]]:
    servers: list[ThreadingHTTPServer] = []

    def start(answer: Answer) -> Service:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True  # a handler still dripping must not hold up the test
        service = Service(answer, url=f"http://127.0.0.1:{server.server_address[1]}")
        server.service = service  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return service

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def settings(service: Service, **overrides: Any) -> ClientSettings:
    values: dict[str, Any] = {
        "base_url": service.url,
        "api_key": "sk-limits-test-0123",
        "model": "sim-small",
        "connect_timeout_s": 1.0,
        "timeout_s": 1.0,
        "max_attempts": 1,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.02,
    }
    values.update(overrides)
    return ClientSettings(**values)


def results(body: dict[str, Any], output: Callable[[str], Any] = lambda i: f"out-{i}") -> bytes:
    answers = [{"id": t["id"], "output": output(t["id"])} for t in body["tasks"]]
    return json.dumps({"model": "m", "results": answers, "usage": {}}).encode()


def tasks(*ids: str) -> list[LLMTask]:
    return [LLMTask(task_id, {"text": task_id}) for task_id in ids]


def test_a_body_dripping_a_byte_every_0_3s_is_cut_at_the_deadline_and_retried_same_key(
    serve: Callable[[Answer], Service],
) -> None:
    def drip(handler: Handler, body: dict[str, Any]) -> None:
        data = results(body)
        handler.head(len(data))
        for i in range(len(data)):
            if not handler.write(data[i : i + 1]):
                return
            time.sleep(0.3)

    service = serve(drip)
    records: list[CallRecord] = []
    with LLMClient(settings(service, max_attempts=2)) as client:  # deadline: 2 x 1 s
        started = time.monotonic()
        (outcome,) = client.complete(
            tasks("a"), idempotency_key="job-1:b-1", on_call=records.append
        )
        elapsed = time.monotonic() - started

    assert (outcome.status, outcome.error_type) == (OutcomeStatus.RETRYABLE, "timeout")
    # Each attempt ended at its 2 s deadline; the whole body would have taken ~20 s.
    assert [r.error_type for r in records] == ["timeout", "timeout"]
    assert all(1900 <= r.latency_ms <= 2300 for r in records), [r.latency_ms for r in records]
    assert elapsed < 2 * 2.3 + 0.2
    assert len(service.keys) == 2
    assert service.keys[0] is not None and service.keys[0] == service.keys[1]


def test_a_body_stalling_past_the_deadline_is_cut_at_the_deadline_not_the_read_timeout(
    serve: Callable[[Answer], Service],
) -> None:
    def stall(handler: Handler, body: dict[str, Any]) -> None:
        data = results(body)
        handler.head(len(data))
        handler.write(data[:10])
        time.sleep(4.0)  # silent, but within the 5 s read timeout
        handler.write(data[10:])

    service = serve(stall)
    with LLMClient(settings(service, timeout_s=5.0, request_deadline_s=1.0)) as client:
        started = time.monotonic()
        (outcome,) = client.complete(tasks("a"))
        elapsed = time.monotonic() - started

    assert (outcome.status, outcome.error_type) == (OutcomeStatus.RETRYABLE, "timeout")
    assert elapsed < 1.5


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_an_endless_body_is_not_read_past_the_cap_and_fails_its_single_task(
    serve: Callable[[Answer], Service], declared: bool
) -> None:
    total = 64 * MIB
    block = b"x" * (64 * 1024)

    def flood(handler: Handler, body: dict[str, Any]) -> None:
        handler.head(total if declared else None)
        handler.write(b'{"model": "m", "results": [{"id": "a", "output": "')
        for _ in range(total // len(block)):
            if not handler.write(block):
                return

    service = serve(flood)
    client = LLMClient(settings(service, max_response_bytes=MIB, timeout_s=5.0))
    tracemalloc.start()
    try:
        (outcome,) = client.complete(tasks("a"), idempotency_key="job-1:b-1")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        client.close()
    assert service.done.wait(10), "the server was still writing: the client never hung up"

    assert (outcome.status, outcome.error_type) == (OutcomeStatus.FAILED, "output_too_large")
    assert service.ids == [["a"]]  # answered once, never sent again
    assert peak < 4 * MIB, f"peak {peak} bytes"
    # What got onto the wire before the hang-up is the cap plus the sockets' buffers
    # (measured: 50 bytes with a Content-Length, ~5.6 MiB without).
    assert service.sent_bytes < 16 * MIB, f"{service.sent_bytes} bytes sent"


def test_an_output_over_max_output_bytes_fails_its_task_alone_in_one_request(
    serve: Callable[[Answer], Service],
) -> None:
    def answer(handler: Handler, body: dict[str, Any]) -> None:
        data = results(body, lambda i: "y" * 100_000 if i == "b" else f"out-{i}")
        handler.head(len(data))
        handler.write(data)

    service = serve(answer)
    with LLMClient(settings(service, max_output_bytes=10_000)) as client:
        outcomes = client.complete(tasks("a", "b", "c"), idempotency_key="job-1:b-1")

    by_id = {o.task_id: o for o in outcomes}
    assert (by_id["b"].status, by_id["b"].error_type) == (OutcomeStatus.FAILED, "output_too_large")
    assert by_id["a"].status is OutcomeStatus.SUCCEEDED and by_id["a"].output == "out-a"
    assert by_id["c"].status is OutcomeStatus.SUCCEEDED and by_id["c"].output == "out-c"
    assert service.ids == [["a", "b", "c"]]
