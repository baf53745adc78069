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
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from llm_batch import config
from llm_batch.compose_env import (
    ALERT_SLACK_CONN_ENV,
    ALERT_SMTP_CONN_ENV,
    LLM_CONN_ENV,
    MONGO_CONN_ENV,
    derived_environment,
)
from llm_batch_dev.simulator.__main__ import parse_args as parse_simulator_args
from llm_hook.hook import LLMHook
from llm_hook.settings import ClientSettings
from tests.conftest import REPO_ROOT
from tests.scaleout.compose_render import (
    AIRFLOW_SERVICES,
    COMPOSE_FILE,
    HEADROOM,
    VARIABLE,
    connection_budget,
    filled_env,
    postgres_max_connections,
    read_env_example,
    render,
    service_environment,
)
from tests.scaleout.task_code import task_time_files

DOCKERFILE = REPO_ROOT / "Dockerfile"
SCALE_OUT_DOC = REPO_ROOT / "docs" / "scale-out.md"
SCHEMA = Path(__file__).with_name("compose-spec.json")
LONG_RUNNING = set(AIRFLOW_SERVICES) | {"postgres", "redis", "mongo", "llm-simulator"}
SECRETS = (
    "POSTGRES_PASSWORD",
    "MONGO_PASSWORD",
    "LLM_API_KEY",
    "AIRFLOW_FERNET_KEY",
    "ALERT_SMTP_PASSWORD",
    "ALERT_SLACK_WEBHOOK_URL",
)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as Compose reads it with a .env made from .env.example."""
    return render(filled_env())


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


def container_environment(compose: Mapping[str, Any], service: str) -> dict[str, str]:
    """What the container's processes see: compose's environment plus the entrypoint's."""
    return derived_environment(service_environment(compose, service))


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
    for name in {*AIRFLOW_SERVICES, "airflow-init"}:
        env = container_environment(compose, name)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert urlsplit(env["AIRFLOW__CELERY__BROKER_URL"]).netloc.endswith("redis:6379")
        assert "_PIP_ADDITIONAL_REQUIREMENTS" not in env, "dependencies belong in the image"
        assert services[name]["entrypoint"][2] == "llm-batch-compose-env", name
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
    assert [argv[1:3] for argv in commands] == [["db", "migrate"], ["pools", "set"]]
    for name in AIRFLOW_SERVICES:
        commands.append(["airflow", *compose["services"][name]["command"].split()])
    for argv in commands:
        parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown command or option


def test_airflow_init_sets_the_pool_and_every_container_has_the_connections_the_code_reads(
    compose: dict[str, Any],
) -> None:
    from airflow.models.connection import Connection

    pool = next(argv for argv in init_commands(compose) if argv[1:3] == ["pools", "set"])
    assert pool[3] == config.POOL_NAME
    assert int(pool[4]) == int(read_env_example()["LLM_BATCH_POOL_SLOTS"])
    for service in AIRFLOW_SERVICES:
        env = container_environment(compose, service)
        mongo = Connection.from_json(env[MONGO_CONN_ENV], conn_id=config.MONGO_CONN_ID)
        assert (mongo.conn_type, mongo.host, mongo.port) == ("mongo", "mongo", 27017)
        assert mongo.schema == config.DEFAULT_DATABASE
        assert mongo.password == filled_env()["MONGO_PASSWORD"]
        assert mongo.extra_dejson == {"authSource": "admin"}
        llm = Connection.from_json(env[LLM_CONN_ENV], conn_id=config.LLM_CONN_ID)
        assert llm.conn_type == LLMHook.conn_type
        assert llm.host == "http://llm-simulator:8765"
        assert llm.password == filled_env()["LLM_API_KEY"]
        known = {f.name for f in dataclasses.fields(ClientSettings)}
        assert set(llm.extra_dejson) <= known, set(llm.extra_dejson) - known


