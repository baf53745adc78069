"""Client settings and how they are read from an Airflow connection.

Connection fields (connection type `llm_batch`):

- host: the service's base URL, e.g. `http://127.0.0.1:8765` or
  `https://llm.example.com/api` (no trailing slash needed). A bare host name
  also works; then `schema` (`http` or `https`, default `http`, as Airflow's
  HttpHook) and `port` complete it.
- password: the API key, sent as `Authorization: Bearer <key>`.
- extra: a JSON object with any of the `ClientSettings` fields below except
  `base_url` and `api_key`, by the same names, e.g.
  `{"model": "sim-small", "timeout_s": 30, "max_attempts": 4}`.
  Unknown names are rejected so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from llm_hook.adapters import ADAPTERS
from llm_hook.exceptions import LLMConfigError


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
class ClientSettings:
    """Everything the client needs to talk to one LLM service."""

    base_url: str
    """Scheme, host, optional port and path prefix; endpoints are appended (`/v1/batch`)."""
    api_key: str = field(repr=False)
    adapter: str = "batch"
    """Wire protocol: `batch` (the batch LLM API contract)."""
    model: str = "sim-small"
    """Model used when `complete` is not given one."""
    connect_timeout_s: float = 5.0
    timeout_s: float = 30.0
    """Read timeout: the longest silence allowed while waiting for the response."""
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
    conn_id: str | None = None
    """The Airflow connection these came from, named in error messages."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "base_url", _check_base_url(self.base_url, self.conn_id))
        if not isinstance(self.api_key, str) or not self.api_key.strip():
            raise LLMConfigError(
                f"No API key: set the password (API key) of {_conn(self.conn_id)}."
            )
        if self.adapter not in ADAPTERS:
            raise self._error("adapter", f"must be one of {', '.join(ADAPTERS)}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise self._error("model", "must be a non-empty model name")
        for name in ("connect_timeout_s", "timeout_s"):
            self._check_number(name, minimum=0.0, strict=True)
        for name in ("max_attempts", "max_rounds"):
            self._check_number(name, minimum=1, integer=True)
        self._check_number("max_rate_limit_waits", minimum=0, integer=True)
        for name in (
            "backoff_base_s",
            "backoff_max_s",
            "max_retry_after_s",
            "price_input_per_1k",
            "price_output_per_1k",
        ):
            self._check_number(name, minimum=0.0)

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
        return cls(
            base_url=_base_url_from(conn),
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
    f.name: {"str": str, "int": int, "float": float}[str(f.type)]
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


def _coerce(name: str, value: Any, kind: type, conn_id: str | None) -> Any:
    """Accept numbers given as strings: connection URIs carry every extra as text."""
    if kind is str or not isinstance(value, str):
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
