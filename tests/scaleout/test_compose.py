"""docker-compose.yaml, the Dockerfile and .env.example: valid, complete and in line with the code.

No Docker engine runs here, so the file is checked as Compose would read it: against the Compose
Specification's JSON schema (vendored, see compose-spec.NOTICE), with `${VAR}` interpolated from
.env.example, and every name it shares with the code (pool, connections, connection type and
extra, environment variables, Airflow and simulator command lines) checked against that code.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from llm_batch import config
from llm_batch.simulator.__main__ import parse_args as parse_simulator_args
from llm_hook.hook import LLMHook
from llm_hook.settings import ClientSettings
from tests.conftest import REPO_ROOT
from tests.scaleout.task_code import task_time_files

COMPOSE_FILE = REPO_ROOT / "docker-compose.yaml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERFILE = REPO_ROOT / "Dockerfile"
SCHEMA = Path(__file__).with_name("compose-spec.json")

AIRFLOW_SERVICES = {
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
}
LONG_RUNNING = AIRFLOW_SERVICES | {"postgres", "redis", "mongo", "llm-simulator"}
VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}|\$)")


def read_env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: not NAME=value: {line!r}"
            values[name.strip()] = value
    return values


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


def filled_env() -> dict[str, str]:
    """.env.example with its required secrets filled in, as a user's .env would be."""
    env = read_env_example()
    return {name: value or f"example-{name.lower()}" for name, value in env.items()}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as Compose reads it with a .env made from .env.example."""
    return dict(interpolate_values(yaml.safe_load(COMPOSE_FILE.read_text()), filled_env()))


def interpolate_values(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value of the parsed file, as Compose does after parsing YAML."""
    if isinstance(node, dict):
        return {key: interpolate_values(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_values(value, env) for value in node]
    return interpolate(node, env) if isinstance(node, str) else node


def init_commands(compose: Mapping[str, Any]) -> list[list[str]]:
    """The `airflow ...` command lines of airflow-init's script, as argv lists."""
    script = compose["services"]["airflow-init"]["command"][1]
    commands = []
    for line in script.splitlines():
        argv = shlex.split(line)
        if argv and argv[0] == "airflow":
            stop = next(
                (i for i, word in enumerate(argv) if word in ("||", "&&", "|") or ">" in word),
                len(argv),
            )
            commands.append(argv[:stop])
    return commands


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_compose_file_is_valid_against_the_compose_specification(
    raw: dict[str, Any], compose: dict[str, Any]
) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    for document in (raw, compose):
        errors = [
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(document)
        ]
        assert not errors, errors
    # The schema can fail: a misspelt key is refused.
    broken = {**compose, "services": {"x": {"imagee": "mongo:8"}}}
    assert list(validator.iter_errors(broken))


def test_it_has_the_services_of_the_official_airflow_compose_file_plus_mongo_and_the_simulator(
    raw: dict[str, Any], compose: dict[str, Any]
) -> None:
    services = compose["services"]
    assert set(services) == LONG_RUNNING | {"airflow-init"}
    assert "x-airflow-common" in raw
    assert services["mongo"]["image"] == "mongo:8"
    for name in AIRFLOW_SERVICES | {"airflow-init"}:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert "@redis:6379/" in env["AIRFLOW__CELERY__BROKER_URL"]
        assert "_PIP_ADDITIONAL_REQUIREMENTS" not in env, "dependencies belong in the image"
        assert services[name]["build"] == "." and services[name]["image"]
    for name, expected in {
        "airflow-apiserver": "api-server",
        "airflow-scheduler": "scheduler",
        "airflow-dag-processor": "dag-processor",
        "airflow-triggerer": "triggerer",
        "airflow-worker": "celery worker",
    }.items():
        assert services[name]["command"] == expected


def test_every_long_running_service_has_a_health_check_and_waits_for_what_it_needs(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in LONG_RUNNING:
        assert services[name]["healthcheck"]["test"], name
    for name in AIRFLOW_SERVICES:
        needs = services[name]["depends_on"]
        for backing in ("postgres", "redis", "mongo"):
            assert needs[backing]["condition"] == "service_healthy", (name, backing)
        assert needs["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["airflow-worker"]["depends_on"]["airflow-apiserver"]["condition"] == (
        "service_healthy"
    )
    assert services["airflow-worker"]["depends_on"]["llm-simulator"]["condition"] == (
        "service_healthy"
    )


def test_the_worker_can_be_scaled_out(compose: dict[str, Any]) -> None:
    worker = compose["services"]["airflow-worker"]
    # `--scale airflow-worker=N` fails with a fixed container name or a published host port.
    assert "container_name" not in worker and "ports" not in worker
    assert "hostname" not in worker
    # Nothing but logs is mounted: the code is in the image, nothing is shared through a path.
    assert all(str(volume).startswith("airflow-logs:") for volume in worker.get("volumes", []))


def test_every_airflow_command_parses_with_airflows_own_command_line(
    compose: dict[str, Any],
) -> None:
    from airflow.cli.cli_parser import get_parser

    parser = get_parser()
    commands = init_commands(compose)
    assert [argv[1:3] for argv in commands][:2] == [["db", "migrate"], ["pools", "set"]]
    for name in AIRFLOW_SERVICES:
        commands.append(["airflow", *compose["services"][name]["command"].split()])
    for argv in commands:
        parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown command or option


def test_airflow_init_writes_the_pool_and_connections_the_dags_and_hook_read(
    compose: dict[str, Any],
) -> None:
    commands = {tuple(argv[1:4]): argv for argv in init_commands(compose)}
    pool = next(argv for key, argv in commands.items() if key[:2] == ("pools", "set"))
    assert pool[3] == config.POOL_NAME
    assert int(pool[4]) == int(read_env_example()["LLM_BATCH_POOL_SLOTS"])

    mongo = commands[("connections", "add", config.MONGO_CONN_ID)]
    fields = json.loads(option(mongo, "--conn-json"))
    assert fields["conn_type"] == "mongo"
    assert fields["host"] == "mongo" and fields["port"] == 27017
    assert fields["schema"] == config.DEFAULT_DATABASE
    assert isinstance(fields["extra"], dict)
    assert ("connections", "delete", config.MONGO_CONN_ID) in commands

    llm = commands[("connections", "add", config.LLM_CONN_ID)]
    assert option(llm, "--conn-type") == LLMHook.conn_type
    assert option(llm, "--conn-host") == "http://llm-simulator:8765"
    extra = json.loads(option(llm, "--conn-extra"))
    known = {f.name for f in dataclasses.fields(ClientSettings)}
    assert set(extra) <= known, f"not ClientSettings fields: {set(extra) - known}"
    assert ("connections", "delete", config.LLM_CONN_ID) in commands


def test_the_simulator_service_runs_with_flags_the_simulator_accepts(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["llm-simulator"]
    assert service["entrypoint"] == ["python", "-m", "llm_batch.simulator"]
    args = parse_simulator_args(service["command"])
    assert (args.host, args.port) == ("0.0.0.0", 8765)
    assert args.api_key == filled_env()["LLM_API_KEY"]
    assert args.config.latency_ms == 300
    assert "8765" in compose["services"]["airflow-init"]["command"][1]
    healthcheck = " ".join(service["healthcheck"]["test"])
    assert "localhost:8765/healthz" in healthcheck


def test_every_variable_is_documented_in_env_example_and_every_documented_one_used() -> None:
    text = COMPOSE_FILE.read_text()
    used = {m.group("braced") for m in VARIABLE.finditer(text) if m.group("braced")}
    documented = set(read_env_example())
    assert used - documented == set(), "add these to .env.example with a comment"
    assert documented - used == set(), "these .env.example variables are used nowhere"


def test_the_pipelines_environment_variables_reach_the_airflow_containers(
    compose: dict[str, Any],
) -> None:
    """Every LLM_BATCH_* variable the DAGs and include/ read at task time is passed through."""
    read = set()
    for path in task_time_files():
        read |= set(re.findall(r"\"(LLM_BATCH_[A-Z0-9_]+)\"", path.read_text()))
    read.add(config.CACHE_MAX_AGE_ENV)
    env = compose["services"]["airflow-worker"]["environment"]
    passed = {name for name in env if name.startswith("LLM_BATCH_")}
    assert read <= passed, f"not passed to the containers: {read - passed}"
    assert passed <= read, f"passed but read by no task code: {passed - read}"


def test_the_image_installs_the_pinned_requirements_and_the_project() -> None:
    dockerfile = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert base is not None
    pinned = re.search(
        r"^apache-airflow==(\S+)", (REPO_ROOT / "requirements.txt").read_text(), re.M
    )
    assert pinned is not None
    assert base.group(1) == f"apache/airflow:{pinned.group(1)}-python3.11"
    assert "pip install --no-cache-dir -r requirements.txt -c constraints.txt" in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    assert "COPY dags /opt/airflow/dags" in dockerfile
    requirements = (REPO_ROOT / "requirements.txt").read_text()
    for needed in ("apache-airflow-providers-celery==", "psycopg2-binary==", "asyncpg=="):
        assert needed in requirements
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".work"} <= set(ignored), "secrets and local state stay out"
