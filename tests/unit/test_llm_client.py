"""LLMClient against a scripted fake transport: the whole failure table, no network, no sleep."""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import requests
import urllib3
from requests.adapters import BaseAdapter, HTTPAdapter

from llm_hook import (
    CallRecord,
    ClientSettings,
    LLMClient,
    LLMRequestError,
    LLMTask,
    OutcomeStatus,
    TaskOutcome,
    Usage,
)
from llm_hook.wire import (
    derive_idempotency_key,
    encode_body,
    full_jitter_delay,
    parse_retry_after,
)

API_KEY = "sk-test-SECRET-0123456789"
BASE_URL = "http://llm.test"


@dataclass
class Sent:
    """One request the fake transport received."""

    method: str
    url: str
    headers: dict[str, str]
    body: Any
    timeout: Any

    @property
    def ids(self) -> list[str]:
        return [task["id"] for task in self.body["tasks"]]

    @property
    def key(self) -> str | None:
        return self.headers.get("Idempotency-Key")


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    """Bytes sent as they are, instead of `body` as JSON."""
    truncate: bool = False
    """Announce more bytes than are sent, as when a connection drops mid-body."""
    takes_s: float = 0.0
    """How long the fake service takes to answer, on the fake clock."""
    chunk_bytes: int | None = None
    """Bytes the body arrives in per read; None: all at once."""
    chunk_s: float = 0.0
    """How long each chunk of the body takes to arrive, on the fake clock."""
    declare_length: bool = True
    """Send a Content-Length header; False: the body's end is the connection's end."""


class FakeBody(io.BufferedIOBase):
    """A response body that arrives in chunks, moving the fake clock; remembers what was read."""

    def __init__(self, data: bytes, transport: FakeTransport, reply: Reply) -> None:
        super().__init__()
        self.data = data
        self.read_to = 0
        """Bytes the client has taken off the fake wire."""
        self._transport = transport
        self._step = reply.chunk_bytes or max(1, len(data))
        self._chunk_s = reply.chunk_s

    def readable(self) -> bool:
        return True

    def read1(self, size: int | None = -1) -> bytes:
        left = len(self.data) - self.read_to
        n = min(left, self._step, left if size is None or size < 0 else size)
        chunk = self.data[self.read_to : self.read_to + n]
        self.read_to += n
        if chunk:
            self._transport.now += self._chunk_s
        return chunk

    def read(self, size: int | None = -1) -> bytes:
        parts: list[bytes] = []
        want = len(self.data) if size is None or size < 0 else size
        while want > 0 and (chunk := self.read1(want)):
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)


MAX_REQUESTS = 100
"""A client that never stops retrying fails the test instead of hanging it."""

Script = Reply | Exception | Callable[[Sent], "Reply | Exception"]


class FakeTransport(BaseAdapter):
    """Answer requests from a script, one entry each; a request past the end fails the test."""

    def __init__(self, *script: Script, repeat_last: bool = False) -> None:
        super().__init__()
        self.script = list(script)
        self.repeat_last = repeat_last
        self.sent: list[Sent] = []
        self.bodies: list[FakeBody] = []
        self.now = 0.0
        """A fake monotonic clock that only answering moves forward."""

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        raw_body = request.body
        body = json.loads(raw_body) if raw_body else None
        sent = Sent(str(request.method), str(request.url), dict(request.headers), body, timeout)
        self.sent.append(sent)
        if len(self.sent) > (MAX_REQUESTS if self.repeat_last else len(self.script)):
            raise AssertionError(f"unexpected request #{len(self.sent)} to {request.url}")
        entry = self.script[min(len(self.sent), len(self.script)) - 1]
        reply = entry(sent) if callable(entry) else entry
        if isinstance(reply, Exception):
            raise reply
        self.now += reply.takes_s
        data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
        headers = {"Content-Type": "application/json", **reply.headers}
        if reply.declare_length:
            headers["Content-Length"] = str(len(data) + (50 if reply.truncate else 0))
        body = FakeBody(data, self, reply)
        self.bodies.append(body)
        raw = urllib3.HTTPResponse(
            body=body,
            status=reply.status,
            headers=headers,
            preload_content=False,
            enforce_content_length=True,
        )
        return HTTPAdapter().build_response(request, raw)

    def close(self) -> None:
        pass


def output_for(task_id: str) -> dict[str, str]:
    return {"answer": f"out-{task_id}"}


def item(task_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "output": output_for(task_id),
        "confidence": 0.9,
        "usage": {"input_tokens": 10, "output_tokens": 5},
        **extra,
    }


def batch_reply(results: list[Any], model: str = "sim-small-2024") -> Reply:
    return Reply(
        200,
        {
            "model": model,
            "results": results,
            "usage": {"input_tokens": 10 * len(results), "output_tokens": 5 * len(results)},
        },
    )


def ok(sent: Sent) -> Reply:
    """Answer every task, in reverse order (results may come in any order)."""
    return batch_reply([item(task_id) for task_id in reversed(sent.ids)])


def answer_except(*dropped: str) -> Callable[[Sent], Reply]:
    return lambda sent: batch_reply([item(i) for i in sent.ids if i not in dropped])


def error_reply(status: int, error_type: str | None = None, message: str = "") -> Reply:
    body = {"error": {"type": error_type, "message": message}} if error_type else {}
    return Reply(status, body)


