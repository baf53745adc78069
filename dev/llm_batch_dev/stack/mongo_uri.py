"""MongoDB connection strings: parsing, redaction, and the Airflow `mongo` connection they become.

The stack takes one URI (`LLM_BATCH_MONGO_URI`, or the local SecantusDB's) and must hand the
pipeline the same server, credentials and auth database two ways: as a URI, and as the fields
of an Airflow `mongo` connection, which MongoHook turns back into a URI of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from llm_batch_dev.stack.errors import StackError


@dataclass(frozen=True)
class MongoURI:
    """The parts of a `mongodb://` or `mongodb+srv://` URI, decoded."""

    srv: bool
    hosts: str
    """As written: `host`, `host:port`, `[::1]:27017` or `h1:27017,h2:27017`."""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str | None = None
    options: tuple[tuple[str, str], ...] = ()
    """Query options in order, values decoded, repeated names kept."""


def parse_mongo_uri(uri: str) -> MongoURI:
    """Split a MongoDB connection string; raise StackError saying what is wrong with it."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in ("mongodb", "mongodb+srv"):
        raise StackError(
            f"Not a MongoDB URI: {redact_uri(uri)!r}; expected mongodb://host[:port]/db or "
            "mongodb+srv://host/db."
        )
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = netloc.rpartition("@")
    if not hosts:
        raise StackError(f"The MongoDB URI {redact_uri(uri)!r} names no host.")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user)
        password = unquote(secret) if colon else None
    path, _, query = tail.partition("?")
    database = unquote(path.lstrip("/")) or None
    options = tuple(
        (unquote(name), unquote(value))
        for name, _, value in (item.partition("=") for item in query.split("&") if item)
    )
    if scheme == "mongodb+srv" and ("," in hosts or _split_port(hosts)[1] is not None):
        raise StackError(
            f"A mongodb+srv URI names exactly one host and no port: {redact_uri(uri)!r}."
        )
    return MongoURI(scheme == "mongodb+srv", hosts, username, password, database, options)


def mongo_connection_fields(uri: str, default_database: str) -> dict[str, Any]:
    """Fields of an Airflow `mongo` connection that make MongoHook connect as `uri` does.

    MongoHook rebuilds `mongodb[+srv]://login:password@host[:port]/schema` and passes the extra
    as keyword options to MongoClient, so query options move to the extra (typed), `+srv` becomes
    `"srv": true`, and the database goes to `schema`. Putting a database in the path also makes it
    the default auth database, so a URI that had none gets `authSource=admin`, which it meant.
    """
    parsed = parse_mongo_uri(uri)
    host, port = (parsed.hosts, None) if "," in parsed.hosts else _split_port(parsed.hosts)
    extra: dict[str, Any] = {}
    for name, value in parsed.options:
        typed = _option_value(value)
        if name in extra:
            previous = extra[name]
            extra[name] = [*previous, typed] if isinstance(previous, list) else [previous, typed]
        else:
            extra[name] = typed
    if parsed.srv:
        extra["srv"] = True
    if parsed.username is not None and parsed.password is None:
        # MongoHook drops a login without a password; MongoClient takes it as an option.
        extra["username"] = parsed.username
    if _needs_auth_source(parsed):
        extra["authSource"] = "admin"
    return {
        "host": host,
        "port": port,
        "login": parsed.username,
        "password": parsed.password,
        "schema": parsed.database or default_database,
        "extra": extra,
    }


def uri_with_database(uri: str, database: str) -> str:
    """`uri` with `database` as its default database (same server, credentials and auth source)."""
    parsed = parse_mongo_uri(uri)
    if parsed.database:
        return uri
    scheme, _, rest = uri.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, query = rest[:cut], rest[cut:].lstrip("/").lstrip("?")
    if _needs_auth_source(parsed):
        query = "&".join(part for part in (query, "authSource=admin") if part)
    return f"{scheme}://{netloc}/{quote(database, safe='')}" + (f"?{query}" if query else "")


def _needs_auth_source(parsed: MongoURI) -> bool:
    """True if naming a database would change which database the credentials are checked in."""
    names = {name.lower(): value for name, value in parsed.options}
    mechanism = names.get("authmechanism", "SCRAM-SHA-256").upper()
    return (
        parsed.username is not None
        and parsed.database is None
        and "authsource" not in names
        and mechanism.startswith(("SCRAM", "MONGODB-CR", "DEFAULT"))
    )


def _split_port(host: str) -> tuple[str, int | None]:
    """`host:port` -> (host, port); IPv6 literals keep their brackets."""
    if host.startswith("["):
        literal, _, rest = host.partition("]")
        port = rest.removeprefix(":")
        return f"{literal}]", int(port) if port.isdigit() else None
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        return name, int(port)
    return host, None


def _option_value(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value.isdigit():
        return int(value)
    return value


def redact_uri(uri: str) -> str:
    """Return `uri` with its password replaced, for messages and logs."""
    scheme, sep, rest = uri.partition("://")
    userinfo, at, after = rest.partition("@")
    if not (sep and at and ":" in userinfo):
        return uri
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{after}"
