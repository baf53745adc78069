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
import hmac
import io
import logging
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from llm_batch_dev.simulator.batch_api import BATCH_API_PREFIXES, BatchApi
from llm_batch_dev.simulator.config import SimulatorConfig
from llm_batch_dev.simulator.protocol import (
    BATCH_PATH,
    MODELS_PATH,
    PROCESSING_PATHS,
    SERVER_ERROR_TYPES,
    ApiError,
    ApiRequest,
    Draw,
    batch_response,
    chat_response,
    encode,
    parse_batch_request,
    parse_chat_request,
    parse_json_object,
)
from llm_batch_dev.simulator.state import Claim, SimulatorState

logger = logging.getLogger("llm_batch_dev.simulator")

ADMIN_MAX_BODY_BYTES = 1_048_576
DISCARD_LIMIT_BYTES = 64 * 1_048_576
"""An oversized body up to this size is read and thrown away so the connection stays usable."""
KEEP_ALIVE_IDLE_S = 300
SHUTDOWN_POLL_S = 0.1
"""How often the accept loop checks for a stop request: a SIGTERM takes effect this fast."""


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
            stats = self.state.stats(
                per_task=_flag(query, "per_task"), requests=_flag(query, "requests")
            )
            self._send_json(200, {**stats, "batch_api": self.server.batches.stats()})
        elif url.path.startswith(BATCH_API_PREFIXES):
            self._serve_batch_api(url.path, url.query)
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
        elif path.startswith(BATCH_API_PREFIXES):
            self._serve_batch_api(path, urlsplit(self.path).query)
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
            self.server.batches.reset()
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

    # -- provider batch API (batch_api.py) -------------------------------------------------

    def _serve_batch_api(self, path: str, query: str) -> None:
        self.state.count_request(path)
        try:
            limit = self.state.config.batch_max_file_bytes + ADMIN_MAX_BODY_BYTES
            body = self._read_body(limit) if self.command == "POST" else b""
            self._authorize()
            status, answer = self.server.batches.handle(
                self.command, path, parse_qs(query), body, self.headers.get("Content-Type", "")
            )
        except ApiError as error:
            self._send_api(error, path)
            return
        self._send_api(status, path, None, answer if isinstance(answer, bytes) else encode(answer))

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
        self.batches = BatchApi(self.state)
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
