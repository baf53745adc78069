"""The embedded local stack: a MongoDB-wire server, the LLM simulator and Airflow, on localhost.

    python -m llm_batch_dev.stack up       # start (or find running) and configure everything
    python -m llm_batch_dev.stack status   # what runs, where, and the UI login
    python -m llm_batch_dev.stack down     # stop everything this work dir started

Everything lives in one work dir (`LLM_BATCH_HOME`, default `<repo>/.work`, private to its
user): Airflow's home, its PostgreSQL metadata DB (`postgres.py`), the MongoDB data, the logs,
and `stack.json`, which records what was started and where it listens (the `llm-batch` CLI reads
its defaults from it). Every process started carries `LLM_BATCH_STACK_HOME=<work dir>` in its
environment, so `down` finds and stops leftovers even when the state file is gone. See
docs/local-stack.md for every setting.

`Stack` starts, finds and stops the processes and sets up Airflow's pool and connections; its
settings (`settings`), Airflow's environment (`airflow_config`) and the MongoDB URI translation
(`mongo_uri`) live beside it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llm_batch import config
from llm_batch.cli.airflow_client import AirflowAPIError, AirflowClient
from llm_batch.cli.local_stack import MARKER, read_password
from llm_batch.orchestration.local_settings import write_local_settings
from llm_batch_dev.stack import lost_states, postgres, processes
from llm_batch_dev.stack.airflow_config import (
    airflow_environment,
    max_connections,
    record_metadata_db_in_config,
)
from llm_batch_dev.stack.errors import StackError
from llm_batch_dev.stack.mongo_uri import mongo_connection_fields, redact_uri
from llm_batch_dev.stack.settings import AIRFLOW_USERNAME, StackSettings

log = logging.getLogger(__name__)


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
            descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as out:
                out.write(secrets.token_urlsafe(24))
        return key_file.read_text().strip()

    @property
    def airflow_api(self) -> AirflowClient:
        """A REST API client logged in as the stack's admin user."""
        if self._client is None:
            self._client = AirflowClient(
                self.airflow_url, self.airflow_username, self.airflow_password
            )
        return self._client

    @property
    def metadata_db_url(self) -> str:
        """SQLAlchemy URL of Airflow's metadata DB (the embedded PostgreSQL, over its socket)."""
        return self.settings.postgres.url()

    def process(self, name: str) -> processes.ManagedProcess | None:
        """The process `name` (postgres, airflow, mongo, simulator) if this object started it."""
        return self._started.get(name)

    # Lifecycle

    def up(self) -> None:
        """Start every service and configure Airflow; reuse a stack that already runs as asked."""
        settings = self.settings
        if self._reuse_running():
            return
        self.down(quiet=True)
        self._check_ports_free()
        self._make_private()
        write_local_settings(settings.airflow_home)
        started_at = time.monotonic()
        try:
            environment = functools.partial(airflow_environment, settings)
            self._start_postgres(environment(dict(os.environ)))
            airflow = self._start("airflow", _airflow_argv(), environment)
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
            redact_uri(self.mongo_uri),
            self.llm_url,
        )

    def down(self, quiet: bool = False) -> None:
        """Stop what this work dir started (Airflow first), then every leftover of its sessions."""
        records = (self.read_state() or {}).get("processes", {})
        sessions = {int(r["pid"]) for r in records.values()} | {
            proc.pid for proc in self._started.values()
        }
        live = processes.find_stack_processes(self.work_dir, sessions)
        live_sessions = {proc.sid for proc in live}
        # The metadata DB last: Airflow's components write their final states as they stop.
        for name in ("airflow", "simulator", "mongo", "postgres"):
            proc = self._started.pop(name, None)
            pid = proc.pid if proc is not None else int(records.get(name, {}).get("pid", 0))
            if not pid or (proc is None and pid not in live_sessions):
                continue
            if name == "postgres":
                postgres.stop(pid)
            else:
                processes.stop_process_group(pid, grace_s=20)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=1)
        # Task processes run in groups of their own, so the group stops above can miss them.
        leftovers = [proc.pid for proc in processes.find_stack_processes(self.work_dir, sessions)]
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
            leftovers = [proc.pid for proc in processes.find_stack_processes(self.work_dir)]
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
            # A deferred batch waits on its request in the triggerer: it keeps its slot.
            include_deferred=True,
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

    def set_llm_extra(self, **changes: Any) -> None:
        """Rewrite the `llm_default` connection's extra with `changes` (e.g. `execution_mode`)."""
        self.airflow_api.put_connection(
            config.LLM_CONN_ID,
            "llm_batch",
            host=self.llm_url,
            password=self.llm_api_key,
            extra={**self.settings.llm_extra, **changes},
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

    # Lost final states (lost_states.py)

    def audit_mark(self) -> lost_states.Mark:
        """Where the audit log and the scheduler's log end now."""
        return lost_states.mark(self.metadata_db_url, self.settings.logs_dir / "airflow.log")

    def lost_final_states(
        self,
        since: lost_states.Mark | None = None,
        run_ids: Collection[str] | None = None,
    ) -> list[lost_states.LostFinalState]:
        """Instances left `running` after their supervisor exited, recorded after `since`."""
        return lost_states.find(
            self.metadata_db_url, self.settings.logs_dir / "airflow.log", since, run_ids
        )

    # Internals

    def _start(
        self,
        name: str,
        argv: Sequence[str],
        environment: Callable[[Mapping[str, str]], dict[str, str]] | None = None,
        user: tuple[int, int] | None = None,
    ) -> processes.ManagedProcess:
        base = dict(os.environ)
        env = environment(base) if environment is not None else {**base, MARKER: str(self.work_dir)}
        proc = processes.start(
            name,
            argv,
            self.settings.logs_dir / f"{name}.log",
            env=env,
            cwd=self.work_dir,
            user=user,
        )
        self._started[name] = proc
        self._write_state()
        log.info("started %s pid=%d log=%s", name, proc.pid, proc.log_path)
        return proc

    def _start_postgres(self, airflow_env: Mapping[str, str]) -> None:
        """Start the metadata DB (initdb on first use) and wait until it takes connections."""
        layout = self.settings.postgres
        user = postgres.server_user()
        postgres.prepare(self.work_dir, layout, user)
        env = postgres.server_environment(user, {MARKER: str(self.work_dir)})
        proc = self._start(
            "postgres",
            postgres.server_argv(layout, max_connections(self.settings, airflow_env)),
            lambda _base: env,
            user=None if user.is_current else (user.uid, user.gid),
        )
        postgres.wait_until_ready(layout, proc)

    def _make_private(self) -> None:
        """The work dir and every secret in it for this user only, also those of older stacks."""
        settings = self.settings
        settings.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        settings.work_dir.chmod(0o700)
        for directory in (settings.airflow_home, settings.logs_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        for secret in (
            settings.password_file,
            settings.airflow_home / "airflow.cfg",
            settings.state_path,
            self.work_dir / "simulator-api-key",
        ):
            with contextlib.suppress(FileNotFoundError):
                secret.chmod(0o600)

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
                # Generated under the umask 077 the stack gives Airflow; older files too.
                self.settings.password_file.chmod(0o600)
                record_metadata_db_in_config(self.settings.airflow_home, self.metadata_db_url)
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

    def _alive(self, recorded: Mapping[str, Any]) -> dict[str, bool]:
        """For each recorded service: does its session leader still run as part of this stack?"""
        records = recorded.get("processes", {})
        sessions = {int(r["pid"]) for r in records.values()}
        running = {proc.pid for proc in processes.find_stack_processes(self.work_dir, sessions)}
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
            "metadata_db": {
                "url": self.metadata_db_url,
                "psql": f"{postgres.binaries() / 'psql'} '{settings.postgres.dsn()}'",
            },
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
        expected = {"postgres", "airflow"}
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
