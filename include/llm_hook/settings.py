"""Client settings and how they are read from an Airflow connection.

Connection fields (connection type `llm_batch`):

- host: the service's base URL, e.g. `http://127.0.0.1:8765` or
  `https://llm.example.com/api` (no trailing slash needed). A bare host name
  also works; then `schema` (`http` or `https`, default `http`, as Airflow's
  HttpHook) and `port` complete it.
- password: the API key, sent as `Authorization: Bearer <key>`.
- extra: a JSON object with any of the `ClientSettings` fields below except
  `base_url` and `api_key`, by the same names, e.g.
  `{"model": "gpt-4o-mini", "timeout_s": 30, "max_attempts": 4}`; `model` is required.
  Unknown names are rejected so a typo cannot silently fall back to a default.

Several endpoints (servers or keys) go in the extra as `endpoints`, a list of
`{"url", "api_key", "weight", "rpm", "tpm", "name"}` objects; then the host stays empty
and the password, if set, is the key of every endpoint that names none.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from llm_hook.adapters import ADAPTERS
from llm_hook.exceptions import LLMConfigError

MIB = 1024 * 1024
DEFERRED = "deferred"
SYNC = "sync"
EXECUTION_MODES = (DEFERRED, SYNC)
"""Values of the extra's `execution_mode` (docs/llm-hook.md, docs/scale-out.md)."""


