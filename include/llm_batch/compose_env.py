"""The Airflow settings docker-compose.yaml's `.env` implies, built where quoting can be done right.

Compose can only paste `${VAR}` into strings: a PostgreSQL password with `@`, `%` or `/` breaks
the database URL, and one with `"` breaks a JSON connection. Every Airflow container of the
compose file therefore starts through `llm-batch-compose-env <command>`, which derives from plain
variables (`POSTGRES_*`, `REDIS_*`, `MONGO_*`, `LLM_*`)

- `AIRFLOW__DATABASE__SQL_ALCHEMY_CONN` and `AIRFLOW__CELERY__RESULT_BACKEND`, URL-encoded;
- `AIRFLOW__CELERY__BROKER_URL`;
- the connections `mongo_default` and `llm_default` as `AIRFLOW_CONN_*` JSON: Airflow reads
  them from the environment on every lookup, so nothing deletes and re-adds them while tasks run,
  and no secret appears on a command line;
- the alert connections, when their variables are set: `smtp_default` from `ALERT_SMTP_*`
  (type `smtp`) and `llm_batch_alert_slack` from `ALERT_SLACK_WEBHOOK_URL` (type
  `slackwebhook`, the URL as its password); the `LLM_BATCH_ALERT_*` settings turn them on;

then replaces itself with `<command>` (`os.execvpe`): signals reach it as before. A variable that
is already set wins, so an operator can still override any of them. `--print NAME` prints one
derived value, for Airflow's `..._CMD` settings in processes the entrypoint did not start
(health checks, `docker compose exec`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import quote

from llm_batch import config

MONGO_CONN_ENV = f"AIRFLOW_CONN_{config.MONGO_CONN_ID.upper()}"
LLM_CONN_ENV = f"AIRFLOW_CONN_{config.LLM_CONN_ID.upper()}"
LLM_CONN_TYPE = "llm_batch"
ALERT_SMTP_CONN_ENV = f"AIRFLOW_CONN_{config.DEFAULT_ALERT_SMTP_CONN_ID.upper()}"
ALERT_SLACK_CONN_ENV = f"AIRFLOW_CONN_{config.ALERT_SLACK_CONN_ID.upper()}"
DEFAULT_ALERT_SMTP_EXTRA = '{"disable_ssl": true}'
"""STARTTLS on the submission port (587); `{}` for implicit TLS (465)."""


class ComposeEnvError(ValueError):
    """A variable the compose file should have set is missing or malformed."""


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ComposeEnvError(f"{name} is not set: set it in .env (see .env.example)")
    return value


def _json_value(env: Mapping[str, str], name: str, default: str) -> object:
    text = env.get(name) or default
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ComposeEnvError(f"{name} must be JSON, got {text!r}: {exc}") from exc


def postgres_url(env: Mapping[str, str], scheme: str = "postgresql+psycopg2") -> str:
    """Return the metadata DB's URL, user and password percent-encoded."""
    user = quote(env.get("POSTGRES_USER") or "airflow", safe="")
    password = quote(_required(env, "POSTGRES_PASSWORD"), safe="")
    host = env.get("POSTGRES_HOST") or "postgres"
    port = env.get("POSTGRES_PORT") or "5432"
    database = quote(env.get("POSTGRES_DB") or "airflow", safe="")
    return f"{scheme}://{user}:{password}@{host}:{port}/{database}"


def redis_url(env: Mapping[str, str]) -> str:
    """Return the Celery broker's URL (a password, when set, percent-encoded)."""
    password = env.get("REDIS_PASSWORD") or ""
    auth = f":{quote(password, safe='')}@" if password else ""
    host = env.get("REDIS_HOST") or "redis"
    port = env.get("REDIS_PORT") or "6379"
    database = env.get("REDIS_DB") or "0"
    return f"redis://{auth}{host}:{port}/{database}"