def make_tasks(*ids: str) -> list[LLMTask]:
    return [LLMTask(task_id, {"text": f"input of {task_id}"}) for task_id in ids]


SETTINGS = ClientSettings(
    base_url=BASE_URL,
    api_key=API_KEY,
    model="sim-small",
    max_attempts=3,
    backoff_base_s=1.0,
    backoff_max_s=4.0,
    max_retry_after_s=60.0,
    max_rate_limit_waits=5,
    max_rounds=3,
    price_input_per_1k=2.0,
    price_output_per_1k=10.0,
    conn_id="llm_default",
)


class Harness:
    """A client wired to a fake transport, a recorded no-op sleep and a seeded rng."""

    def __init__(self, *script: Script, settings: ClientSettings = SETTINGS, **kw: Any) -> None:
        self.transport = FakeTransport(*script, **kw)
        session = requests.Session()
        session.mount("http://", self.transport)
        self.sleeps: list[float] = []
        self.records: list[CallRecord] = []
        self.client = LLMClient(
            settings,
            session=session,
            sleep=self.sleeps.append,
            rng=random.Random(7),
            clock=lambda: self.transport.now,
        )

    @property
    def sent(self) -> list[Sent]:
        return self.transport.sent

    def complete(self, tasks: list[LLMTask], **kwargs: Any) -> list[TaskOutcome]:
        kwargs.setdefault("on_call", self.records.append)
        return self.client.complete(tasks, **kwargs)


def by_id(outcomes: list[TaskOutcome]) -> dict[str, TaskOutcome]:
    return {outcome.task_id: outcome for outcome in outcomes}


# --- the happy path ------------------------------------------------------------------


def test_round_trip_maps_each_result_to_its_own_task_in_input_order() -> None:
    h = Harness(ok)
    outcomes = h.complete(make_tasks("a", "b", "c"), instructions="Summarise", params={"t": 0})

    assert [o.task_id for o in outcomes] == ["a", "b", "c"]
    for outcome in outcomes:
        assert outcome.status is OutcomeStatus.SUCCEEDED
        assert outcome.output == output_for(outcome.task_id)
        assert outcome.confidence == 0.9
        assert outcome.usage == Usage(10, 5)
        assert outcome.attempts == 1
        assert outcome.model == "sim-small-2024"
        assert outcome.error_type is None
    (sent,) = h.sent
    assert sent.method == "POST"
    assert sent.url == f"{BASE_URL}/v1/batch"
    assert sent.headers["Authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["Content-Type"] == "application/json"
    assert "Idempotency-Key" not in sent.headers
    assert sent.body == {
        "model": "sim-small",
        "instructions": "Summarise",
        "params": {"t": 0},
        "tasks": [{"id": i, "input": {"text": f"input of {i}"}} for i in ("a", "b", "c")],
    }
    assert sent.timeout == (SETTINGS.connect_timeout_s, SETTINGS.timeout_s)


def test_confidence_outside_zero_to_one_is_dropped_not_fatal() -> None:
    h = Harness(batch_reply([item("a", confidence=1.7), item("b", confidence="high")]))
    outcomes = h.complete(make_tasks("a", "b"))
    assert [(o.status, o.confidence) for o in outcomes] == [(OutcomeStatus.SUCCEEDED, None)] * 2


def test_explicit_model_is_sent() -> None:
    h = Harness(ok)
    h.complete(make_tasks("a"), model="sim-large")
    assert h.sent[0].body["model"] == "sim-large"


# --- 429 -----------------------------------------------------------------------------


def test_429_waits_retry_after_seconds_and_is_not_a_failure() -> None:
    h = Harness(Reply(429, {}, {"Retry-After": "7"}), ok)
    (outcome,) = h.complete(make_tasks("a"))
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.attempts == 2
    assert h.sleeps == [7.0]


def test_429_honours_an_http_date_retry_after() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    h = Harness(Reply(429, {}, {"Retry-After": when}), ok)
    h.complete(make_tasks("a"))
    (slept,) = h.sleeps
    assert 28.0 <= slept <= 30.0


@pytest.mark.parametrize(
    "retry_after",
    ["3600", format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True)],
    ids=["seconds", "http-date"],
)
def test_429_wait_is_capped_at_max_retry_after(retry_after: str) -> None:
    h = Harness(Reply(429, {}, {"Retry-After": retry_after}), ok)
    h.complete(make_tasks("a"))
    assert h.sleeps == [SETTINGS.max_retry_after_s]


def test_429_without_retry_after_backs_off_with_jitter() -> None:
    h = Harness(Reply(429, {}), Reply(429, {}), ok)
    h.complete(make_tasks("a"))
    assert len(h.sleeps) == 2
    assert 0 <= h.sleeps[0] <= 1.0
    assert 0 <= h.sleeps[1] <= 2.0


def test_429s_do_not_use_up_max_attempts() -> None:
    rate_limited = [Reply(429, {}, {"Retry-After": "1"})] * 4  # more than max_attempts=3
    h = Harness(*rate_limited, Reply(503, {}), ok)
    (outcome,) = h.complete(make_tasks("a"))
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.attempts == 6


