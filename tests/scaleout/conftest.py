"""The scale-out topology, natively: CeleryExecutor on Redis, PostgreSQL metadata DB, two workers.

The same services as docker-compose.yaml, as processes on this machine: a fresh PostgreSQL
database (`llm_batch_scaleout_<random>`, dropped afterwards), a dedicated Redis database
(`LLM_BATCH_TEST_REDIS_DB`, default 7, flushed before and after), the api-server, scheduler and
DAG processor, two Celery workers with distinct names (`w1`, `w2`), SecantusDB and the simulator.
Where PostgreSQL or Redis does not answer, the tests that need them are skipped with the reason.
Nothing it started is left running: the fixture fails the session otherwise.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llm_batch import config, processes
from llm_batch.airflow_api import AirflowAPIError, AirflowClient, read_password
from llm_batch.stack import (
    AIRFLOW_TUNING,
    PASSWORD_FILE,
    mongo_connection_fields,
    write_local_settings,
)
from tests.conftest import REPO_ROOT, Simulator
from tests.scaleout.worker_identity import WORKER_NAME_ENV

PG_HOST = os.environ.get("LLM_BATCH_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("LLM_BATCH_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("LLM_BATCH_TEST_PG_USER", "postgres")
REDIS_HOST = os.environ.get("LLM_BATCH_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("LLM_BATCH_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("LLM_BATCH_TEST_REDIS_DB", "7"))
POOL_SLOTS = 8
WORKERS = ("w1", "w2")
WORKER_CONCURRENCY = 4
MARKER = "LLM_BATCH_SCALEOUT_HOME"
"""Set on every process started here, to the work dir: teardown finds leftovers by it."""


@dataclass
class CeleryCluster:
    """What a test needs to reach the running scale-out topology."""

    airflow_api: AirflowClient
    airflow_url: str
    mongo_uri: str
    mongo_db_name: str
    simulator: Simulator
    broker_url: str
    work_dir: Path
    pool_slots: int = POOL_SLOTS
    workers: tuple[str, ...] = WORKERS
    started: dict[str, processes.ManagedProcess] = field(default_factory=dict)


def require_service(what: str, host: str, port: int, variable: str) -> None:
    """Skip (loudly, with the reason) when a service the topology needs does not listen."""
    if not processes.port_open(host, port):
        pytest.skip(
            f"SCALE-OUT TEST NOT RUN: {what} does not listen on {host}:{port}. Start it (CI "
            f"has it on its standard port) or point {variable} at one."
        )


def create_database(name: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


def drop_database(name: str) -> None:
    import psycopg2

    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        connection.close()


def flush_redis_db() -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
    try:
        client.flushdb()
    finally:
        client.close()


def airflow_environment(
    work_dir: Path, database: str, api_port: int, broker_url: str
) -> dict[str, str]:
    """The environment every Airflow component of the topology shares (as x-airflow-common)."""
    venv_bin = str(Path(sys.executable).parent)
    pg = f"{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"
    from cryptography.fernet import Fernet

    env = {
        **os.environ,
        **AIRFLOW_TUNING,
        "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", os.defpath)]),
        # worker_identity is imported by the workers' task processes.
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
        "AIRFLOW_HOME": str(work_dir / "airflow"),
        "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://{pg}",
        # PostgreSQL allows 100 connections; many processes with unbounded pools could exceed it.
        "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "5",
        "AIRFLOW__CELERY__BROKER_URL": broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": f"db+postgresql+psycopg2://{pg}",
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(WORKER_CONCURRENCY),
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.scaleout.worker_identity.hostname",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__PARALLELISM": str(POOL_SLOTS + 8),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(POOL_SLOTS + 8),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(work_dir / "logs" / "airflow"),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(processes.free_port()),
        MARKER: str(work_dir),
    }
    return env


def airflow_argv(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "airflow"), *args]


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
def celery_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryCluster]:
    """The running topology; a failed start fails the tests that use it, with the log tail."""
    require_service("PostgreSQL", PG_HOST, PG_PORT, "LLM_BATCH_TEST_PG_HOST/_PORT")
    require_service("Redis", REDIS_HOST, REDIS_PORT, "LLM_BATCH_TEST_REDIS_HOST/_PORT")
    work_dir = tmp_path_factory.mktemp("scaleout")
    logs = work_dir / "logs"
    database = f"llm_batch_scaleout_{uuid.uuid4().hex[:8]}"
    broker_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    api_port = processes.free_port()
    started: dict[str, processes.ManagedProcess] = {}
    create_database(database)
    flush_redis_db()
    env = airflow_environment(work_dir, database, api_port, broker_url)
    # As the image does: the workers load the batch tasks' modules before they fork.
    write_local_settings(work_dir / "airflow")

    def start(name: str, argv: list[str], extra_env: Mapping[str, str] | None = None) -> None:
        started[name] = processes.start(
            name, argv, logs / f"{name}.log", env={**env, **(extra_env or {})}, cwd=work_dir
        )

    try:
        mongo_port = processes.free_port()
        simulator_port = processes.free_port()
        api_key = secrets.token_urlsafe(16)
        marked = {**os.environ, MARKER: str(work_dir)}
        started["mongo"] = processes.start(
            processes.MONGO_WIRE_SERVER,
            processes.mongo_wire_server_argv(mongo_port, work_dir / "mongo"),
            logs / "mongo.log",
            env=marked,
            cwd=work_dir,
        )
        started["simulator"] = processes.start(
            processes.SIMULATOR,
            processes.simulator_argv(
                simulator_port, f"--api-key={api_key}", '--config-json={"latency_ms": 50}'
            ),
            logs / "simulator.log",
            env=marked,
            cwd=work_dir,
        )
        migrate = subprocess.run(
            airflow_argv("db", "migrate"),
            env=env,
            cwd=work_dir,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if migrate.returncode != 0:
            pytest.fail(f"`airflow db migrate` failed:\n{migrate.stderr[-3000:]}", pytrace=False)
        start("api-server", airflow_argv("api-server"))
        start("scheduler", airflow_argv("scheduler"))
        start("dag-processor", airflow_argv("dag-processor"))
        for worker in WORKERS:
            start(
                f"worker-{worker}",
                airflow_argv(
                    "celery",
                    "worker",
                    "--celery-hostname",
                    f"{worker}@%h",
                    "--concurrency",
                    str(WORKER_CONCURRENCY),
                ),
                {
                    WORKER_NAME_ENV: worker,
                    # Each worker serves its task logs; two on one machine need two ports.
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(processes.free_port()),
                },
            )
        started["mongo"].wait_for_port("127.0.0.1", mongo_port)
        started["simulator"].wait_for_port("127.0.0.1", simulator_port)
        airflow_url = f"http://127.0.0.1:{api_port}"
        bare = AirflowClient(airflow_url, None, None)
        try:
            wait_until_ready(bare, started)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"The Celery topology did not start: {exc}", pytrace=False)
        password = read_password(work_dir / "airflow" / PASSWORD_FILE, "admin")
        api = AirflowClient(airflow_url, "admin", password)
        api.put_pool(config.POOL_NAME, POOL_SLOTS, description="LLM requests in flight")
        mongo_uri = f"mongodb://127.0.0.1:{mongo_port}/{config.DEFAULT_DATABASE}"
        api.put_connection(
            config.MONGO_CONN_ID,
            "mongo",
            **mongo_connection_fields(mongo_uri, config.DEFAULT_DATABASE),
        )
        llm_url = f"http://127.0.0.1:{simulator_port}"
        api.put_connection(
            config.LLM_CONN_ID,
            "llm_batch",
            host=llm_url,
            password=api_key,
            extra={"adapter": "batch", "model": "sim-small", "timeout_s": 30},
        )
        wait_for_dag(api, config.JOB_DAG_ID)
        yield CeleryCluster(
            airflow_api=api,
            airflow_url=airflow_url,
            mongo_uri=mongo_uri,
            mongo_db_name=config.DEFAULT_DATABASE,
            simulator=Simulator(llm_url, api_key, started["simulator"]),
            broker_url=broker_url,
            work_dir=work_dir,
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
        drop_database(database)
    still = leftovers(work_dir, sessions)
    assert not still, f"scale-out processes still running after teardown: {still}"