def mongo_connection(env: Mapping[str, str]) -> str:
    """Return `mongo_default` as Airflow's JSON connection format."""
    return json.dumps(
        {
            "conn_type": "mongo",
            "host": env.get("MONGO_HOST") or "mongo",
            "port": _json_value(env, "MONGO_PORT", "27017"),
            "login": env.get("MONGO_USER") or None,
            "password": env.get("MONGO_PASSWORD") or None,
            "schema": env.get("MONGO_DATABASE") or config.DEFAULT_DATABASE,
            "extra": _json_value(env, "MONGO_EXTRA", "{}"),
        }
    )


def llm_connection(env: Mapping[str, str]) -> str:
    """Return `llm_default` as Airflow's JSON connection format."""
    extra = {
        "adapter": env.get("LLM_ADAPTER") or "batch",
        "model": env.get("LLM_MODEL") or "sim-small",
        "timeout_s": _json_value(env, "LLM_TIMEOUT_S", "30"),
        "price_input_per_1k": _json_value(env, "LLM_PRICE_INPUT_PER_1K", "0"),
        "price_output_per_1k": _json_value(env, "LLM_PRICE_OUTPUT_PER_1K", "0"),
    }
    return json.dumps(
        {
            "conn_type": LLM_CONN_TYPE,
            "host": _required(env, "LLM_URL"),
            "password": _required(env, "LLM_API_KEY"),
            "extra": extra,
        }
    )


def alert_smtp_connection(env: Mapping[str, str]) -> str | None:
    """Return `smtp_default` as JSON from `ALERT_SMTP_*`; None when no host is set."""
    host = env.get("ALERT_SMTP_HOST")
    if not host:
        return None
    return json.dumps(
        {
            "conn_type": "smtp",
            "host": host,
            "port": _json_value(env, "ALERT_SMTP_PORT", "587"),
            "login": env.get("ALERT_SMTP_USER") or None,
            "password": env.get("ALERT_SMTP_PASSWORD") or None,
            "extra": _json_value(env, "ALERT_SMTP_EXTRA", DEFAULT_ALERT_SMTP_EXTRA),
        }
    )


def alert_slack_connection(env: Mapping[str, str]) -> str | None:
    """Return `llm_batch_alert_slack` as JSON from `ALERT_SLACK_WEBHOOK_URL`; None when unset."""
    url = env.get("ALERT_SLACK_WEBHOOK_URL")
    if not url:
        return None
    return json.dumps({"conn_type": "slackwebhook", "password": url})


def derived_environment(env: Mapping[str, str]) -> dict[str, str]:
    """Return `env` plus the Airflow settings it implies; variables already set are kept."""
    derived: dict[str, Callable[[], str | None]] = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": lambda: postgres_url(env),
        "AIRFLOW__CELERY__RESULT_BACKEND": lambda: "db+" + postgres_url(env),
        "AIRFLOW__CELERY__BROKER_URL": lambda: redis_url(env),
        MONGO_CONN_ENV: lambda: mongo_connection(env),
        LLM_CONN_ENV: lambda: llm_connection(env),
        ALERT_SMTP_CONN_ENV: lambda: alert_smtp_connection(env),
        ALERT_SLACK_CONN_ENV: lambda: alert_slack_connection(env),
    }
    result = dict(env)
    for name, build in derived.items():
        if not result.get(name) and (value := build()) is not None:
            result[name] = value
    return result


USAGE = "usage: llm-batch-compose-env COMMAND [ARG...] | llm-batch-compose-env --print NAME"


def main(argv: Sequence[str] | None = None) -> None:
    """Derive the settings, then run the given command in this process (or print one setting)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit(USAGE)
    try:
        env = derived_environment(os.environ)
    except ComposeEnvError as exc:
        raise SystemExit(f"llm-batch-compose-env: {exc}") from exc
    if args[0] == "--print":
        # For Airflow's `<option>_CMD` variables: processes not started through the entrypoint.
        if len(args) != 2 or args[1] not in env:
            raise SystemExit(USAGE)
        print(env[args[1]])
        return
    os.execvpe(args[0], args, env)


if __name__ == "__main__":
    main()