def test_429s_beyond_max_rate_limit_waits_leave_tasks_retryable() -> None:
    h = Harness(Reply(429, {}, {"Retry-After": "1"}), repeat_last=True)
    outcomes = h.complete(make_tasks("a", "b"))
    assert {o.status for o in outcomes} == {OutcomeStatus.RETRYABLE}
    assert {o.error_type for o in outcomes} == {"http_429"}
    assert len(h.sent) == SETTINGS.max_rate_limit_waits + 1
    assert h.sleeps == [1.0] * SETTINGS.max_rate_limit_waits


@pytest.mark.parametrize(
    ("value", "expected"),
    [("12", 12.0), ("0.5", 0.5), ("-3", None), ("soon", None), ("", None), (None, None)],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, datetime.now(UTC)) == expected


def test_parse_retry_after_date_in_the_past_means_now() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:42 GMT", now) == 42.0


# --- 5xx, timeouts, resets, bad bodies ----------------------------------------------


def test_503_then_success_retries_the_same_request() -> None:
    h = Harness(error_reply(503, "unavailable"), ok)
    outcomes = h.complete(make_tasks("a", "b"))
    assert [o.status for o in outcomes] == [OutcomeStatus.SUCCEEDED] * 2
    assert [o.attempts for o in outcomes] == [2, 2]
    assert h.sent[0].body == h.sent[1].body
    assert len(h.sleeps) == 1 and 0 <= h.sleeps[0] <= SETTINGS.backoff_base_s


TRANSIENT_FAILURES: dict[str, tuple[Script, str]] = {
    "500": (error_reply(500), "http_500"),
    "502": (error_reply(502), "http_502"),
    "503": (error_reply(503), "http_503"),
    "504": (error_reply(504), "http_504"),
    "529": (error_reply(529), "http_529"),
    "408": (error_reply(408), "http_408"),
    "read-timeout": (requests.ReadTimeout("read timed out"), "timeout"),
    "connect-timeout": (requests.ConnectTimeout("connect timed out"), "timeout"),
    "reset": (requests.ConnectionError("Connection reset by peer"), "connection_error"),
    "non-json-200": (Reply(200, raw=b"<html>oops</html>"), "bad_response"),
    "truncated-200": (Reply(200, raw=b'{"model": "sim-', truncate=True), "bad_response"),
    "no-results-200": (Reply(200, {"model": "sim-small"}), "bad_response"),
    "array-200": (Reply(200, [1, 2]), "bad_response"),
}


@pytest.mark.parametrize(
    ("failure", "error_type"), TRANSIENT_FAILURES.values(), ids=list(TRANSIENT_FAILURES)
)
def test_transient_failure_recovers_on_retry(failure: Script, error_type: str) -> None:
    h = Harness(failure, ok)
    (outcome,) = h.complete(make_tasks("a"))
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert outcome.attempts == 2
    assert [r.error_type for r in h.records] == [error_type, None]


@pytest.mark.parametrize(
    ("failure", "error_type"), TRANSIENT_FAILURES.values(), ids=list(TRANSIENT_FAILURES)
)
def test_transient_failure_exhausting_attempts_leaves_tasks_retryable(
    failure: Script, error_type: str
) -> None:
    h = Harness(failure, repeat_last=True)
    outcomes = h.complete(make_tasks("a", "b"))
    for outcome in outcomes:
        assert outcome.status is OutcomeStatus.RETRYABLE
        assert outcome.error_type == error_type
        assert outcome.error_message
        assert outcome.attempts == SETTINGS.max_attempts
    assert len(h.sent) == SETTINGS.max_attempts
    assert len(h.sleeps) == SETTINGS.max_attempts - 1


def test_backoff_sleeps_are_full_jitter_within_exponential_bounds() -> None:
    settings = replace(SETTINGS, max_attempts=5, backoff_base_s=1.0, backoff_max_s=3.0)
    h = Harness(error_reply(503), repeat_last=True, settings=settings)
    h.complete(make_tasks("a"))
    assert len(h.sleeps) == 4
    for failures, slept in enumerate(h.sleeps, start=1):
        assert 0.0 <= slept <= min(3.0, 1.0 * 2 ** (failures - 1))


def test_full_jitter_delay_spans_zero_to_the_capped_exponential() -> None:
    rng = random.Random(1)
    for failures, bound in [(1, 0.5), (2, 1.0), (3, 2.0), (8, 20.0), (30, 20.0)]:
        draws = [full_jitter_delay(rng, failures, 0.5, 20.0) for _ in range(500)]
        assert min(draws) >= 0.0
        assert max(draws) <= bound
        # Full jitter, not "exponential plus a little": the whole range is used.
        assert min(draws) < bound * 0.1
        assert max(draws) > bound * 0.9


# --- permanent request errors -----------------------------------------------------


def test_400_fails_every_task_of_the_request_with_the_server_reason() -> None:
    h = Harness(error_reply(400, "invalid_request", "params.temperature must be <= 2"))
    outcomes = h.complete(make_tasks("a", "b"))
    for outcome in outcomes:
        assert outcome.status is OutcomeStatus.FAILED
        assert outcome.error_type == "invalid_request"
        assert outcome.error_message is not None
        assert "params.temperature must be <= 2" in outcome.error_message
    assert len(h.sent) == 1
    assert h.sleeps == []


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, "bad_request"), (422, "unprocessable"), (409, "http_409"), (501, "http_501")],
)
def test_other_client_errors_fail_without_retry_with_a_generic_type(
    status: int, error_type: str
) -> None:
    h = Harness(Reply(status, raw=b"nope"))
    (outcome,) = h.complete(make_tasks("a"))
    assert (outcome.status, outcome.error_type) == (OutcomeStatus.FAILED, error_type)
    assert len(h.sent) == 1