def test_the_alert_connections_come_from_env_when_set_and_the_settings_name_them(
    compose: dict[str, Any],
) -> None:
    """Issue 14: alert secrets live in Airflow connections; the settings only name them."""
    from airflow.models.connection import Connection

    filled = filled_env()
    for service in AIRFLOW_SERVICES:
        env = container_environment(compose, service)
        smtp = Connection.from_json(env[ALERT_SMTP_CONN_ENV], conn_id="smtp_default")
        assert (smtp.conn_type, smtp.host, smtp.port) == ("smtp", filled["ALERT_SMTP_HOST"], 587)
        assert (smtp.login, smtp.password) == (
            filled["ALERT_SMTP_USER"],
            filled["ALERT_SMTP_PASSWORD"],
        )
        assert smtp.extra_dejson == {"disable_ssl": True}
        assert env[config.ALERT_SMTP_CONN_ID_ENV] == config.DEFAULT_ALERT_SMTP_CONN_ID
        slack = Connection.from_json(env[ALERT_SLACK_CONN_ENV], conn_id=config.ALERT_SLACK_CONN_ID)
        assert (slack.conn_type, slack.password) == (
            "slackwebhook",
            filled["ALERT_SLACK_WEBHOOK_URL"],
        )
    unset = {**filled, "ALERT_SMTP_HOST": "", "ALERT_SLACK_WEBHOOK_URL": ""}
    env = derived_environment(service_environment(render(unset), "airflow-worker"))
    assert ALERT_SMTP_CONN_ENV not in env and ALERT_SLACK_CONN_ENV not in env
    assert read_env_example()[config.ALERT_SLACK_CONN_ID_ENV] == "", "Slack is off by default"


def test_connections_are_never_deleted_and_no_secret_is_on_a_command_line(
    compose: dict[str, Any],
) -> None:
    """Defect 4: no delete/re-add window for running tasks; no password in `ps` output."""
    script = compose["services"]["airflow-init"]["command"][1]
    assert "connections" not in script, "connections are AIRFLOW_CONN_* variables, not CLI calls"
    secrets = [filled_env()[name] for name in SECRETS]
    # Not llm-simulator: the development stand-in takes its own key as a flag (dev/ owns it).
    for name in (*AIRFLOW_SERVICES, "airflow-init", "postgres", "redis", "mongo"):
        service = compose["services"][name]
        argv = json.dumps([service.get("entrypoint"), service.get("command")])
        health = json.dumps(service.get("healthcheck", {}).get("test"))
        for secret in secrets:
            assert secret not in argv and secret not in health, (name, secret)


def test_every_airflow_container_shares_the_api_secret_key_from_a_required_variable(
    raw: dict[str, Any], compose: dict[str, Any]
) -> None:
    """Defect 1: with a key per container the api-server gets 403 fetching a worker's logs."""
    common = raw["x-airflow-common"]["environment"]
    assert re.fullmatch(r"\$\{AIRFLOW_API_SECRET_KEY:\?[^}]+\}", common["AIRFLOW__API__SECRET_KEY"])
    keys = {
        service_environment(compose, name).get("AIRFLOW__API__SECRET_KEY")
        for name in (*AIRFLOW_SERVICES, "airflow-init")
    }
    assert keys == {filled_env()["AIRFLOW_API_SECRET_KEY"]}
    jwt = {
        service_environment(compose, n)["AIRFLOW__API_AUTH__JWT_SECRET"] for n in AIRFLOW_SERVICES
    }
    assert len(jwt) == 1
    with pytest.raises(AssertionError, match="AIRFLOW_API_SECRET_KEY is required"):
        render({**filled_env(), "AIRFLOW_API_SECRET_KEY": ""})


def test_compose_is_one_host_and_the_docs_send_multi_host_to_the_helm_chart(
    compose: dict[str, Any],
) -> None:
    """Defect 2: every address a container uses is a service of this file; none is published
    but the api-server's, so workers elsewhere could not join, and the docs do not say they can."""
    services = compose["services"]
    for name in AIRFLOW_SERVICES:
        env = container_environment(compose, name)
        hosts = {
            urlsplit(env[key]).hostname
            for key in (
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                "AIRFLOW__CELERY__BROKER_URL",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
                "LLM_URL",
            )
        } | {env["MONGO_HOST"]}
        assert hosts <= set(services), (name, hosts - set(services))
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {"airflow-apiserver"}
    doc = " ".join(SCALE_OUT_DOC.read_text().split())
    assert "single host" in doc and "Helm chart" in doc
    assert "other machines" not in doc.split("## Kubernetes")[0], "compose is one host"