class ConnectionLike(Protocol):
    """What `from_connection` reads: both `airflow.sdk.Connection` and the ORM model fit."""

    conn_id: str
    host: str | None
    schema: str | None
    port: int | None

    @property
    def password(self) -> str | None: ...

    @property
    def extra_dejson(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class EndpointSettings:
    """One server, or one API key on a server, that requests may go to."""

    url: str
    """Base URL, as the connection's host: scheme, host, optional port and path prefix."""
    api_key: str = field(default="", repr=False)
    """Empty: the connection's password."""
    weight: float = 1.0
    """Share of the requests this endpoint gets while all endpoints are usable."""
    rpm: int | None = None
    """Requests per `rate_window_s` allowed; None: the connection's `rpm`; 0: no limit."""
    tpm: int | None = None
    """Tokens per `rate_window_s` allowed; None: the connection's `tpm`; 0: no limit."""
    name: str = ""
    """Its id in logs and the shared rate-limit store; empty: the URL. Give endpoints that
    share a URL (several keys on one server) distinct names."""

    @property
    def id(self) -> str:
        """Return the name under which workers share this endpoint's limits and health."""
        return self.name or self.url


ENDPOINT_FIELDS: dict[str, type] = {
    "url": str,
    "api_key": str,
    "weight": float,
    "rpm": int,
    "tpm": int,
    "name": str,
}
"""Names allowed in one entry of the extra's `endpoints` list, with the type each is read as."""


@dataclass(frozen=True)
class ClientSettings:
    """Everything the client needs to talk to an LLM service through one or more endpoints."""

    base_url: str = ""
    """Scheme, host, optional port and path prefix; paths are appended (`/v1/batch`).
    Empty when `endpoints` lists the servers instead."""
    api_key: str = field(default="", repr=False)
    adapter: str = "batch"
    """Wire protocol: `batch` (the batch LLM API contract) or `openai` (chat completions)."""
    model: str = ""
    """Model used when `complete` is not given one. Required: no service shares a default."""
    connect_timeout_s: float = 5.0
    timeout_s: float = 30.0
    """Read timeout: the longest silence allowed while waiting for the response."""
    request_deadline_s: float | None = None
    """Wall-clock limit on one HTTP attempt, from sending to the last byte of the body;
    None: twice `timeout_s`. A breach is a `timeout`, retried under the same key."""
    max_response_bytes: int = 8 * MIB
    """Largest response body read; a larger one is cut off unread (see `output_too_large`)."""
    max_output_bytes: int = 4 * MIB
    """Largest serialized output of one task; a larger one fails that task (`output_too_large`),
    well below MongoDB's 16 MiB document limit."""
    max_tokens_ceiling: int = 4096
    """Highest output-token bound (`max_tokens`, ...) a job's `llm_params` may ask for."""
    max_attempts: int = 4
    """HTTP attempts per request for 5xx, timeouts, resets and bad bodies."""
    backoff_base_s: float = 0.5
    backoff_max_s: float = 20.0
    max_retry_after_s: float = 60.0
    """Cap on a 429's `Retry-After` wait."""
    max_rate_limit_waits: int = 20
    """429s tolerated per request before its tasks are given up as retryable."""
    max_rounds: int = 3
    """Requests per `complete` call for tasks whose items came back transient or faulty."""
    price_input_per_1k: float = 0.0
    """USD per 1000 input tokens."""
    price_output_per_1k: float = 0.0
    """USD per 1000 output tokens."""
    batch_price_input_per_1k: float | None = None
    """USD per 1000 input tokens through the provider's batch API; None: half the sync price."""
    batch_price_output_per_1k: float | None = None
    """USD per 1000 output tokens through the provider's batch API; None: half the sync price."""
    batch_max_requests_per_file: int = 50_000
    """Most requests in one provider batch input file; more are split over several batches."""
    batch_max_file_bytes: int = 200 * MIB
    """Largest provider batch input file; a larger one is split over several batches."""
    batch_poll_s: float = 60.0
    """How often the triggerer asks the provider about a pending batch."""
    endpoints: tuple[EndpointSettings, ...] = ()
    """Several endpoints to spread requests over and fail over between; empty: the one
    endpoint given by `base_url` and `api_key`."""
    rpm: int = 0
    """Requests per `rate_window_s` per endpoint, shared by all workers; 0: no limit."""
    tpm: int = 0
    """Tokens per `rate_window_s` per endpoint, shared by all workers; 0: no limit."""
    rate_window_s: float = 60.0
    """The window `rpm`, `tpm` and the `x-ratelimit-limit-*` headers count over."""
    cooldown_base_s: float = 1.0
    """How long an unreachable endpoint rests before it is probed, doubling per failure."""
    cooldown_max_s: float = 60.0
    execution_mode: str = DEFERRED
    """How Airflow runs a batch: `deferred` (the request waits in the triggerer, a worker slot
    is held only to start it) or `sync` (a worker process waits on it; no triggerer needed)."""
    conn_id: str | None = None
    """The Airflow connection these came from, named in error messages."""

    def __post_init__(self) -> None:
        if isinstance(self.endpoints, list):
            object.__setattr__(self, "endpoints", tuple(self.endpoints))
        if self.endpoints:
            if self.base_url:
                raise LLMConfigError(
                    f"{_conn(self.conn_id)} has both a host (Base URL) and `endpoints` in its "
                    "extra: clear the host, or drop `endpoints` to use the host alone."
                )
            self._check_endpoints()
        else:
            object.__setattr__(self, "base_url", _check_base_url(self.base_url, self.conn_id))
            if not isinstance(self.api_key, str) or not self.api_key.strip():
                raise LLMConfigError(
                    f"No API key: set the password (API key) of {_conn(self.conn_id)}."
                )
        if self.adapter not in ADAPTERS:
            raise self._error("adapter", f"must be one of {', '.join(ADAPTERS)}")
        if self.model == "":
            raise LLMConfigError(
                f"No model: set `model` in the extra of {_conn(self.conn_id)} to the model the "
                'service should answer with, e.g. {"model": "gpt-4o-mini"}.'
            )
        if not isinstance(self.model, str) or not self.model.strip():
            raise self._error("model", "must be a non-empty model name")
        for name in ("connect_timeout_s", "timeout_s"):
            self._check_number(name, minimum=0.0, strict=True)
        if self.request_deadline_s is not None:
            self._check_number("request_deadline_s", minimum=0.0, strict=True)
        for name in (
            "max_attempts",
            "max_rounds",
            "max_response_bytes",
            "max_output_bytes",
            "max_tokens_ceiling",
            "batch_max_requests_per_file",
            "batch_max_file_bytes",
        ):
            self._check_number(name, minimum=1, integer=True)
        for name in ("max_rate_limit_waits", "rpm", "tpm"):
            self._check_number(name, minimum=0, integer=True)
        for name in (
            "backoff_base_s",
            "backoff_max_s",
            "max_retry_after_s",
            "price_input_per_1k",
            "price_output_per_1k",
            "batch_poll_s",
            "cooldown_base_s",
            "cooldown_max_s",
        ):
            self._check_number(name, minimum=0.0)
        self._check_number("rate_window_s", minimum=0.0, strict=True)
        if self.execution_mode not in EXECUTION_MODES:
            raise self._error("execution_mode", f"must be one of {', '.join(EXECUTION_MODES)}")
        for name in ("batch_price_input_per_1k", "batch_price_output_per_1k"):
            if getattr(self, name) is not None:
                self._check_number(name, minimum=0.0)

    @property
    def supports_provider_batch(self) -> bool:
        """Return whether this connection can take jobs through the provider's batch API."""
        return self.adapter == "openai"

    @property
    def batch_prices(self) -> tuple[float, float]:
        """Return USD per 1000 input and output tokens through the provider's batch API."""
        input_price = self.batch_price_input_per_1k
        output_price = self.batch_price_output_per_1k
        return (
            self.price_input_per_1k / 2 if input_price is None else input_price,
            self.price_output_per_1k / 2 if output_price is None else output_price,
        )

    @property
    def deadline_s(self) -> float:
        """Return the wall-clock limit of one HTTP attempt: the setting, else 2 x `timeout_s`."""
        if self.request_deadline_s is None:
            return 2 * self.timeout_s
        return self.request_deadline_s

    def endpoint_list(self) -> tuple[EndpointSettings, ...]:
        """Return the endpoints with keys and limits resolved: the list, or the single one."""
        if not self.endpoints:
            return (EndpointSettings(self.base_url, self.api_key, 1.0, self.rpm, self.tpm),)
        return tuple(
            replace(
                endpoint,
                api_key=endpoint.api_key or self.api_key,
                rpm=self.rpm if endpoint.rpm is None else endpoint.rpm,
                tpm=self.tpm if endpoint.tpm is None else endpoint.tpm,
            )
            for endpoint in self.endpoints
        )

    def _check_endpoints(self) -> None:
        checked: list[EndpointSettings] = []
        for position, endpoint in enumerate(self.endpoints):
            where = f"endpoints[{position}] in the extra of {_conn(self.conn_id)}"
            if not isinstance(endpoint, EndpointSettings):
                raise LLMConfigError(f"{where} must be an object with at least a `url`.")
            url = _check_base_url(endpoint.url, self.conn_id)
            key = endpoint.api_key or self.api_key
            if not isinstance(key, str) or not key.strip():
                raise LLMConfigError(
                    f"No API key for {where}: set its `api_key`, or the connection's password "
                    "(API key) for every endpoint."
                )
            weight = endpoint.weight
            if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
                raise LLMConfigError(f"`weight` of {where} must be a number > 0.")
            for name in ("rpm", "tpm"):
                value = getattr(endpoint, name)
                if value is not None and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 0
                ):
                    raise LLMConfigError(f"`{name}` of {where} must be an integer >= 0.")
            if not isinstance(endpoint.name, str):
                raise LLMConfigError(f"`name` of {where} must be text.")
            checked.append(replace(endpoint, url=url))
        ids = Counter(endpoint.id for endpoint in checked)
        shared = sorted(endpoint_id for endpoint_id, n in ids.items() if n > 1)
        if shared:
            raise LLMConfigError(
                f"Several endpoints of {_conn(self.conn_id)} are named {', '.join(shared)}: "
                "give each a distinct `name` (endpoints that share a URL need one)."
            )
        object.__setattr__(self, "endpoints", tuple(checked))

    @classmethod
    def from_connection(cls, conn: ConnectionLike) -> ClientSettings:
        """Read settings from an Airflow connection (host, password, extra)."""
        extra = conn.extra_dejson
        if not isinstance(extra, dict):
            raise LLMConfigError(
                f"The extra of {_conn(conn.conn_id)} must be a JSON object, "
                f"e.g. {json.dumps(EXTRA_EXAMPLE)}."
            )
        unknown = sorted(set(extra) - set(EXTRA_FIELDS))
        if unknown:
            raise LLMConfigError(
                f"Unknown field(s) {', '.join(unknown)} in the extra of {_conn(conn.conn_id)}; "
                f"known fields: {', '.join(EXTRA_FIELDS)}."
            )
        values = {
            name: _coerce(name, value, EXTRA_FIELDS[name], conn.conn_id)
            for name, value in extra.items()
        }
        if "endpoints" in values:
            values["endpoints"] = _endpoints_from(values["endpoints"], conn.conn_id)
        return cls(
            base_url="" if values.get("endpoints") and not conn.host else _base_url_from(conn),
            api_key=conn.password or "",
            conn_id=conn.conn_id,
            **values,
        )

    def _error(self, name: str, problem: str) -> LLMConfigError:
        return LLMConfigError(
            f"Setting {name}={getattr(self, name)!r} {problem}: "
            f"fix `{name}` in the extra of {_conn(self.conn_id)}."
        )

    def _check_number(
        self, name: str, *, minimum: float, integer: bool = False, strict: bool = False
    ) -> None:
        value = getattr(self, name)
        kinds: tuple[type, ...] = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self._error(name, "must be an integer" if integer else "must be a number")
        if value < minimum or (strict and value == minimum):
            relation = ">" if strict else ">="
            raise self._error(name, f"must be {relation} {minimum}")