def test_413_splits_in_halves_down_to_the_single_oversized_task() -> None:
    def too_large_if_big(sent: Sent) -> Reply:
        return error_reply(413, "too_large", "payload too large") if "big" in sent.ids else ok(sent)

    h = Harness(too_large_if_big, repeat_last=True)
    outcomes = by_id(h.complete(make_tasks("a", "big", "c", "d"), idempotency_key="job-1:b-1"))

    assert [s.ids for s in h.sent] == [
        ["a", "big", "c", "d"],
        ["a", "big"],
        ["a"],
        ["big"],
        ["c", "d"],
    ]
    assert outcomes["big"].status is OutcomeStatus.FAILED
    assert outcomes["big"].error_type == "too_large"
    assert outcomes["big"].attempts == 3
    for task_id in ("a", "c", "d"):
        assert outcomes[task_id].status is OutcomeStatus.SUCCEEDED
        assert outcomes[task_id].output == output_for(task_id)
    # Each half is its own request, with its own key.
    keys = [s.key for s in h.sent]
    assert len(set(keys)) == len(keys)


def test_413_halves_get_distinct_idempotency_keys() -> None:
    h = Harness(error_reply(413), ok, ok)
    h.complete(make_tasks("a", "b"), idempotency_key="job-1:batch-1")
    keys = [s.key for s in h.sent]
    assert None not in keys and len(set(keys)) == 3


@pytest.mark.parametrize(
    ("status", "error_type", "hint"),
    [
        (401, "unauthorized", "API key"),
        (403, "forbidden", "API key"),
        (404, "not_found", "model name"),
    ],
)
def test_auth_and_not_found_abort_every_task_and_send_nothing_more(
    status: int, error_type: str, hint: str
) -> None:
    h = Harness(error_reply(status, "auth", "no"))
    outcomes = h.complete(make_tasks("a", "b", "c"))
    assert len(h.sent) == 1
    for outcome in outcomes:
        assert outcome.status is OutcomeStatus.ABORTED
        assert outcome.error_type == error_type
        assert outcome.error_message is not None
        assert hint in outcome.error_message
        assert "'llm_default'" in outcome.error_message


def test_401_in_a_later_round_keeps_earlier_results_and_aborts_the_rest() -> None:
    h = Harness(answer_except("b"), error_reply(401))
    outcomes = by_id(h.complete(make_tasks("a", "b")))
    assert outcomes["a"].status is OutcomeStatus.SUCCEEDED
    assert outcomes["b"].status is OutcomeStatus.ABORTED
    assert len(h.sent) == 2


def test_401_on_the_first_413_half_stops_before_the_second_half() -> None:
    h = Harness(error_reply(413), error_reply(401))
    outcomes = h.complete(make_tasks("a", "b", "c", "d"))
    assert [s.ids for s in h.sent] == [["a", "b", "c", "d"], ["a", "b"]]
    assert {o.status for o in outcomes} == {OutcomeStatus.ABORTED}


# --- item-level results -------------------------------------------------------------


@pytest.mark.parametrize("error_type", ["invalid_input", "content_filtered", "something_new"])
def test_permanent_item_error_fails_only_that_task(error_type: str) -> None:
    def reply(sent: Sent) -> Reply:
        bad = {"id": "b", "error": {"type": error_type, "message": "input has no text"}}
        return batch_reply([item("a"), bad, item("c")])

    h = Harness(reply)
    outcomes = by_id(h.complete(make_tasks("a", "b", "c")))
    assert outcomes["b"].status is OutcomeStatus.FAILED
    assert outcomes["b"].error_type == error_type
    assert outcomes["b"].error_message == "input has no text"
    assert outcomes["b"].output is None
    assert outcomes["a"].status is outcomes["c"].status is OutcomeStatus.SUCCEEDED
    assert len(h.sent) == 1


@pytest.mark.parametrize("error_type", ["overloaded", "internal"])
def test_transient_item_error_is_re_requested_alone(error_type: str) -> None:
    def first(sent: Sent) -> Reply:
        return batch_reply([item("a"), {"id": "b", "error": {"type": error_type}}, item("c")])

    h = Harness(first, ok)
    outcomes = by_id(h.complete(make_tasks("a", "b", "c")))
    assert [s.ids for s in h.sent] == [["a", "b", "c"], ["b"]]
    assert outcomes["b"].status is OutcomeStatus.SUCCEEDED
    assert outcomes["b"].output == output_for("b")
    assert (outcomes["a"].attempts, outcomes["b"].attempts) == (1, 2)


def test_dropped_item_is_re_requested_alone() -> None:
    h = Harness(answer_except("b"), ok)
    outcomes = by_id(h.complete(make_tasks("a", "b", "c")))
    assert [s.ids for s in h.sent] == [["a", "b", "c"], ["b"]]
    assert all(o.status is OutcomeStatus.SUCCEEDED for o in outcomes.values())
    assert all(o.output == output_for(i) for i, o in outcomes.items())


