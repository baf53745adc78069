"""The batch API client's retry rules, on a session that answers from a script."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from llm_hook import ClientSettings
from llm_hook.batch_api import BatchApiClient
from llm_hook.exceptions import LLMRequestError
from llm_hook.wire import BearerAuth


class ScriptedSession(requests.Session):
    """Answers each call with the next scripted status (or raises the scripted exception)."""

    def __init__(self, *script: int | Exception, headers: dict[str, str] | None = None) -> None:
        super().__init__()
        self.script = list(script)
        self.headers_out = headers or {}
        self.calls: list[dict[str, Any]] = []

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.calls.append({"method": method, "url": url, **kwargs})
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        response = requests.Response()
        response.status_code = step
        response.headers.update(self.headers_out)
        response._content = b'{"id": "batch_1"}' if step == 200 else b'{"error": {}}'
        return response


def client(session: ScriptedSession, sleeps: list[float]) -> BatchApiClient:
    settings = ClientSettings(
        base_url="http://llm.invalid", api_key="sk-test", model="m", max_attempts=4
    )
    return BatchApiClient(settings, session=session, sleep=sleeps.append)


@pytest.mark.parametrize(
    "failure", [requests.ReadTimeout("lost"), 500, 502, 409], ids=["timeout", "500", "502", "409"]
)
def test_a_batch_create_that_may_have_happened_is_not_sent_again(failure: Any) -> None:
    session, sleeps = ScriptedSession(failure, 200), []
    with pytest.raises(LLMRequestError):
        client(session, sleeps).create_batch("file_1", {"llm_batch_key": "k"})
    assert len(session.calls) == 1


def test_a_batch_create_refused_with_429_waits_as_told_and_is_sent_again() -> None:
    session, sleeps = ScriptedSession(429, 200, headers={"Retry-After": "7"}), []
    assert client(session, sleeps).create_batch("file_1", {})["id"] == "batch_1"
    assert len(session.calls) == 2 and sleeps == [7.0]


def test_a_read_is_retried_after_a_5xx() -> None:
    session, sleeps = ScriptedSession(503, 200), []
    assert client(session, sleeps).get_batch("batch_1")["id"] == "batch_1"
    assert len(session.calls) == 2


def test_the_key_is_sent_as_bearer_auth_so_a_netrc_cannot_override_it() -> None:
    session, sleeps = ScriptedSession(200), []
    client(session, sleeps).get_batch("batch_1")
    assert isinstance(session.calls[0]["auth"], BearerAuth)
    assert "headers" not in session.calls[0]