EXTRA_FIELDS: dict[str, type] = {
    f.name: {
        "str": str,
        "int": int,
        "float": float,
        "float | None": float,
        "tuple[EndpointSettings, ...]": list,
    }[str(f.type)]
    for f in fields(ClientSettings)
    if f.name not in ("base_url", "api_key", "conn_id")
}
"""Names allowed in the connection's extra JSON, with the type each is read as."""

EXTRA_EXAMPLE: dict[str, Any] = {
    "adapter": "batch",
    "model": "sim-small",
    "timeout_s": 30,
    "max_attempts": 4,
    "price_input_per_1k": 0.0005,
    "price_output_per_1k": 0.0015,
}


def _conn(conn_id: str | None) -> str:
    return f"connection {conn_id!r}" if conn_id else "the LLM connection"


def _endpoints_from(value: Any, conn_id: str | None) -> tuple[EndpointSettings, ...]:
    """Read the extra's `endpoints` list into `EndpointSettings`, naming any bad entry."""
    if not isinstance(value, list):
        raise LLMConfigError(
            f"`endpoints` in the extra of {_conn(conn_id)} must be a list of objects such as "
            '{"url": "https://api.example.com", "api_key": "...", "weight": 1, "rpm": 500}.'
        )
    endpoints: list[EndpointSettings] = []
    for position, entry in enumerate(value):
        where = f"endpoints[{position}] in the extra of {_conn(conn_id)}"
        if not isinstance(entry, dict) or not entry.get("url"):
            raise LLMConfigError(f"{where} must be an object with at least a `url`.")
        unknown = sorted(set(entry) - set(ENDPOINT_FIELDS))
        if unknown:
            raise LLMConfigError(
                f"Unknown field(s) {', '.join(unknown)} in {where}; known fields: "
                f"{', '.join(ENDPOINT_FIELDS)}."
            )
        endpoints.append(
            EndpointSettings(
                **{
                    name: _coerce(
                        f"endpoints[{position}].{name}", v, ENDPOINT_FIELDS[name], conn_id
                    )
                    for name, v in entry.items()
                }
            )
        )
    return tuple(endpoints)