def test_duplicated_id_trusts_neither_copy_and_re_requests_that_task() -> None:
    def twice(sent: Sent) -> Reply:
        return batch_reply(
            [item("a"), item("b", output="first"), item("b", output="second"), item("c")]
        )

    h = Harness(twice, ok)
    outcomes = by_id(h.complete(make_tasks("a", "b", "c")))
    assert [s.ids for s in h.sent] == [["a", "b", "c"], ["b"]]
    assert outcomes["b"].output == output_for("b")


def test_unknown_id_is_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    def stranger(sent: Sent) -> Reply:
        return batch_reply([item("zzz", output="not yours"), *[item(i) for i in sent.ids]])

    h = Harness(stranger)
    with caplog.at_level(logging.WARNING, logger="llm_hook"):
        outcomes = h.complete(make_tasks("a", "b"))
    assert len(h.sent) == 1
    assert [o.output for o in outcomes] == [output_for("a"), output_for("b")]
    assert "zzz" in caplog.text


def test_unknown_id_standing_in_for_a_dropped_one_is_never_attached_to_it() -> None:
    # The service answered "b" under the wrong id: that output must not reach "b".
    def wrong_id(sent: Sent) -> Reply:
        return batch_reply([item("a"), {**item("b"), "id": "b "}])

    h = Harness(wrong_id, ok)
    outcomes = by_id(h.complete(make_tasks("a", "b")))
    assert [s.ids for s in h.sent] == [["a", "b"], ["b"]]
    assert outcomes["b"].output == output_for("b")


@pytest.mark.parametrize(
    "malformed",
    [
        {"id": "b"},
        {"id": "b", "error": "boom"},
        {"id": "b", "error": {"message": "untyped"}},
        {"id": "b", "output": 1, "error": {"type": "internal"}},
        {"id": 7, "output": "numeric id"},
        ["b", "output"],
        "b",
    ],
    ids=["empty", "error-str", "error-untyped", "both", "numeric-id", "list", "string"],
)
def test_malformed_item_is_re_requested_and_never_misattributed(malformed: Any) -> None:
    def reply(sent: Sent) -> Reply:
        return batch_reply([item("a"), malformed, item("c")])

    h = Harness(reply, ok)
    outcomes = by_id(h.complete(make_tasks("a", "b", "c")))
    assert [s.ids for s in h.sent] == [["a", "b", "c"], ["b"]]
    assert all(o.output == output_for(i) for i, o in outcomes.items())
    assert all(o.status is OutcomeStatus.SUCCEEDED for o in outcomes.values())


@pytest.mark.parametrize(
    ("reply", "error_type"),
    [
        (answer_except("b"), "missing_id"),
        (lambda s: batch_reply([item(i) for i in s.ids] + [item("b")]), "duplicate_id"),
        (
            lambda s: batch_reply([item(i) if i != "b" else {"id": "b"} for i in s.ids]),
            "malformed_item",
        ),
        (
            lambda s: batch_reply(
                [
                    item(i) if i != "b" else {"id": "b", "error": {"type": "overloaded"}}
                    for i in s.ids
                ]
            ),
            "overloaded",
        ),
    ],
    ids=["missing", "duplicate", "malformed", "overloaded"],
)
def test_max_rounds_exhausted_leaves_only_the_affected_task_retryable(
    reply: Callable[[Sent], Reply], error_type: str
) -> None:
    h = Harness(reply, repeat_last=True)
    outcomes = by_id(h.complete(make_tasks("a", "b", "c")))
    assert len(h.sent) == SETTINGS.max_rounds
    assert [s.ids for s in h.sent[1:]] == [["b"]] * (SETTINGS.max_rounds - 1)
    assert outcomes["b"].status is OutcomeStatus.RETRYABLE
    assert outcomes["b"].error_type == error_type
    assert outcomes["b"].attempts == SETTINGS.max_rounds
    assert outcomes["b"].output is None
    assert outcomes["a"].status is outcomes["c"].status is OutcomeStatus.SUCCEEDED


def test_transport_failure_in_a_later_round_keeps_earlier_results() -> None:
    h = Harness(answer_except("b"), error_reply(502), repeat_last=True)
    outcomes = by_id(h.complete(make_tasks("a", "b")))
    assert outcomes["a"].status is OutcomeStatus.SUCCEEDED
    assert (outcomes["b"].status, outcomes["b"].error_type) == (OutcomeStatus.RETRYABLE, "http_502")
    assert len(h.sent) == 1 + SETTINGS.max_attempts


# --- idempotency keys ------------------------------------------------------------


def test_idempotency_key_is_reused_by_transport_retries() -> None:
    h = Harness(error_reply(503), requests.ConnectionError("reset"), ok)
    h.complete(make_tasks("a", "b"), idempotency_key="job-1:batch-7")
    keys = {s.key for s in h.sent}
    assert len(h.sent) == 3 and len(keys) == 1
    assert keys == {derive_idempotency_key("job-1:batch-7", encode_body(h.sent[0].body), 1)}


def test_idempotency_key_changes_for_a_later_round_even_for_the_same_ids() -> None:
    overloaded = batch_reply([{"id": "a", "error": {"type": "overloaded"}}])
    h = Harness(overloaded, ok)
    h.complete(make_tasks("a"), idempotency_key="job-1:batch-7")
    assert h.sent[0].key != h.sent[1].key