def test_the_default_workers_can_fill_the_pool(compose: dict[str, Any]) -> None:
    """Defect 3: workers x concurrency below the pool's slots leaves slots that never run."""
    env = read_env_example()
    slots = int(env["LLM_BATCH_POOL_SLOTS"])
    worker = service_environment(compose, "airflow-worker")
    concurrency = int(worker["AIRFLOW__CELERY__WORKER_CONCURRENCY"])
    assert concurrency == int(env["AIRFLOW_WORKER_CONCURRENCY"])
    assert concurrency >= slots + HEADROOM, "one worker must run a full pool plus its headroom"
    parallelism = int(worker["AIRFLOW__CORE__PARALLELISM"])
    assert parallelism >= concurrency, "parallelism caps every worker together"
    deploy = compose["services"]["airflow-worker"].get("deploy") or {}
    assert deploy.get("replicas", 1) == 1


def test_postgres_accepts_the_connections_the_airflow_services_can_hold(
    compose: dict[str, Any],
) -> None:
    """Defect 5: pools and the result backend within PostgreSQL's max_connections."""
    max_connections = postgres_max_connections(compose)
    reserved = 3  # superuser_reserved_connections
    for workers in (1, 2):
        budget = connection_budget(compose, workers)
        assert budget <= max_connections - reserved, (workers, budget, max_connections)
    api = service_environment(compose, "airflow-apiserver")
    assert int(api["AIRFLOW__API__WORKERS"]) >= 2, "the embedded stack's api-server tuning"


def test_the_api_server_is_published_on_localhost_only_by_default(compose: dict[str, Any]) -> None:
    """Defect 6: SimpleAuthManager is for development; 0.0.0.0 only when the operator says so."""
    (port,) = compose["services"]["airflow-apiserver"]["ports"]
    assert port == "127.0.0.1:8080:8080"
    exposed = render({**filled_env(), "AIRFLOW_BIND": "0.0.0.0"})
    assert exposed["services"]["airflow-apiserver"]["ports"] == ["0.0.0.0:8080:8080"]
    env = service_environment(compose, "airflow-apiserver")
    assert "SIMPLE_AUTH_MANAGER" in " ".join(env), "if the auth manager changes, so must this"


