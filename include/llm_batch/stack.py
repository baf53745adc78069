"""The embedded local stack: a MongoDB-wire server, the LLM simulator and Airflow, on localhost.

    python -m llm_batch.stack up       # start (or find running) and configure everything
    python -m llm_batch.stack status   # what runs, where, and the UI login
    python -m llm_batch.stack down     # stop everything this work dir started

Everything lives in one work dir (`LLM_BATCH_HOME`, default `<repo>/.work`): Airflow's home and
SQLite metadata DB, the MongoDB data, the logs, and `stack.json`, which records what was started
and where it listens (the `llm-batch` CLI reads its defaults from it). Every process started
carries `LLM_BATCH_STACK_HOME=<work dir>` in its environment, so `down` finds and stops leftovers
even when the state file is gone. See docs/local-stack.md for every setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pathspec

from llm_batch import config, processes
from llm_batch.airflow_api import AirflowAPIError, AirflowClient, read_password

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MARKER = "LLM_BATCH_STACK_HOME"
"""Environment variable set on every process of a stack, to its work dir."""
STATE_FILE = "stack.json"
AIRFLOW_USERNAME = "admin"
"""SimpleAuthManager's default user; `airflow standalone` generates its password."""
PASSWORD_FILE = "simple_auth_manager_passwords.json.generated"

DEFAULT_SIMULATOR_CONFIG: Mapping[str, Any] = {"latency_ms": 300, "latency_jitter_ms": 100}
DEFAULT_LLM_EXTRA: Mapping[str, Any] = {
    "adapter": "batch",
    "model": "sim-small",
    "timeout_s": 30,
    "price_input_per_1k": 0.0005,
    "price_output_per_1k": 0.0015,
}
PARALLELISM_HEADROOM = 8
"""Task slots beyond the pool's, for tasks that do not call the LLM (create, plan, reconcile)."""

# Airflow settings for a fast, stable stack on a small machine (measured on 2 cores; see
# docs/local-stack.md). Values exported as AIRFLOW__* in the calling environment win over these;
# the ones that place the stack (home, ports, folders) cannot be overridden that way.
AIRFLOW_TUNING: Mapping[str, str] = {
    # SQLite + the default pool (5 + 10 overflow) deadlocks the api-server once ~30 tasks call the
    # execution API at once: requests hold a connection while waiting for another. Unbounded.
    "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": "0",
    # The api-server does the most work per task instance; a second worker uses the second core.
    "AIRFLOW__API__WORKERS": "2",
    # One access-log line and several execution-API lines per task call cost CPU, show nothing.
    "AIRFLOW__LOGGING__NAMESPACE_LEVELS": (
        "http.access=WARNING airflow.api_fastapi.execution_api=WARNING"
    ),
    # Queue a whole pool's worth of mapped instances per scheduler loop (default 16).
    "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY": "0",
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
    # Find new DAG files within seconds (default 5 minutes); re-parse changed ones soon.
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "10",
    "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",
    "AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL": "5",
    "AIRFLOW__API__MAXIMUM_PAGE_LIMIT": "1000",
}


SQL_CONNECT_ARGS_ENV = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"


class StackError(RuntimeError):
    """The stack cannot start or stop as asked; the message says why and what to do."""


def default_work_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    home = env.get("LLM_BATCH_HOME")
    return Path(home).expanduser().resolve() if home else REPO_ROOT / ".work"


def state_file(environ: Mapping[str, str] | None = None) -> Path:
    """The state file of the default work dir (`$LLM_BATCH_HOME/stack.json`)."""
    return default_work_dir(environ) / STATE_FILE