def test_idempotency_key_differs_for_a_subset_round() -> None:
    h = Harness(answer_except("b"), ok)
    h.complete(make_tasks("a", "b", "c"), idempotency_key="job-1:batch-7")
    assert h.sent[1].ids == ["b"]
    assert h.sent[0].key != h.sent[1].key


def test_idempotency_key_is_the_same_for_a_fresh_client_given_the_same_inputs() -> None:
    # A worker killed mid-batch is retried by Airflow in a new process: same key, so the
    # service replays instead of billing again.
    def run_once() -> list[str | None]:
        h = Harness(answer_except("c"), ok)
        h.complete(
            make_tasks("b", "a", "c"),
            idempotency_key="job-1:batch-7",
            instructions="Summarise",
            params={"temperature": 0, "max_output_tokens": 64},
        )
        return [s.key for s in h.sent]

    first, second = run_once(), run_once()
    assert first == second
    assert None not in first


def first_key(tasks: list[LLMTask], **kwargs: Any) -> str | None:
    h = Harness(ok)
    h.complete(tasks, **kwargs)
    return h.sent[0].key


def test_idempotency_key_ignores_task_order_and_dict_key_order() -> None:
    tasks = [LLMTask("a", {"x": 1, "y": 2}), LLMTask("b", "two")]
    reordered = [LLMTask("b", "two"), LLMTask("a", {"y": 2, "x": 1})]
    params = {"temperature": 0, "max_output_tokens": 64}
    assert first_key(tasks, idempotency_key="k", params=params) == first_key(
        reordered, idempotency_key="k", params=dict(reversed(params.items()))
    )


def test_idempotency_key_covers_everything_that_changes_the_request() -> None:
    tasks = make_tasks("a", "b")
    base: dict[str, Any] = {
        "idempotency_key": "job-1:batch-7",
        "model": "sim-small",
        "instructions": "Summarise",
        "params": {"temperature": 0},
    }
    key = first_key(tasks, **base)
    variants = [
        first_key(tasks, **{**base, "idempotency_key": "job-1:batch-8"}),
        first_key(tasks, **{**base, "model": "sim-large"}),
        first_key(tasks, **{**base, "instructions": None}),
        first_key(tasks, **{**base, "params": {"temperature": 1}}),
        first_key(make_tasks("a"), **base),
        first_key([tasks[0], LLMTask("b", "edited input")], **base),
    ]
    assert None not in variants
    assert len({key, *variants}) == len(variants) + 1


def test_no_idempotency_key_without_a_base_key() -> None:
    assert first_key(make_tasks("a")) is None
    assert first_key(make_tasks("a"), idempotency_key="") is None


# --- answers too slow or too large -----------------------------------------------------


def limits(**overrides: Any) -> ClientSettings:
    """Deadline 2 s (twice the read timeout), 2000-byte answers, 500-byte outputs."""
    values: dict[str, Any] = {
        "timeout_s": 1.0,
        "max_response_bytes": 2000,
        "max_output_bytes": 500,
        **overrides,
    }
    return replace(SETTINGS, **values)


def big_item(task_id: str, size: int) -> dict[str, Any]:
    return item(task_id, output={"answer": "x" * size})


def test_deadline_defaults_to_twice_the_read_timeout() -> None:
    assert replace(SETTINGS, timeout_s=7.0).deadline_s == 14.0
    assert replace(SETTINGS, timeout_s=7.0, request_deadline_s=9.5).deadline_s == 9.5


def test_a_dripping_body_is_cut_at_the_deadline_and_retried_under_the_same_key() -> None:
    drip = replace(batch_reply([item("a")]), chunk_bytes=1, chunk_s=0.5)
    h = Harness(drip, drip, drip, settings=limits())
    (outcome,) = h.complete(make_tasks("a"), idempotency_key="job-1:batch-1")

    assert (outcome.status, outcome.error_type) == (OutcomeStatus.RETRYABLE, "timeout")
    assert outcome.error_message is not None and "request_deadline_s" in outcome.error_message
    # Each attempt stopped reading at the 2 s deadline: 4 chunks of 0.5 s, not the whole body.
    assert [body.read_to for body in h.transport.bodies] == [4, 4, 4]
    assert len({sent.key for sent in h.sent}) == 1
    assert [r.error_type for r in h.records] == ["timeout"] * 3


def test_a_slow_start_counts_toward_the_deadline() -> None:
    late = replace(batch_reply([item("a")]), takes_s=1.5, chunk_bytes=40, chunk_s=0.3)
    h = Harness(late, ok, settings=limits())
    (outcome,) = h.complete(make_tasks("a"))

    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert [r.error_type for r in h.records] == ["timeout", None]


def test_an_answer_over_max_response_bytes_is_not_read_and_fails_a_single_task() -> None:
    h = Harness(batch_reply([big_item("a", 5000)]), settings=limits())
    (outcome,) = h.complete(make_tasks("a"), idempotency_key="job-1:batch-1")

    assert (outcome.status, outcome.error_type) == (OutcomeStatus.FAILED, "output_too_large")
    assert outcome.error_message is not None and "max_response_bytes" in outcome.error_message
    assert len(h.sent) == 1
    # The announced Content-Length was enough: not one byte of the body was read.
    assert h.transport.bodies[0].read_to == 0


