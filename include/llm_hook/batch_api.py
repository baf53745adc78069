"""The provider's batch API over HTTP: upload a JSONL file, create, read, list and cancel batches.

OpenAI's Batch API and compatible servers (the simulator among them): `POST /v1/files`
(purpose `batch`), `POST /v1/batches`, `GET /v1/batches/{id}`, `GET /v1/batches`,
`POST /v1/batches/{id}/cancel`, `GET /v1/files/{id}/content`. Plain data in and out, no
Airflow: the domain (`llm_batch.provider_batch`) decides what to send and what answers mean.

Every call goes to the connection's first endpoint: a provider batch lives on the server that
took it, so it is polled, cancelled and read there too.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import requests

from llm_hook.adapters import error_detail
from llm_hook.exceptions import LLMRequestError
from llm_hook.settings import ClientSettings, EndpointSettings
from llm_hook.wire import BearerAuth, full_jitter_delay, json_or_none, parse_retry_after

log = logging.getLogger(__name__)

COMPLETION_WINDOW = "24h"
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
"""Statuses after which a call that may safely run twice (a read, a cancel) is sent again."""
LIST_PAGE = 100


class BatchApiClient:
    """Talk to one endpoint's files and batches API with the connection's key and timeouts."""

    def __init__(
        self,
        settings: ClientSettings,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.endpoint: EndpointSettings = settings.endpoint_list()[0]
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._auth = BearerAuth(self.endpoint.api_key)

    def __enter__(self) -> BatchApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool if this client created it."""
        if self._owns_session:
            self._session.close()

    def upload_file(self, content: bytes, filename: str) -> str:
        """Upload a JSONL input file (purpose `batch`) and return its file id."""
        body = self._call(
            "POST",
            "/v1/files",
            idempotent=False,
            data={"purpose": "batch"},
            files={"file": (filename, content, "application/jsonl")},
            timeout_s=max(self.settings.timeout_s, 120.0),
        )
        return str(body["id"])

    def create_batch(self, input_file_id: str, metadata: Mapping[str, str]) -> dict[str, Any]:
        """Submit the uploaded file as a batch of chat completions; return the batch object.

        Not sent twice: after an answer that may have come from a batch the provider made (a
        timeout, a 5xx), the caller looks for it by its metadata before creating another.
        """
        return self._call(
            "POST",
            "/v1/batches",
            idempotent=False,
            json={
                "input_file_id": input_file_id,
                "endpoint": "/v1/chat/completions",
                "completion_window": COMPLETION_WINDOW,
                "metadata": dict(metadata),
            },
        )

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        """Return the batch object: `status`, `request_counts`, `output_file_id`, ..."""
        return self._call("GET", f"/v1/batches/{batch_id}")

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """Ask the provider to cancel a batch (it passes through `cancelling`)."""
        return self._call("POST", f"/v1/batches/{batch_id}/cancel")

    def list_batches(self) -> Iterator[dict[str, Any]]:
        """Yield every batch the key can see, newest first, page by page."""
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": LIST_PAGE}
            if after:
                params["after"] = after
            page = self._call("GET", "/v1/batches", params=params)
            data = page.get("data") or []
            yield from data
            if not page.get("has_more") or not data:
                return
            after = str(data[-1]["id"])

    def file_content(self, file_id: str) -> bytes:
        """Return the bytes of a file (a batch's output or error JSONL)."""
        return self._call(
            "GET",
            f"/v1/files/{file_id}/content",
            raw=True,
            timeout_s=max(self.settings.timeout_s, 120.0),
        )

    def _call(
        self,
        method: str,
        path: str,
        *,
        raw: bool = False,
        timeout_s: float | None = None,
        idempotent: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Send one call, retrying transient failures; raise `LLMRequestError` with what to fix.

        A call that is not `idempotent` (a create, an upload) is sent again only when the
        provider cannot have acted on it: a 429 or a connection never made. After a timeout or
        a 5xx it may have, and a second one would be a second, billed batch.
        """
        url = self.endpoint.url + path
        timeout = (self.settings.connect_timeout_s, timeout_s or self.settings.timeout_s)
        problem, status = "", None
        for attempt in range(1, self.settings.max_attempts + 1):
            retry_after: float | None = None
            try:
                response = self._session.request(
                    method, url, auth=self._auth, timeout=timeout, **kwargs
                )
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
                if not idempotent and not isinstance(exc, requests.ConnectTimeout):
                    break
            else:
                if response.status_code == 200:
                    if raw:
                        return response.content
                    body = json_or_none(response.content)
                    if body is not None:
                        return body
                    problem = "the answer is not JSON"
                    if not idempotent:
                        break
                else:
                    status = response.status_code
                    _, detail = error_detail(json_or_none(response.content))
                    problem = f"HTTP {response.status_code}" + (f": {detail}" if detail else "")
                    if response.status_code == 429:
                        retry_after = parse_retry_after(
                            response.headers.get("Retry-After"), datetime.now(UTC)
                        )
                    elif response.status_code not in RETRYABLE_STATUSES or not idempotent:
                        break
            if attempt < self.settings.max_attempts:
                delay = (
                    min(retry_after, self.settings.max_retry_after_s)
                    if retry_after is not None
                    else full_jitter_delay(
                        self._rng,
                        attempt,
                        self.settings.backoff_base_s,
                        self.settings.backoff_max_s,
                    )
                )
                log.warning("%s %s failed (%s); retrying in %.1f s", method, path, problem, delay)
                self._sleep(delay)
        raise LLMRequestError(
            f"The provider's batch API refused {method} {path} at {self.endpoint.url} "
            f"({problem}). Check the base URL and API key of connection "
            f"{self.settings.conn_id or 'llm_default'}, and that the server offers the Batch API.",
            error_type="batch_api" if status is None else f"http_{status}",
            http_status=status,
        )
