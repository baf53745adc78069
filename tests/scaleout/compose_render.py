"""docker-compose.yaml as Compose reads it: `${VAR}` interpolated from a `.env`, YAML merges done.

No Docker engine runs here; the static checks (test_compose.py) and the native topology
(conftest.py) both read the file through these functions, so both see what Compose would give
each container.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import pairwise
from typing import Any

import yaml

from tests.conftest import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}|\$)")
AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)
HEADROOM = 8
"""Task instances besides `process_batch` a full pool must leave room for (create, plan,
reconcile of concurrent runs): the sizing rule of .env.example."""


def read_env_file(text: str) -> dict[str, str]:
    """Parse a `.env` as Compose does for these files: NAME=value lines, `#` comments."""
    values = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env: not NAME=value: {line!r}"
            values[name.strip()] = value
    return values


def read_env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE.read_text())


def filled_env() -> dict[str, str]:
    """.env.example with its required secrets filled in, as a user's .env would be."""
    env = read_env_example()
    return {name: value or f"example-{name.lower()}" for name, value in env.items()}


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's interpolation: ${V}, ${V:-default}, ${V-default}, ${V:?err}, ${V?err}, $$."""

    def substitute(match: re.Match[str]) -> str:
        name, rest = match.group("braced"), match.group("rest")
        if name is None:
            return "$"
        value = env.get(name)
        if rest.startswith(":-"):
            return value if value else rest[2:]
        if rest.startswith("-"):
            return value if value is not None else rest[1:]
        if rest.startswith((":?", "?")):
            if not value if rest.startswith(":?") else value is None:
                raise AssertionError(f"{name} is required: {rest.lstrip(':?')}")
            return str(value)
        assert not rest, f"unsupported interpolation ${{{name}{rest}}}"
        return value or ""

    return VARIABLE.sub(substitute, text)


def interpolate_values(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of the parsed file, as Compose does after parsing YAML."""
    if isinstance(node, dict):
        return {key: interpolate_values(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_values(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def render(env: Mapping[str, str]) -> dict[str, Any]:
    """Return the compose file as Compose reads it with `env` as its `.env`."""
    return dict(interpolate_values(yaml.safe_load(COMPOSE_FILE.read_text()), env))


def service_environment(compose: Mapping[str, Any], service: str) -> dict[str, str]:
    """Return the environment Compose gives `service`'s container, values as strings."""
    env = compose["services"][service].get("environment") or {}
    assert isinstance(env, dict), f"{service}: environment must be a mapping"
    return {
        str(k): "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
        for k, v in env.items()
    }


def connection_budget(compose: Mapping[str, Any], workers: int) -> int:
    """Return the most PostgreSQL connections the Airflow services can hold at once.

    Each Airflow process has a sync and an async SQLAlchemy engine, each bounded by
    pool_size + max_overflow; the api-server runs `[api] workers` processes; the scheduler also
    reads Celery results (one connection); each Celery worker process (concurrency + the main
    one) holds a connection of the database result backend.
    """

    def per_engine(env: Mapping[str, str]) -> int:
        return int(env["AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE"]) + int(
            env["AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW"]
        )

    api = service_environment(compose, "airflow-apiserver")
    total = int(api["AIRFLOW__API__WORKERS"]) * 2 * per_engine(api)
    for name in ("airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        total += 2 * per_engine(service_environment(compose, name))
    total += 1
    worker = service_environment(compose, "airflow-worker")
    total += workers * (int(worker["AIRFLOW__CELERY__WORKER_CONCURRENCY"]) + 1)
    return total


def postgres_max_connections(compose: Mapping[str, Any]) -> int:
    """Return the `max_connections` the `postgres` service's command starts the server with."""
    command = compose["services"]["postgres"]["command"]
    settings = dict(value.split("=", 1) for flag, value in pairwise(command) if flag == "-c")
    return int(settings["max_connections"])