def test_an_undeclared_oversized_body_is_read_only_up_to_the_cap() -> None:
    endless = replace(
        batch_reply([big_item("a", 1_000_000)]), declare_length=False, chunk_bytes=1000
    )
    h = Harness(endless, settings=limits())
    (outcome,) = h.complete(make_tasks("a"))

    assert (outcome.status, outcome.error_type) == (OutcomeStatus.FAILED, "output_too_large")
    assert h.transport.bodies[0].read_to <= 2000 + 1000


def test_an_answer_too_large_for_several_tasks_is_split_until_the_answers_fit() -> None:
    def answer(sent: Sent) -> Reply:
        # 600 bytes per answer: two fit under 2000 bytes, four do not.
        return batch_reply([big_item(i, 600 if i != "huge" else 3000) for i in sent.ids])

    h = Harness(answer, repeat_last=True, settings=limits(max_output_bytes=10_000))
    outcomes = by_id(h.complete(make_tasks("a", "b", "c", "huge"), idempotency_key="k"))

    assert [s.ids for s in h.sent] == [["a", "b", "c", "huge"], ["a", "b"], ["c", "huge"],
                                       ["c"], ["huge"]]  # fmt: skip
    assert {t: o.status for t, o in outcomes.items()} == {
        "a": OutcomeStatus.SUCCEEDED,
        "b": OutcomeStatus.SUCCEEDED,
        "c": OutcomeStatus.SUCCEEDED,
        "huge": OutcomeStatus.FAILED,
    }
    assert outcomes["huge"].error_type == "output_too_large"
    # No body was sent twice: every request is new content under its own key.
    assert len({s.key for s in h.sent}) == len(h.sent)
    assert len({json.dumps(s.body, sort_keys=True) for s in h.sent}) == len(h.sent)


def test_an_oversized_error_body_is_dropped_and_its_status_still_decides() -> None:
    h = Harness(Reply(503, raw=b"x" * 5000), ok, settings=limits())
    (outcome,) = h.complete(make_tasks("a"))
    assert outcome.status is OutcomeStatus.SUCCEEDED
    assert [r.error_type for r in h.records] == ["http_503", None]
    assert h.transport.bodies[0].read_to == 0


def test_an_output_over_max_output_bytes_fails_only_that_task_without_a_retry() -> None:
    h = Harness(batch_reply([item("a"), big_item("b", 600), item("c")]), settings=limits())
    outcomes = by_id(h.complete(make_tasks("a", "b", "c"), idempotency_key="job-1:batch-1"))

    assert outcomes["b"].status is OutcomeStatus.FAILED
    assert outcomes["b"].error_type == "output_too_large"
    assert outcomes["b"].error_message is not None
    assert "max_output_bytes" in outcomes["b"].error_message
    assert outcomes["b"].output is None
    assert outcomes["b"].usage == Usage(10, 5)  # billed all the same
    for task_id in ("a", "c"):
        assert outcomes[task_id].status is OutcomeStatus.SUCCEEDED
    assert len(h.sent) == 1


def test_output_size_counts_utf8_bytes_not_characters() -> None:
    # 200 characters of 3 bytes each: 600 bytes, over the 500 allowed.
    h = Harness(batch_reply([item("a", output="€" * 200)]), settings=limits())
    (outcome,) = h.complete(make_tasks("a"))
    assert outcome.error_type == "output_too_large"


# --- the audit trail ----------------------------------------------------------------


def test_on_call_gets_one_record_per_attempt_with_usage_and_cost() -> None:
    h = Harness(Reply(429, {}, {"Retry-After": "2"}), error_reply(503), ok)
    h.complete(make_tasks("a", "b"), idempotency_key="job-1:batch-1")

    assert [r.attempt for r in h.records] == [1, 2, 3]
    assert [r.http_status for r in h.records] == [429, 503, 200]
    assert [r.error_type for r in h.records] == ["http_429", "http_503", None]
    assert all(r.endpoint == f"{BASE_URL}/v1/batch" for r in h.records)
    assert all(r.task_ids == ("a", "b") for r in h.records)
    assert all(r.idempotency_key == h.sent[0].key for r in h.records)
    assert all(r.at.tzinfo is not None and r.at.utcoffset() == timedelta(0) for r in h.records)
    assert [r.usage for r in h.records] == [Usage(), Usage(), Usage(20, 10)]
    assert [r.cost_usd for r in h.records[:2]] == [0.0, 0.0]
    # 20 input tokens at $2/1k + 10 output tokens at $10/1k
    assert h.records[2].cost_usd == pytest.approx(0.04 + 0.1)
    assert h.records[2].model == "sim-small-2024"
    assert h.records[0].model == "sim-small"


def test_a_replayed_answer_resolves_tasks_and_is_flagged_for_the_audit_trail() -> None:
    """The caller decides whether the replay's usage was already counted (see processing)."""
    h = Harness(lambda sent: replace(ok(sent), headers={"Idempotent-Replayed": "true"}))
    outcomes = h.complete(make_tasks("a", "b"), idempotency_key="job-1:batch-1")

    assert {o.status for o in outcomes} == {OutcomeStatus.SUCCEEDED}
    (record,) = h.records
    assert record.replayed
    assert record.usage == Usage(20, 10)


def test_a_fresh_answer_is_not_marked_replayed() -> None:
    h = Harness(ok)
    h.complete(make_tasks("a"))
    assert not h.records[0].replayed