def _coerce(name: str, value: Any, kind: type, conn_id: str | None) -> Any:
    """Accept numbers (and the endpoint list) given as strings: connection URIs carry text."""
    if kind is list and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise LLMConfigError(
                f"Setting {name} is not a JSON list: fix `{name}` in the extra of {_conn(conn_id)}."
            ) from exc
    if kind in (str, list) or not isinstance(value, str):
        return value
    try:
        return int(value) if kind is int else float(value)
    except ValueError as exc:
        raise LLMConfigError(
            f"Setting {name}={value!r} is not a number: fix `{name}` in the extra of "
            f"{_conn(conn_id)}."
        ) from exc


def _base_url_from(conn: ConnectionLike) -> str:
    host = (conn.host or "").strip()
    if not host:
        raise LLMConfigError(
            f"No base URL: set the host (Base URL) of {_conn(conn.conn_id)}, "
            "e.g. http://127.0.0.1:8765."
        )
    schema = (conn.schema or "").strip().lower()
    if "://" in host:
        url = host
        given = urlsplit(host).scheme.lower()
        if schema and schema != given:
            raise LLMConfigError(
                f"The host of {_conn(conn.conn_id)} says {given} but its schema says {schema}: "
                "clear the schema or make them agree."
            )
    else:
        scheme = schema or "http"
        if scheme not in ("http", "https"):
            raise LLMConfigError(
                f"Schema {scheme!r} of {_conn(conn.conn_id)} must be http or https."
            )
        url = f"{scheme}://{host}"
    if not conn.port:
        return url
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise LLMConfigError(f"The host of {_conn(conn.conn_id)} has an invalid port.") from exc
    if port is None:
        return urlunsplit(parts._replace(netloc=f"{parts.netloc}:{conn.port}"))
    if port != conn.port:
        raise LLMConfigError(
            f"The host of {_conn(conn.conn_id)} names port {port} but its port field says "
            f"{conn.port}: clear the port field or make them agree."
        )
    return url


def _check_base_url(base_url: Any, conn_id: str | None) -> str:
    fix = f"fix the host (Base URL) of {_conn(conn_id)}, e.g. http://127.0.0.1:8765"
    if not isinstance(base_url, str):
        raise LLMConfigError(f"Base URL {base_url!r} is not a string: {fix}.")
    parts = urlsplit(base_url.strip())
    if "@" in parts.netloc:
        # The base URL ends up in logs and the llm_calls audit trail; so does this message.
        raise LLMConfigError(
            f"The base URL of {_conn(conn_id)} must not carry credentials: "
            "put the API key in the connection's password."
        )
    try:
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise LLMConfigError(f"Base URL {base_url!r} has an invalid port: {fix}.") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LLMConfigError(f"Base URL {base_url!r} needs http:// or https:// and a host: {fix}.")
    if parts.query or parts.fragment:
        raise LLMConfigError(f"Base URL {base_url!r} must not have a query or fragment: {fix}.")
    return urlunsplit(parts._replace(path=parts.path.rstrip("/")))
