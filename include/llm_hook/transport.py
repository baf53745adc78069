"""One HTTP exchange: POST a request and read its answer under the connection's limits.

The body is read as it arrives, under the wall-clock deadline (`request_deadline_s`) and
`max_response_bytes`. Every transport failure becomes an `Answer` without a status, so
the client's retry loop deals in answers, never in exceptions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
import urllib3.exceptions

from llm_hook.adapters import ParsedResponse
from llm_hook.reading import Cut, read_body
from llm_hook.settings import ClientSettings
from llm_hook.wire import OUTPUT_TOO_LARGE, PERMANENT_5XX, REPLAYED_HEADER, BearerAuth, json_or_none

log = logging.getLogger(__name__)


@dataclass
class Answer:
    """What one HTTP attempt produced."""

    http_status: int | None
    error_type: str | None
    message: str
    latency_ms: int
    parsed: ParsedResponse | None = None
    body: Any = None
    retry_after: str | None = None
    replayed: bool = False
    """The service answered from its idempotency store: nothing was processed or billed."""
    connect_failed: bool = False
    """No connection could be made: the endpoint, not this request, is the problem."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Response headers the rate limiter learns from (`x-ratelimit-*`)."""
    too_large: bool = False
    """A 200 whose body exceeded `max_response_bytes`: answered, but not read."""

    @property
    def transient(self) -> bool:
        """No usable answer, but a retry may get one: no response, 5xx/408, or a bad 2xx body."""
        status = self.http_status
        if self.parsed is not None or self.too_large:
            return False
        return (
            status is None
            or status == 408
            or (500 <= status < 600 and status not in PERMANENT_5XX)
            or 200 <= status < 300
        )


class Transport:
    """Makes one HTTP exchange on a session the caller owns, under the connection's limits."""

    def __init__(self, settings: ClientSettings, *, clock: Callable[[], float]) -> None:
        self.settings = settings
        self._clock = clock

    def exchange(
        self,
        session: requests.Session,
        url: str,
        data: bytes,
        headers: dict[str, str],
        auth: BearerAuth,
    ) -> Answer:
        """POST and read the answer; transport failures become an `Answer` without a status.

        The body is read as it arrives, under the connection's wall-clock deadline and
        `max_response_bytes`: a breach closes the connection and reads nothing more.
        """
        timeouts = (self.settings.connect_timeout_s, self.settings.timeout_s)
        deadline = self._clock() + self.settings.deadline_s
        try:
            response = session.post(
                url, data=data, headers=headers, auth=auth, timeout=timeouts, stream=True
            )
        except requests.ConnectTimeout:
            return Answer(
                None,
                "timeout",
                f"could not connect within {self.settings.connect_timeout_s}s",
                0,
                connect_failed=True,
            )
        except requests.Timeout:
            return Answer(None, "timeout", f"no response within {self.settings.timeout_s}s", 0)
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError):
            return Answer(None, "bad_response", "the response body was cut off or garbled", 0)
        except requests.RequestException as exc:
            return Answer(
                None,
                "connection_error",
                f"the connection failed ({type(exc).__name__})",
                0,
                connect_failed=_never_connected(exc),
            )
        status = response.status_code
        limits = {k: v for k, v in response.headers.items() if k.lower().startswith("x-ratelimit")}
        try:
            read = read_body(
                response,
                deadline=deadline,
                max_bytes=self.settings.max_response_bytes,
                clock=self._clock,
            )
        except urllib3.exceptions.ReadTimeoutError:
            response.close()
            return Answer(None, "timeout", f"no response within {self.settings.timeout_s}s", 0)
        except (urllib3.exceptions.ProtocolError, urllib3.exceptions.DecodeError):
            response.close()
            return Answer(None, "bad_response", "the response body was cut off or garbled", 0)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            response.close()
            return Answer(
                None, "connection_error", f"the connection failed ({type(exc).__name__})", 0
            )
        if read.cut is Cut.DEADLINE:
            return Answer(
                None,
                "timeout",
                f"the response was not complete within the {self.settings.deadline_s}s deadline "
                "(`request_deadline_s`)",
                0,
            )
        if read.cut is Cut.TOO_LARGE and status == 200:
            log.warning(
                "LLM response over max_response_bytes=%d: closed after %d byte(s)",
                self.settings.max_response_bytes,
                read.size,
            )
            return Answer(
                status,
                OUTPUT_TOO_LARGE,
                f"the answer was over {self.settings.max_response_bytes} bytes "
                "(`max_response_bytes`)",
                0,
                too_large=True,
                headers=limits,
            )
        # An oversized error body is dropped: its status says what to do.
        body = json_or_none(read.data)
        if status == 200:
            if body is None:
                return Answer(status, "bad_response", "the 200 response was not JSON", 0)
            replayed = response.headers.get(REPLAYED_HEADER, "").lower() == "true"
            return Answer(status, None, "", 0, body=body, replayed=replayed, headers=limits)
        if 200 <= status < 300:
            return Answer(status, "bad_response", f"unexpected HTTP {status}", 0, body=body)
        return Answer(
            status,
            f"http_{status}",
            f"HTTP {status}",
            0,
            body=body,
            retry_after=response.headers.get("Retry-After"),
            headers=limits,
        )


def _never_connected(exc: requests.RequestException) -> bool:
    """Say whether a connection error happened before any byte was sent (refused, DNS)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(
            cause, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
        ):
            return True
        # requests wraps urllib3's MaxRetryError in args[0]; that holds the cause in `reason`.
        reason = getattr(cause, "reason", None)
        first = cause.args[0] if cause.args else None
        if isinstance(reason, BaseException):
            cause = reason
        elif isinstance(first, BaseException):
            cause = first
        else:
            cause = cause.__cause__
    return False