def test_latency_is_that_of_the_request_that_resolved_the_task() -> None:
    slow_503 = replace(error_reply(503), takes_s=1.5)
    h = Harness(slow_503, lambda sent: replace(ok(sent), takes_s=0.25))
    (outcome,) = h.complete(make_tasks("a"))
    assert outcome.latency_ms == 250
    assert [r.latency_ms for r in h.records] == [1500, 250]


def test_on_call_sees_transport_failures_without_a_status() -> None:
    h = Harness(requests.ReadTimeout("slow"), ok)
    h.complete(make_tasks("a"))
    first = h.records[0]
    assert (first.http_status, first.error_type, first.usage) == (None, "timeout", Usage())


def test_on_call_exception_propagates_to_the_caller() -> None:
    def explode(record: CallRecord) -> None:
        raise RuntimeError("audit store down")

    h = Harness(ok)
    with pytest.raises(RuntimeError, match="audit store down"):
        h.complete(make_tasks("a"), on_call=explode)


# --- input validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tasks",
    [
        [],
        make_tasks(*[f"t{i}" for i in range(11)]),
        make_tasks("a", "b", "a"),
        [LLMTask("", 1)],
    ],
    ids=["none", "eleven", "duplicate-ids", "empty-id"],
)
def test_bad_task_lists_raise_before_any_request(tasks: list[LLMTask]) -> None:
    h = Harness()
    with pytest.raises(ValueError):
        h.complete(tasks)
    assert h.sent == []


def test_non_json_input_raises_before_any_request() -> None:
    h = Harness()
    with pytest.raises(ValueError, match="JSON"):
        h.complete([LLMTask("a", {1, 2})])
    assert h.sent == []


def test_ten_tasks_go_in_one_request() -> None:
    h = Harness(ok)
    outcomes = h.complete(make_tasks(*[f"t{i}" for i in range(10)]))
    assert len(h.sent) == 1 and len(outcomes) == 10


# --- secrets ------------------------------------------------------------------------


def test_api_key_never_reaches_logs_repr_or_messages(caplog: pytest.LogCaptureFixture) -> None:
    echoing = error_reply(401, "unauthorized", f"bad key {API_KEY}")
    h = Harness(error_reply(503), answer_except("b"), echoing)
    with caplog.at_level(logging.DEBUG):
        outcomes = h.complete(make_tasks("a", "b"), idempotency_key="k")
    assert caplog.records, "the client should log what it does"
    assert API_KEY not in caplog.text
    assert API_KEY not in repr(h.client)
    assert API_KEY not in repr(h.client.settings)
    assert API_KEY not in repr(outcomes)
    assert API_KEY not in repr(h.records)


# --- list_models ---------------------------------------------------------------------


def test_list_models_reads_the_model_list() -> None:
    h = Harness(Reply(200, {"data": [{"id": "sim-small"}, {"id": "sim-large"}]}))
    assert h.client.list_models() == ["sim-small", "sim-large"]
    assert h.sent[0].method == "GET"
    assert h.sent[0].url == f"{BASE_URL}/v1/models"
    assert h.sent[0].headers["Authorization"] == f"Bearer {API_KEY}"


def test_list_models_raises_a_clear_error_for_a_bad_key() -> None:
    h = Harness(error_reply(401, "unauthorized", "bad key"))
    with pytest.raises(LLMRequestError, match="API key") as info:
        h.client.list_models()
    assert info.value.http_status == 401
    assert info.value.error_type == "unauthorized"


# --- before_send: the caller's say before every attempt -------------------------------


def test_before_send_is_asked_before_every_attempt_and_a_refusal_stops_the_call() -> None:
    """A budget spent mid-call stops the next round: the tasks left end REFUSED, unsent."""
    asked: list[list[str]] = []

    def before_send(ids: Any) -> str | None:
        asked.append(list(ids))
        return "budget_exhausted" if len(asked) > 1 else None

    h = Harness(answer_except("b"), ok)
    outcomes = by_id(h.complete(make_tasks("a", "b", "c"), before_send=before_send))
    assert asked == [["a", "b", "c"], ["b"]]
    assert [s.ids for s in h.sent] == [["a", "b", "c"]]
    assert outcomes["a"].status is outcomes["c"].status is OutcomeStatus.SUCCEEDED
    assert outcomes["b"].status is OutcomeStatus.REFUSED
    assert outcomes["b"].error_type == "budget_exhausted"


def test_before_send_refusing_a_retry_sends_nothing_more() -> None:
    h = Harness(error_reply(503), ok)
    calls = iter([None, "budget_exhausted"])
    outcomes = h.complete(make_tasks("a", "b"), before_send=lambda ids: next(calls))
    assert len(h.sent) == 1
    assert {o.status for o in outcomes} == {OutcomeStatus.REFUSED}


def test_before_send_refusing_the_second_413_half_keeps_the_first_halfs_answers() -> None:
    h = Harness(error_reply(413), ok)
    calls = iter([None, None, "budget_exhausted"])
    outcomes = by_id(
        h.complete(make_tasks("a", "b", "c", "d"), before_send=lambda ids: next(calls))
    )
    assert [s.ids for s in h.sent] == [["a", "b", "c", "d"], ["a", "b"]]
    assert outcomes["a"].status is outcomes["b"].status is OutcomeStatus.SUCCEEDED
    assert outcomes["c"].status is outcomes["d"].status is OutcomeStatus.REFUSED
