"""Read a response body under a wall-clock deadline and a size cap.

A read timeout bounds each silence, not the exchange: a body that drips a byte just
inside the read timeout keeps a call busy for as long as the server likes, and a
body read whole can be as large as the server likes. `read_body` reads a streamed
response chunk by chunk as bytes arrive, counting bytes and checking the clock
between chunks, and a watchdog cuts the socket at the deadline so a read blocked in
a long silence cannot outlast it either. It never holds more than the cap plus one
chunk.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import requests

CHUNK_BYTES = 64 * 1024
"""Most bytes one read returns; a read returns as soon as any bytes arrive."""


class Cut(str, Enum):
    """Why a body was not read to its end."""

    DEADLINE = "deadline"
    TOO_LARGE = "too_large"


@dataclass(frozen=True)
class Body:
    """What `read_body` got: the whole body, or why it stopped early."""

    data: bytes | None
    """The body (decoded per Content-Encoding); None when cut."""
    cut: Cut | None = None
    size: int = 0
    """Bytes read before the body ended or was cut (at most the cap plus one chunk)."""


def declared_length(response: requests.Response) -> int | None:
    """Return the Content-Length the response announces, if it announces a usable one."""
    value = response.headers.get("Content-Length", "")
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def read_body(
    response: requests.Response,
    *,
    deadline: float,
    max_bytes: int,
    clock: Callable[[], float],
) -> Body:
    """Read a `stream=True` response until its end, the deadline or `max_bytes`.

    `deadline` is a `clock()` value. A cut body closes the response (its connection is
    not reused). Transport errors while reading propagate as urllib3 raises them, except
    that a read the watchdog interrupted is reported as a `DEADLINE` cut.
    """
    declared = declared_length(response)
    # Content-Length counts encoded bytes; decoded ones are counted as they arrive.
    if declared is not None and declared > max_bytes:
        response.close()
        return Body(None, Cut.TOO_LARGE)
    remaining = deadline - clock()
    if remaining <= 0:
        response.close()
        return Body(None, Cut.DEADLINE)
    raw = response.raw
    fired = threading.Event()
    watchdog = threading.Timer(remaining, _interrupt, (raw, fired))
    watchdog.daemon = True
    watchdog.start()
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            chunk = raw.read1(CHUNK_BYTES, decode_content=True)
            if fired.is_set():
                # The socket was shut down mid-read: what came back is not the whole body.
                response.close()
                return Body(None, Cut.DEADLINE, size)
            if not chunk:
                return Body(b"".join(chunks), None, size)
            size += len(chunk)
            if size > max_bytes:
                response.close()
                return Body(None, Cut.TOO_LARGE, size)
            chunks.append(chunk)
            if clock() >= deadline:
                response.close()
                return Body(None, Cut.DEADLINE, size)
    except Exception:
        if fired.is_set():
            response.close()
            return Body(None, Cut.DEADLINE, size)
        raise
    finally:
        watchdog.cancel()


def _interrupt(raw: object, fired: threading.Event) -> None:
    """Wake a read blocked on the socket: shut its reading side (urllib3's way across threads)."""
    fired.set()
    shutdown = getattr(raw, "shutdown", None)
    if shutdown is None:
        return
    # No socket (a test transport), or already released: then nothing is blocked on it.
    with contextlib.suppress(ValueError, RuntimeError, OSError):
        shutdown()