@pytest.mark.parametrize("password", ['p@ss%w"rd/:?#', "plain"])
def test_passwords_with_url_and_json_special_characters_reach_airflow_intact(
    password: str,
) -> None:
    """Defect 6: a password with `@ % "` is percent-encoded into URLs, JSON-escaped in conns."""
    from airflow.models.connection import Connection
    from sqlalchemy.engine import make_url

    env = {
        **filled_env(),
        "POSTGRES_PASSWORD": password,
        "MONGO_PASSWORD": password,
        "LLM_API_KEY": password,
        "ALERT_SMTP_PASSWORD": password,
    }
    container = derived_environment(service_environment(render(env), "airflow-worker"))
    url = make_url(container["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert (url.password, url.host, url.port, url.database) == (
        password,
        "postgres",
        5432,
        "airflow",
    )
    backend = make_url(container["AIRFLOW__CELERY__RESULT_BACKEND"].removeprefix("db+"))
    assert backend.password == password
    mongo = Connection.from_json(container[MONGO_CONN_ENV], conn_id=config.MONGO_CONN_ID)
    assert mongo.password == password
    llm = Connection.from_json(container[LLM_CONN_ENV], conn_id=config.LLM_CONN_ID)
    assert llm.password == password
    smtp = Connection.from_json(container[ALERT_SMTP_CONN_ENV], conn_id="smtp_default")
    assert smtp.password == password


def test_the_simulator_service_runs_with_flags_the_simulator_accepts(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["llm-simulator"]
    assert service["entrypoint"] == ["python", "-m", "llm_batch_dev.simulator"]
    args = parse_simulator_args(service["command"])
    assert (args.host, args.port) == ("0.0.0.0", 8765)
    assert args.api_key == filled_env()["LLM_API_KEY"]
    assert args.config.latency_ms == 300
    assert urlsplit(container_environment(compose, "airflow-worker")["LLM_URL"]).port == 8765
    healthcheck = " ".join(service["healthcheck"]["test"])
    assert "localhost:8765/healthz" in healthcheck


def test_the_simulator_runs_in_an_image_of_its_own_with_the_dev_package_alone(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["llm-simulator"]
    assert service["build"] == {"context": ".", "target": "simulator"}
    assert "image" not in service, "sharing the Airflow image's name would overwrite that tag"
    base, body = dockerfile_stages()["simulator"]
    assert base.startswith("python:3.11")
    assert "pip install --no-cache-dir --no-deps ./dev" in body
    assert list(dockerfile_stages())[-1] != "simulator", "Airflow's image stays the default"


def test_the_simulator_needs_nothing_beyond_the_standard_library() -> None:
    """Why its image installs the dev package with --no-deps: a fresh interpreter proves it."""
    code = (
        "import sys, llm_batch_dev.simulator.__main__; "
        "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported = set(json.loads(done.stdout.replace("'", '"')))
    # The script itself, and this venv's editable-install and setuptools import hooks.
    here = {m for m in imported if m.startswith("__editable__")} | {"__main__", "_distutils_hack"}
    assert imported - here == {"llm_batch_dev"}


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


def dockerfile_stages() -> dict[str, tuple[str, str]]:
    """The Dockerfile's build stages in order: name (or position) -> (base image, body)."""
    parts = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)[1:]
    stages = {}
    for position, part in enumerate(parts):
        header, _, body = part.partition("\n")
        image, _, name = header.partition(" AS ")
        stages[name.strip() or str(position)] = (image.strip(), body)
    return stages


def test_the_image_installs_runtime_requirements_on_the_official_constraints() -> None:
    stages = dockerfile_stages()
    base, dockerfile = list(stages.values())[-1]  # the default target: what `build: .` builds
    pinned = re.search(
        r"^apache-airflow==(\S+)", (REPO_ROOT / "requirements.txt").read_text(), re.M
    )
    assert pinned is not None
    assert base == f"apache/airflow:{pinned.group(1)}-python3.11"
    assert f"ARG AIRFLOW_VERSION={pinned.group(1)}" in dockerfile
    assert "constraints-${AIRFLOW_VERSION}/constraints-${PYTHON_VERSION}.txt" in dockerfile
    install = '"apache-airflow==${AIRFLOW_VERSION}" -r requirements.txt -c image-constraints.txt'
    assert install in dockerfile and "&& pip check" in dockerfile
    assert "requirements-dev" not in dockerfile and "constraints.txt ./" not in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    assert "COPY dags /opt/airflow/dags" in dockerfile
    assert "COPY dev" not in dockerfile, "the dev tooling stays out of the runtime image"
    requirements = (REPO_ROOT / "requirements.txt").read_text()
    for needed in ("apache-airflow-providers-celery==", "psycopg2-binary==", "asyncpg=="):
        assert needed in requirements
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".work"} <= set(ignored), "secrets and local state stay out"


def test_commands_outside_the_entrypoint_get_the_same_urls_through_airflows_cmd_options(
    compose: dict[str, Any],
) -> None:
    """Health checks and `docker compose exec` bypass the entrypoint: `_CMD` options cover them."""
    import subprocess
    import sys

    env = service_environment(compose, "airflow-worker")
    derived = derived_environment(env)
    tool = str(Path(sys.executable).parent / "llm-batch-compose-env")
    for name in (
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CELERY__BROKER_URL",
    ):
        command = shlex.split(env[f"{name}_CMD"])
        assert command[0] == "llm-batch-compose-env"
        printed = subprocess.run(
            [tool, *command[1:]], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        assert printed == derived[name]