@dataclass(frozen=True)
class StackSettings:
    """Where the stack lives, what it starts and on which ports."""

    work_dir: Path = field(default_factory=default_work_dir)
    dags_folder: Path = REPO_ROOT / "dags"
    plugins_folder: Path = REPO_ROOT / "plugins"
    airflow_port: int = 8080
    worker_log_port: int = 8793
    """Port on which the LocalExecutor serves task logs to the UI."""
    trigger_log_port: int = 8794
    pool_slots: int = config.DEFAULT_POOL_SLOTS
    mongo_port: int = 27017
    mongo_uri: str | None = None
    """A MongoDB to use instead of starting SecantusDB."""
    llm_url: str | None = None
    """An LLM service to use instead of starting the simulator."""
    llm_api_key: str | None = field(default=None, repr=False)
    llm_extra: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_LLM_EXTRA))
    """The `llm_default` connection's extra (adapter, model, timeouts, prices)."""
    simulator_port: int = 8765
    simulator_config: Mapping[str, Any] = field(
        default_factory=lambda: dict(DEFAULT_SIMULATOR_CONFIG)
    )
    airflow_env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for Airflow (AIRFLOW__SECTION__KEY); wins over the stack's tuning."""
    startup_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "work_dir", Path(self.work_dir).expanduser().resolve())
        for name in ("airflow_port", "worker_log_port", "trigger_log_port"):
            _check_port(name, getattr(self, name))
        if self.mongo_uri is None:
            _check_port("mongo_port", self.mongo_port)
        if self.llm_url is None:
            _check_port("simulator_port", self.simulator_port)
        elif not self.llm_api_key:
            raise StackError(
                f"LLM_BATCH_LLM_URL is set ({self.llm_url}) but LLM_BATCH_LLM_API_KEY is not: "
                "set the service's API key too."
            )
        if self.mongo_uri is not None:
            parse_mongo_uri(self.mongo_uri)  # fail now, with the reason, not inside a DAG run
        if not isinstance(self.pool_slots, int) or self.pool_slots < 1:
            raise StackError(f"pool_slots must be a whole number >= 1, got {self.pool_slots!r}")
        ports = list(self.ports().values())
        if len(set(ports)) != len(ports):
            raise StackError(f"Two services would share a port: {self.ports()}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> StackSettings:
        """Read the `LLM_BATCH_*` environment variables (docs/local-stack.md lists them)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {"work_dir": default_work_dir(env)}
        for name, attribute in (
            ("LLM_BATCH_AIRFLOW_PORT", "airflow_port"),
            ("LLM_BATCH_MONGO_PORT", "mongo_port"),
            ("LLM_BATCH_SIMULATOR_PORT", "simulator_port"),
            ("LLM_BATCH_TASK_LOG_PORT", "worker_log_port"),
            ("LLM_BATCH_TRIGGER_LOG_PORT", "trigger_log_port"),
            ("LLM_BATCH_POOL_SLOTS", "pool_slots"),
        ):
            if env.get(name):
                values[attribute] = _int_from_env(name, env[name])
        for name, attribute in (
            ("LLM_BATCH_DAGS_FOLDER", "dags_folder"),
            ("LLM_BATCH_PLUGINS_FOLDER", "plugins_folder"),
        ):
            if env.get(name):
                values[attribute] = Path(env[name]).expanduser().resolve()
        if env.get("LLM_BATCH_MONGO_URI"):
            values["mongo_uri"] = env["LLM_BATCH_MONGO_URI"]
        if env.get("LLM_BATCH_LLM_URL"):
            values["llm_url"] = env["LLM_BATCH_LLM_URL"]
            values["llm_api_key"] = env.get("LLM_BATCH_LLM_API_KEY")
        extra = dict(DEFAULT_LLM_EXTRA)
        if env.get("LLM_BATCH_LLM_MODEL"):
            extra["model"] = env["LLM_BATCH_LLM_MODEL"]
        if env.get("LLM_BATCH_LLM_ADAPTER"):
            extra["adapter"] = env["LLM_BATCH_LLM_ADAPTER"]
        extra.update(_json_object_from_env(env, "LLM_BATCH_LLM_EXTRA"))
        values["llm_extra"] = extra
        if env.get("LLM_BATCH_SIMULATOR_CONFIG"):
            values["simulator_config"] = _json_object_from_env(env, "LLM_BATCH_SIMULATOR_CONFIG")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def on_free_ports(cls, work_dir: Path, **overrides: Any) -> StackSettings:
        """Settings for a throwaway stack in `work_dir` that collides with nothing running."""
        ports = {
            name: processes.free_port()
            for name in (
                "airflow_port",
                "worker_log_port",
                "trigger_log_port",
                "mongo_port",
                "simulator_port",
            )
        }
        return cls(work_dir=work_dir, **{**ports, **overrides})

    # Derived places and addresses

    @property
    def airflow_home(self) -> Path:
        return self.work_dir / "airflow"

    @property
    def logs_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def state_path(self) -> Path:
        return self.work_dir / STATE_FILE

    @property
    def password_file(self) -> Path:
        return self.airflow_home / PASSWORD_FILE

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.airflow_port}"

    @property
    def parallelism(self) -> int:
        return self.pool_slots + PARALLELISM_HEADROOM

    @property
    def mongo_db_name(self) -> str:
        if self.mongo_uri is None:
            return config.DEFAULT_DATABASE
        return parse_mongo_uri(self.mongo_uri).database or config.DEFAULT_DATABASE

    @property
    def effective_mongo_uri(self) -> str:
        """The Mongo URI the pipeline uses, with the database name in it."""
        if self.mongo_uri is None:
            return f"mongodb://127.0.0.1:{self.mongo_port}/{config.DEFAULT_DATABASE}"
        return uri_with_database(self.mongo_uri, self.mongo_db_name)

    def ports(self) -> dict[str, int]:
        """Every port this stack listens on, by what listens there."""
        ports = {
            "Airflow api-server (UI)": self.airflow_port,
            "Airflow task-log server": self.worker_log_port,
            "Airflow trigger-log server": self.trigger_log_port,
        }
        if self.mongo_uri is None:
            ports["MongoDB-wire server (SecantusDB)"] = self.mongo_port
        if self.llm_url is None:
            ports["LLM simulator"] = self.simulator_port
        return ports

    def airflow_environment(self, base: Mapping[str, str]) -> dict[str, str]:
        """The environment of `airflow standalone`: `base` plus the stack's settings."""
        venv_bin = str(Path(sys.executable).parent)
        env = {**base, **{k: v for k, v in AIRFLOW_TUNING.items() if k not in base}}
        # The embedded stack's metadata DB is SQLite, whose default 5 s busy timeout killed the
        # scheduler under load (`database is locked`). SQLite only: other drivers reject it.
        if env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite").startswith("sqlite"):
            env.setdefault(SQL_CONNECT_ARGS_ENV, "llm_batch.airflow_db.SQLITE_CONNECT_ARGS")
        env.update(
            {
                # standalone starts its components as `airflow ...` from PATH: make it this one.
                "PATH": os.pathsep.join([venv_bin, base.get("PATH", os.defpath)]),
                "AIRFLOW_HOME": str(self.airflow_home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(self.parallelism),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow_url}/execution/",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.airflow_port),
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.logs_dir / "airflow"),
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.worker_log_port),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.trigger_log_port),
                # The generated default is 16 bytes, which PyJWT warns about on every token.
                "AIRFLOW__API_AUTH__JWT_SECRET": base.get("AIRFLOW__API_AUTH__JWT_SECRET")
                or secrets.token_urlsafe(64),
                MARKER: str(self.work_dir),
            }
        )
        env.update(self.airflow_env)
        return env

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a running stack to be reused as is."""
        return {
            "ports": self.ports(),
            "dags_folder": str(self.dags_folder),
            "plugins_folder": str(self.plugins_folder),
            "mongo_uri": self.effective_mongo_uri,
            "llm_url": self.llm_url,
            "simulator_config": dict(self.simulator_config) if self.llm_url is None else None,
            "airflow_env": dict(self.airflow_env),
        }


class Stack:
    """Start, find, configure and stop one local stack; see the module docstring."""

    def __init__(self, settings: StackSettings | None = None) -> None:
        self.settings = settings or StackSettings.from_env()
        self._started: dict[str, processes.ManagedProcess] = {}
        self._client: AirflowClient | None = None

    def __enter__(self) -> Stack:
        self.up()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # Addresses and credentials

    @property
    def work_dir(self) -> Path:
        return self.settings.work_dir

    @property
    def airflow_url(self) -> str:
        return self.settings.airflow_url

    @property
    def airflow_username(self) -> str:
        return AIRFLOW_USERNAME

    @property
    def airflow_password(self) -> str | None:
        return read_password(self.settings.password_file, AIRFLOW_USERNAME)

    @property
    def mongo_uri(self) -> str:
        return self.settings.effective_mongo_uri

    @property
    def mongo_db_name(self) -> str:
        return self.settings.mongo_db_name

    @property
    def llm_url(self) -> str:
        return self.settings.llm_url or f"http://127.0.0.1:{self.settings.simulator_port}"

    @property
    def llm_api_key(self) -> str:
        if self.settings.llm_api_key:
            return self.settings.llm_api_key
        key_file = self.work_dir / "simulator-api-key"
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            key_file.write_text(secrets.token_urlsafe(24))
            key_file.chmod(0o600)
        return key_file.read_text().strip()

    @property
    def airflow_api(self) -> AirflowClient:
        """A REST API client logged in as the stack's admin user."""
        if self._client is None:
            self._client = AirflowClient(
                self.airflow_url, self.airflow_username, self.airflow_password
            )
        return self._client

    def process(self, name: str) -> processes.ManagedProcess | None:
        """The process `name` (airflow, mongo, simulator) if this object started it."""
        return self._started.get(name)

    # Lifecycle

    def up(self) -> None:
        """Start every service and configure Airflow; reuse a stack that already runs as asked."""
        settings = self.settings
        check_plugins_folder(settings.plugins_folder)
        if self._reuse_running():
            return
        self.down(quiet=True)
        self._check_ports_free()
        for directory in (settings.airflow_home, settings.logs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        write_local_settings(settings.airflow_home)
        started_at = time.monotonic()
        try:
            airflow = self._start("airflow", _airflow_argv(), settings.airflow_environment)
            if settings.mongo_uri is None:
                storage = self.work_dir / "mongo"
                storage.mkdir(parents=True, exist_ok=True)
                argv = processes.mongo_wire_server_argv(settings.mongo_port, storage)
                self._start("mongo", argv).wait_for_port("127.0.0.1", settings.mongo_port)
            if settings.llm_url is None:
                argv = processes.simulator_argv(
                    settings.simulator_port,
                    # `=` form: a generated key may start with "-".
                    f"--api-key={self.llm_api_key}",
                    f"--config-json={json.dumps(dict(settings.simulator_config))}",
                )
                self._start("simulator", argv).wait_for_port("127.0.0.1", settings.simulator_port)
            self._wait_for_airflow(airflow)
            self.configure_airflow()
            self._write_state()
        except BaseException:
            self.down(quiet=True)
            raise
        log.info(
            "stack up in %.1f s: Airflow %s, MongoDB %s, LLM %s",
            time.monotonic() - started_at,
            self.airflow_url,
            _redact_uri(self.mongo_uri),
            self.llm_url,
        )

    def down(self, quiet: bool = False) -> None:
        """Stop what this work dir started (Airflow first), then every leftover of its sessions."""
        records = (self.read_state() or {}).get("processes", {})
        sessions = {int(r["pid"]) for r in records.values()} | {
            proc.pid for proc in self._started.values()
        }
        live_sessions = {proc.sid for proc in self._processes(sessions)}
        for name in ("airflow", "simulator", "mongo"):
            proc = self._started.pop(name, None)
            if proc is not None:
                proc.stop(grace_s=20)
            elif name in records and int(records[name]["pid"]) in live_sessions:
                processes.stop_process_group(int(records[name]["pid"]), grace_s=20)
        # Task processes run in groups of their own, so the group stops above can miss them.
        leftovers = [proc.pid for proc in self._processes(sessions)]
        if leftovers:
            log.info("stopping %d leftover processes of %s", len(leftovers), self.work_dir)
            processes.terminate(leftovers, grace_s=10)
        self.settings.state_path.unlink(missing_ok=True)
        self._client = None
        if not quiet:
            log.info("stack in %s is down", self.work_dir)

    def status(self) -> dict[str, Any]:
        """What the state file says runs, checked against live processes and Airflow's health."""
        recorded = self.read_state()
        if recorded is None:
            leftovers = [proc.pid for proc in self._processes()]
            return {"running": False, "work_dir": str(self.work_dir), "leftover_pids": leftovers}
        alive = self._alive(recorded)
        services = {
            name: {**record, "alive": alive[name]}
            for name, record in recorded.get("processes", {}).items()
        }
        try:
            health: dict[str, Any] | None = self.airflow_api.health()
        except AirflowAPIError:
            health = None
        return {
            **recorded,
            "processes": services,
            "airflow_health": health,
            "airflow_password": self.airflow_password,
            "running": all(alive.values()) and _healthy(health),
        }

    def read_state(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.settings.state_path.read_text()))
        except FileNotFoundError:
            return None
        except ValueError:
            log.warning("ignoring unreadable %s", self.settings.state_path)
            return None

    # Airflow configuration

    def configure_airflow(self) -> None:
        """Create or overwrite the pool and both connections (idempotent)."""
        api = self.airflow_api
        api.put_pool(
            config.POOL_NAME,
            self.settings.pool_slots,
            description="LLM requests in flight across all runs (one slot per batch request)",
            include_deferred=False,
        )
        api.put_connection(
            config.MONGO_CONN_ID,
            "mongo",
            description="MongoDB holding tasks, jobs, results and llm_calls",
            **mongo_connection_fields(self.mongo_uri, self.mongo_db_name),
        )
        api.put_connection(
            config.LLM_CONN_ID,
            "llm_batch",
            description="The batch LLM service"
            + (" (local simulator)" if self.settings.llm_url is None else ""),
            host=self.llm_url,
            password=self.llm_api_key,
            extra=dict(self.settings.llm_extra),
        )
        log.info(
            "configured pool=%s slots=%d connections=%s,%s",
            config.POOL_NAME,
            self.settings.pool_slots,
            config.MONGO_CONN_ID,
            config.LLM_CONN_ID,
        )

    def wait_for_dag(self, dag_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
        """Block until the DAG processor has loaded `dag_id`; fail at once on its import error."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.airflow_api.get_dag(dag_id)
            except AirflowAPIError as exc:
                if exc.status != 404:
                    raise
            for error in self.airflow_api.list_import_errors():
                raise StackError(
                    f"Airflow cannot import {error.get('filename')}; fix the file (it is re-read "
                    f"within seconds):\n{error.get('stack_trace') or error}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"DAG {dag_id!r} did not appear within {timeout_s:.0f} s; is its file in "
                    f"{self.settings.dags_folder}? The DAG processor logs to "
                    f"{self.settings.logs_dir / 'airflow.log'}."
                )
            time.sleep(1.0)

    # Internals

    def _start(
        self,
        name: str,
        argv: Sequence[str],
        environment: Callable[[Mapping[str, str]], dict[str, str]] | None = None,
    ) -> processes.ManagedProcess:
        base = dict(os.environ)
        env = environment(base) if environment is not None else {**base, MARKER: str(self.work_dir)}
        proc = processes.start(
            name, argv, self.settings.logs_dir / f"{name}.log", env=env, cwd=self.work_dir
        )
        self._started[name] = proc
        self._write_state()
        log.info("started %s pid=%d log=%s", name, proc.pid, proc.log_path)
        return proc

    def _wait_for_airflow(self, airflow: processes.ManagedProcess) -> None:
        """Wait until the api-server answers and reports a healthy scheduler and DAG processor."""
        deadline = time.monotonic() + self.settings.startup_timeout_s
        health: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if not airflow.alive():
                raise StackError(
                    f"airflow standalone exited with code {airflow.popen.returncode}; "
                    f"{_log_hint(airflow.log_path)}"
                )
            if processes.exited_children(airflow.pid):
                raise StackError(
                    f"An Airflow component exited during start-up; {_log_hint(airflow.log_path)}"
                )
            try:
                health = AirflowClient(self.airflow_url, None, None, timeout_s=5).health()
            except AirflowAPIError:
                health = None
            if _healthy(health) and self.settings.password_file.exists():
                return
            time.sleep(0.5)
        raise StackError(
            f"Airflow did not become healthy within {self.settings.startup_timeout_s:.0f} s "
            f"(last health: {health}); {_log_hint(airflow.log_path)}"
        )

    def _reuse_running(self) -> bool:
        """True if a healthy stack already runs here with these settings (then reconfigure it)."""
        recorded = self.read_state()
        if recorded is None:
            return False
        same = recorded.get("settings") == json.loads(json.dumps(self.settings.fingerprint()))
        alive = all(self._alive(recorded).values())
        if not (same and alive and recorded.get("complete")):
            log.info(
                "restarting the stack in %s (changed settings or a stopped service)", self.work_dir
            )
            return False
        try:
            healthy = _healthy(self.airflow_api.health())
        except AirflowAPIError:
            healthy = False
        if not healthy:
            return False
        self.configure_airflow()
        log.info("stack in %s already runs; pool and connections re-applied", self.work_dir)
        return True

    def _processes(self, sessions: Collection[int] = ()) -> list[processes.ProcessInfo]:
        """The live processes of this stack: every member of a session it started.

        A session is this stack's if one of its processes carries the marker, or if it is a
        recorded one and still runs in the work dir: Airflow's api-server and executor workers
        rewrite their titles, which wipes the environment /proc shows, but not their session or
        working directory. Nothing below this process is ever included.
        """
        everything = processes.snapshot()
        marker = f"{MARKER}={self.work_dir}".encode()
        ours = {proc.sid for proc in everything if marker in proc.environ}
        ours |= {
            proc.sid
            for proc in everything
            if proc.sid in sessions and proc.cwd == str(self.work_dir)
        }
        spare = processes.ancestors(os.getpid())
        return [
            proc
            for proc in everything
            if proc.sid in ours and proc.pid not in spare and not proc.zombie
        ]

    def _alive(self, recorded: Mapping[str, Any]) -> dict[str, bool]:
        """For each recorded service: does its session leader still run as part of this stack?"""
        records = recorded.get("processes", {})
        running = {proc.pid for proc in self._processes({int(r["pid"]) for r in records.values()})}
        return {name: int(record["pid"]) in running for name, record in records.items()}

    def _check_ports_free(self) -> None:
        busy = []
        for what, port in self.settings.ports().items():
            if processes.port_open("127.0.0.1", port):
                owners = ", ".join(
                    f"pid {pid} ({processes.command_line(pid)[:80]})"
                    for pid in processes.listening_pids(port)
                )
                busy.append(f"  {port} for the {what}: in use by {owners or 'another program'}")
        if busy:
            raise StackError(
                "Ports this stack needs are taken by programs it did not start:\n"
                + "\n".join(busy)
                + "\nStop those programs, or pick other ports with LLM_BATCH_AIRFLOW_PORT, "
                "LLM_BATCH_MONGO_PORT, LLM_BATCH_SIMULATOR_PORT (docs/local-stack.md). A stack "
                "from another work dir is stopped with `LLM_BATCH_HOME=<its dir> make down`."
            )

    def _write_state(self) -> None:
        settings = self.settings
        state = {
            "work_dir": str(self.work_dir),
            "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "complete": set(self._started) == self._expected_services(),
            "airflow_url": self.airflow_url,
            "airflow_username": self.airflow_username,
            "airflow_password_file": str(settings.password_file),
            "airflow_home": str(settings.airflow_home),
            "mongo_uri": self.mongo_uri,
            "mongo_db": self.mongo_db_name,
            "mongo_external": settings.mongo_uri is not None,
            "llm_url": self.llm_url,
            "llm_external": settings.llm_url is not None,
            "pool": {"name": config.POOL_NAME, "slots": settings.pool_slots},
            "logs_dir": str(settings.logs_dir),
            "processes": {
                name: {
                    "pid": proc.pid,  # started in a new session: also its group and session id
                    "log": str(proc.log_path),
                }
                for name, proc in self._started.items()
            },
            "settings": self.settings.fingerprint(),
        }
        settings.state_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = settings.state_path.with_suffix(".tmp")
        # The Mongo URI may hold a password: the file is for this user only.
        temporary.touch(mode=0o600)
        temporary.write_text(json.dumps(state, indent=2) + "\n")
        temporary.replace(settings.state_path)

    def _expected_services(self) -> set[str]:
        expected = {"airflow"}
        if self.settings.mongo_uri is None:
            expected.add("mongo")
        if self.settings.llm_url is None:
            expected.add("simulator")
        return expected


def _airflow_argv() -> list[str]:
    airflow = Path(sys.executable).parent / "airflow"
    if not airflow.exists():
        found = shutil.which("airflow")
        if found is None:
            raise StackError(
                "The `airflow` command is not installed next to this Python "
                f"({sys.executable}); run `make venv`."
            )
        airflow = Path(found)
    return [str(airflow), "standalone"]


def _healthy(health: Mapping[str, Any] | None) -> bool:
    if not health:
        return False
    return all(
        (health.get(part) or {}).get("status") == "healthy"
        for part in ("metadatabase", "scheduler", "dag_processor")
    )


def _log_hint(log_path: Path) -> str:
    return f"its log {log_path} ends with:\n{processes.tail(log_path, 40)}"


# Plugins folder check


def check_plugins_folder(folder: Path) -> None:
    """Refuse a plugins folder whose files Airflow would import over standard-library modules.

    Airflow imports every `.py` file under the plugins folder as a top-level module named after the
    file (`plugins/llm_hook/types.py` becomes `types`), which breaks every Airflow component with
    errors far from the cause. Files matched by the folder's `.airflowignore` are skipped.
    """
    if not folder.is_dir():
        return
    ignore_file = folder / ".airflowignore"
    patterns = ignore_file.read_text().splitlines() if ignore_file.exists() else []
    spec = pathspec.GitIgnoreSpec.from_lines(patterns)
    clashes = [
        path.relative_to(folder).as_posix()
        for path in sorted(folder.rglob("*.py"))
        if path.stem in sys.stdlib_module_names
        and not spec.match_file(path.relative_to(folder).as_posix())
    ]
    if clashes:
        raise StackError(
            f"Airflow would import these files of {folder} as standard-library modules and "
            f"crash: {', '.join(clashes)}. Airflow's plugin loader imports every .py file there "
            "under its bare file name. Rename them, or list their package in "
            f"{ignore_file} (e.g. `llm_hook/`): packages installed with the project need no "
            "plugin loading."
        )


LOCAL_SETTINGS = '''"""Written by llm_batch.stack: see llm_batch.preload."""

import llm_batch.preload  # noqa: F401
'''


def write_local_settings(airflow_home: Path) -> Path:
    """Write the stack's `airflow_local_settings.py` (see `llm_batch.preload`)."""
    path = airflow_home / "config" / "airflow_local_settings.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(LOCAL_SETTINGS)
    return path


# MongoDB URIs and the `mongo` connection


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
            f"Not a MongoDB URI: {_redact_uri(uri)!r}; expected mongodb://host[:port]/db or "
            "mongodb+srv://host/db."
        )
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = netloc.rpartition("@")
    if not hosts:
        raise StackError(f"The MongoDB URI {_redact_uri(uri)!r} names no host.")
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
            f"A mongodb+srv URI names exactly one host and no port: {_redact_uri(uri)!r}."
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


