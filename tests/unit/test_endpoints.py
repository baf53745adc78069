"""Several endpoints per connection: settings, weighted choice, failover and shared health."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from typing import Any

import pytest
import requests
import urllib3
from airflow.sdk import Connection

from llm_hook import CallRecord, ClientSettings, LLMClient, LLMConfigError, OutcomeStatus
from llm_hook.endpoints import EndpointRouter
from llm_hook.pacing import EndpointState, MemoryLimiterStore, RateLimiter
from llm_hook.settings import EndpointSettings
from tests.unit.test_llm_client import FakeTransport, Reply, Sent, make_tasks, ok

KEY = "sk-endpoints-0123456789"
A = "http://llm-a.test"
B = "http://llm-b.test"


def refused(url: str) -> requests.ConnectionError:
    """What requests raises when nothing listens on the port."""
    reason = urllib3.exceptions.NewConnectionError(None, "Connection refused")  # type: ignore[arg-type]
    return requests.ConnectionError(urllib3.exceptions.MaxRetryError(None, url, reason))  # type: ignore[arg-type]


def connection(extra: dict[str, Any], host: str | None = None) -> Connection:
    return Connection(
        conn_id="llm_multi",
        conn_type="llm_batch",
        host=host,
        password=KEY,
        extra=json.dumps({"model": "sim-small", **extra}),
    )


class Service:
    """Two fake endpoints behind one transport: each answers by its own script."""

    def __init__(
        self, *, down: set[str] | None = None, scripts: dict[str, list[Any]] | None = None
    ) -> None:
        self.down = set(down or ())
        self.scripts = scripts or {}
        self.transport = FakeTransport(self.answer, repeat_last=True)

    def answer(self, sent: Sent) -> Reply | Exception:
        base = sent.url.rsplit("/v1/", 1)[0]
        if base in self.down:
            return refused(sent.url)
        script = self.scripts.get(base)
        if script:
            entry = script.pop(0)
            return entry(sent) if callable(entry) else entry
        return ok(sent)

    def hosts(self) -> list[str]:
        return [sent.url.rsplit("/v1/", 1)[0] for sent in self.transport.sent]


def client(
    service: Service,
    endpoints: list[EndpointSettings],
    *,
    limiter: RateLimiter | None = None,
    seed: int = 7,
    sleeps: list[float] | None = None,
    **overrides: Any,
) -> LLMClient:
    session = requests.Session()
    session.mount("http://", service.transport)
    values: dict[str, Any] = {
        "api_key": KEY,
        "model": "sim-small",
        "endpoints": tuple(endpoints),
        "max_attempts": 4,
        "backoff_base_s": 0.5,
        "backoff_max_s": 2.0,
    }
    values.update(overrides)
    return LLMClient(
        ClientSettings(**values),
        session=session,
        sleep=(sleeps if sleeps is not None else []).append,
        rng=random.Random(seed),
        clock=lambda: service.transport.now,
        rate_limiter=limiter,
    )


# --- settings ------------------------------------------------------------------------


def test_endpoints_are_read_from_the_extra_with_the_password_as_the_default_key() -> None:
    settings = ClientSettings.from_connection(
        connection(
            {
                "adapter": "openai",
                "rpm": 100,
                "endpoints": [
                    {"url": A + "/", "weight": 2, "rpm": 120, "tpm": 100000},
                    {"url": B, "api_key": "sk-other-key-987", "name": "b-key-2"},
                ],
            }
        )
    )
    first, second = settings.endpoint_list()
    assert (first.url, first.api_key, first.weight, first.rpm, first.tpm) == (
        A,
        KEY,
        2,
        120,
        100000,
    )
    assert (second.id, second.api_key, second.rpm, second.tpm) == (
        "b-key-2",
        "sk-other-key-987",
        100,
        0,
    )
    assert settings.base_url == ""
    assert "sk-other-key-987" not in repr(settings)


def test_endpoints_given_as_text_in_a_connection_uri_are_parsed() -> None:
    extra = {"endpoints": json.dumps([{"url": A, "weight": "3", "rpm": "60"}])}
    (endpoint,) = ClientSettings.from_connection(connection(extra)).endpoint_list()
    assert (endpoint.weight, endpoint.rpm) == (3.0, 60)


def test_without_endpoints_the_host_is_the_one_endpoint() -> None:
    settings = ClientSettings.from_connection(connection({"rpm": 90, "tpm": 5000}, host=A))
    (endpoint,) = settings.endpoint_list()
    assert (endpoint.url, endpoint.api_key, endpoint.rpm, endpoint.tpm, endpoint.id) == (
        A,
        KEY,
        90,
        5000,
        A,
    )


@pytest.mark.parametrize(
    ("extra", "host", "says"),
    [
        ({"endpoints": [{"url": A}]}, B, "both a host"),
        ({"endpoints": [{"url": A}, {"url": A}]}, None, "distinct `name`"),
        ({"endpoints": [{"url": A, "wieght": 2}]}, None, "Unknown field(s) wieght in endpoints[0]"),
        ({"endpoints": [{"weight": 2}]}, None, "endpoints[0]"),
        ({"endpoints": [{"url": A, "weight": 0}]}, None, "`weight` of endpoints[0]"),
        ({"endpoints": [{"url": A, "rpm": -1}]}, None, "`rpm` of endpoints[0]"),
        ({"endpoints": [{"url": "ftp://x"}]}, None, "needs http:// or https://"),
        ({"endpoints": {"url": A}}, None, "must be a list"),
        ({"endpoints": "[not json"}, None, "not a JSON list"),
        ({"rate_window_s": 0}, A, "rate_window_s"),
    ],
)
def test_bad_endpoint_settings_say_what_to_fix(
    extra: dict[str, Any], host: str | None, says: str
) -> None:
    with pytest.raises(LLMConfigError, match=re.escape(says)):
        ClientSettings.from_connection(connection(extra, host=host))


def test_an_endpoint_without_any_key_is_refused() -> None:
    conn = Connection(
        conn_id="llm_multi", conn_type="llm_batch", extra=json.dumps({"endpoints": [{"url": A}]})
    )
    with pytest.raises(LLMConfigError, match="No API key for endpoints"):
        ClientSettings.from_connection(conn)


# --- the router ----------------------------------------------------------------------


def test_choice_is_weighted_among_usable_endpoints() -> None:
    endpoints = [EndpointSettings(A, KEY, weight=3), EndpointSettings(B, KEY, weight=1)]
    router = EndpointRouter(endpoints, rng=random.Random(1), clock=lambda: 0.0)
    picks = Counter(router.choose().url for _ in range(8_000))  # type: ignore[union-attr]
    assert picks[A] / picks[B] == pytest.approx(3.0, rel=0.1)


def test_a_resting_endpoint_is_skipped_until_its_rest_ends() -> None:
    now = [0.0]
    endpoints = [EndpointSettings(A, KEY), EndpointSettings(B, KEY)]
    router = EndpointRouter(endpoints, rng=random.Random(1), clock=lambda: now[0])
    router.rest(endpoints[1], EndpointState.UNREACHABLE, 5.0, "connection_error")
    assert {router.choose().url for _ in range(50)} == {A}  # type: ignore[union-attr]
    router.rest(endpoints[0], EndpointState.OVERLOADED, 2.0, "http_429")
    assert router.choose() is None
    assert router.first_to_recover() == (endpoints[0], 2.0)
    now[0] = 5.0
    assert {router.choose().url for _ in range(50)} == {A, B}  # type: ignore[union-attr]
    assert router.state(B) is EndpointState.UNREACHABLE
    router.restore(endpoints[1])
    assert router.state(B) is EndpointState.ACTIVE


# --- failover in the client ----------------------------------------------------------


def test_a_request_refused_by_one_endpoint_goes_to_the_other_at_once() -> None:
    service = Service(down={B})
    sleeps: list[float] = []
    records: list[CallRecord] = []
    endpoints = [EndpointSettings(A, weight=1), EndpointSettings(B, weight=1000)]
    c = client(service, endpoints, sleeps=sleeps)

    outcomes = c.complete(make_tasks("a", "b"), on_call=records.append)

    assert [o.status for o in outcomes] == [OutcomeStatus.SUCCEEDED] * 2
    assert service.hosts() == [B, A]
    assert [r.endpoint for r in records] == [B + "/v1/batch", A + "/v1/batch"]
    assert [r.error_type for r in records] == ["connection_error", None]
    assert sleeps == []  # another endpoint was usable: no backoff
    # B rests: the next calls go to A only, without trying B again.
    for _ in range(5):
        c.complete(make_tasks("c"))
    assert service.hosts()[2:] == [A] * 5


def test_a_429_moves_the_retry_to_the_other_endpoint_without_waiting() -> None:
    limited = Reply(429, {}, {"Retry-After": "30"})
    service = Service(scripts={B: [limited]})
    sleeps: list[float] = []
    endpoints = [EndpointSettings(A, weight=1), EndpointSettings(B, weight=1000)]
    outcomes = client(service, endpoints, sleeps=sleeps).complete(make_tasks("a"))
    assert outcomes[0].status is OutcomeStatus.SUCCEEDED
    assert service.hosts() == [B, A]
    assert sleeps == []


def test_a_dead_endpoint_found_by_one_worker_is_not_tried_by_another() -> None:
    shared = RateLimiter(MemoryLimiterStore())
    endpoints = [EndpointSettings(A, weight=1), EndpointSettings(B, weight=1000)]
    first = Service(down={B})
    client(first, endpoints, limiter=shared).complete(make_tasks("a"))
    assert first.hosts() == [B, A]
    assert shared.state(B).state is EndpointState.UNREACHABLE

    second = Service(down={B})
    for seed in range(5):
        client(second, endpoints, limiter=shared, seed=seed).complete(make_tasks("b"))
    assert second.hosts() == [A] * 5


def test_when_every_endpoint_is_down_the_request_gives_up_after_max_attempts() -> None:
    service = Service(down={A, B})
    sleeps: list[float] = []
    endpoints = [EndpointSettings(A), EndpointSettings(B)]
    outcomes = client(service, endpoints, sleeps=sleeps, cooldown_base_s=1.0).complete(
        make_tasks("a")
    )
    assert outcomes[0].status is OutcomeStatus.RETRYABLE
    assert outcomes[0].error_type == "connection_error"
    assert len(service.transport.sent) == 4
    assert set(service.hosts()) == {A, B}
    # Both rest; the client waits for the first to recover before each further probe.
    assert len(sleeps) == 2 and all(s > 0 for s in sleeps)


def test_the_request_goes_back_to_a_recovered_endpoint() -> None:
    service = Service(down={B})
    endpoints = [EndpointSettings(A, weight=1), EndpointSettings(B, weight=1000)]
    clock = [1_000.0]
    shared = RateLimiter(MemoryLimiterStore(), clock=lambda: clock[0])
    c = client(service, endpoints, limiter=shared, cooldown_base_s=1.0)
    c.complete(make_tasks("a"))
    service.down.clear()
    clock[0] += 1.5  # B's rest is over on the shared clock ...
    service.transport.now += 1.5  # ... and on this client's own
    c.complete(make_tasks("b"))
    assert service.hosts() == [B, A, B]
    assert shared.state(B).state is EndpointState.ACTIVE


def test_requests_are_paced_by_the_rate_limit() -> None:
    service = Service()
    clock = [1_000.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    limiter = RateLimiter(MemoryLimiterStore(), clock=lambda: clock[0], headroom=0.0)
    session = requests.Session()
    session.mount("http://", service.transport)
    c = LLMClient(
        ClientSettings(base_url=A, api_key=KEY, model="sim-small", rpm=60),
        session=session,
        sleep=sleep,
        rate_limiter=limiter,
    )
    for task_id in "abc":
        c.complete(make_tasks(task_id))
    assert sleeps == pytest.approx([1.0, 1.0])