def _redact_uri(uri: str) -> str:
    """The URI with its password replaced, for messages and logs."""
    scheme, sep, rest = uri.partition("://")
    userinfo, at, after = rest.partition("@")
    if not (sep and at and ":" in userinfo):
        return uri
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{after}"


# Environment parsing


def _check_port(name: str, value: Any) -> None:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise StackError(f"{name} must be a TCP port (1-65535), got {value!r}")


def _int_from_env(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise StackError(f"{name} must be a whole number, got {raw!r}") from None


def _json_object_from_env(env: Mapping[str, str], name: str) -> dict[str, Any]:
    raw = env.get(name)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise StackError(f"{name} is not valid JSON ({exc}): {raw!r}") from None
    if not isinstance(value, dict):
        raise StackError(f'{name} must be a JSON object like {{"latency_ms": 300}}, got {raw!r}')
    return value


# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_batch.stack", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        stack = Stack(StackSettings.from_env())
        if args.command == "up":
            stack.up()
            print(render_status(stack.status()))
        elif args.command == "down":
            stack.down()
        else:
            status = stack.status()
            print(json.dumps(status, indent=2) if args.json else render_status(status))
            return 0 if status["running"] else 1
    except (RuntimeError, TimeoutError, AirflowAPIError) as exc:
        # StackError, and a service that died or never listened (processes.ManagedProcess).
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def render_status(status: Mapping[str, Any]) -> str:
    """A human summary of `Stack.status()`."""
    if "airflow_url" not in status:
        lines = [f"No stack runs from {status['work_dir']} (start it with `make up`)."]
        if status.get("leftover_pids"):
            lines.append(
                f"Leftover processes of it still run: {status['leftover_pids']}; `make down` "
                "stops them."
            )
        return "\n".join(lines)
    procs = status.get("processes", {})

    def state(name: str) -> str:
        if name not in procs:
            return "external"
        return f"pid {procs[name]['pid']}, " + ("running" if procs[name]["alive"] else "STOPPED")

    health = status.get("airflow_health") or {}
    parts = ", ".join(
        f"{part} {(health.get(part) or {}).get('status', '?')}"
        for part in ("scheduler", "dag_processor", "triggerer")
    )
    lines = [
        f"Stack in {status['work_dir']}: {'running' if status['running'] else 'NOT HEALTHY'}",
        f"  Airflow UI  {status['airflow_url']}  ({state('airflow')}; {parts or 'no answer'})",
        f"    login     {status['airflow_username']} / {status.get('airflow_password') or '?'}"
        f"  (from {status['airflow_password_file']})",
        f"  MongoDB     {_redact_uri(status['mongo_uri'])}  ({state('mongo')})",
        f"  LLM         {status['llm_url']}  ({state('simulator')})",
        f"  Pool        {status['pool']['name']}: {status['pool']['slots']} slots",
        f"  Logs        {status['logs_dir']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
