"""What the embedded stack gives Airflow's processes: tuning, placement and the metadata DB.

`airflow standalone` and every component it starts read their configuration from the
environment this module builds (`AIRFLOW__SECTION__KEY`). The metadata database's settings live
here too, under "Metadata database": the stack's embedded PostgreSQL (`postgres.py`).
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from llm_batch import config
from llm_batch.cli.local_stack import MARKER

if TYPE_CHECKING:
    from llm_batch_dev.stack.settings import StackSettings

# Airflow settings for a fast, stable stack on a small machine (measured on 2 cores; see
# docs/local-stack.md). Values exported as AIRFLOW__* in the calling environment win over these;
# the ones that place the stack (home, ports, folders) cannot be overridden that way.
AIRFLOW_TUNING: Mapping[str, str] = {
    # A task instance whose final state was lost (its supervisor exited, the DB still says
    # running) is failed and retried after this many seconds without a heartbeat, instead of
    # Airflow's 300: a retry skips the batch's answered tasks, so it costs a few seconds, while
    # waiting 5 minutes held the whole job. Heartbeats come every 5 s ([workers]
    # min_heartbeat_interval): 45 s is nine missed in a row. docs/local-stack.md.
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "45",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
    # A task's execution-API call that takes longer than Airflow's 5 s on a loaded 2-core machine
    # is sent again while the first is still being served: wait for the answer instead.
    "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
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
    # The UI's Test button on connections (llm_default's lists models: spends no tokens).
    "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
}


LOCAL_EXECUTOR = "llm_batch.orchestration.local_executor.LocalExecutor"
"""Airflow's LocalExecutor with `parallelism` enforced and workers freed when their task exits."""

TRIGGERER_MIN_CAPACITY = 1000
"""Airflow's default `[triggerer] capacity`; room for deadline alerts and other triggers."""


def triggerer_sizing(pool_slots: int) -> dict[str, str]:
    """Return the triggerer's capacity and batch threads for a pool of `pool_slots`.

    Each deferred batch holds one pool slot, one trigger and one batch thread: the triggerer
    needs room for the whole pool (docs/scale-out.md).
    """
    return {
        "AIRFLOW__TRIGGERER__CAPACITY": str(max(TRIGGERER_MIN_CAPACITY, pool_slots + 100)),
        config.TRIGGER_THREADS_ENV: str(pool_slots),
    }


def airflow_environment(settings: StackSettings, base: Mapping[str, str]) -> dict[str, str]:
    """Return the environment of `airflow standalone`: `base` plus the stack's settings."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**base, **{k: v for k, v in AIRFLOW_TUNING.items() if k not in base}}
    # The stack's own database, like its ports: not taken from the caller's environment.
    env.update(metadata_db_environment(settings))
    env.update({k: v for k, v in triggerer_sizing(settings.pool_slots).items() if k not in base})
    env.update(
        {
            # standalone starts its components as `airflow ...` from PATH: make it this one.
            "PATH": os.pathsep.join([venv_bin, base.get("PATH", os.defpath)]),
            "AIRFLOW_HOME": str(settings.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(settings.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(settings.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": LOCAL_EXECUTOR,
            "AIRFLOW__CORE__PARALLELISM": str(settings.parallelism),
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(settings.parallelism),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{settings.airflow_url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(settings.airflow_port),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(settings.logs_dir / "airflow"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(settings.worker_log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(settings.trigger_log_port),
            # The generated default is 16 bytes, which PyJWT warns about on every token.
            "AIRFLOW__API_AUTH__JWT_SECRET": base.get("AIRFLOW__API_AUTH__JWT_SECRET")
            or secrets.token_urlsafe(64),
            MARKER: str(settings.work_dir),
        }
    )
    env.update(settings.airflow_env)
    return env


# Metadata database

SQL_CONN_ENV = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"
POOL_SIZE = 8
"""Connections each Airflow process keeps open to the metadata DB."""
SERVER_RESERVE = 10
"""Connections beyond Airflow's pools: `psql`, the stack's own checks, superuser slots."""


def pool_overflow(settings: StackSettings) -> int:
    """Connections an Airflow process may open beyond `POOL_SIZE` under load.

    The api-server serves every running task's execution-API calls at once (start, heartbeats,
    XCom, connections, finish): up to `parallelism` requests, each holding a connection. A
    request that waits for a connection waits up to `pool_timeout` (30 s), past the task's
    execution-API timeout, and is sent again: so the pool must cover all of them.
    """
    return settings.parallelism


def pooled_processes(api_workers: int) -> int:
    """Airflow processes that hold a connection pool: the api-server (its workers and their
    parent), the scheduler, the DAG processor, the triggerer and `airflow standalone` itself."""
    return api_workers + 5


def max_connections(settings: StackSettings, env: Mapping[str, str]) -> int:
    """The server's `max_connections`: every pool full at once, plus a reserve."""
    api_workers = int(env.get("AIRFLOW__API__WORKERS", AIRFLOW_TUNING["AIRFLOW__API__WORKERS"]))
    per_process = POOL_SIZE + pool_overflow(settings)
    return pooled_processes(api_workers) * per_process + SERVER_RESERVE


def metadata_db_environment(settings: StackSettings) -> dict[str, str]:
    """Airflow's metadata DB settings: the embedded PostgreSQL, its pool sized for the load."""
    return {
        SQL_CONN_ENV: settings.postgres.url(),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE": str(POOL_SIZE),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": str(pool_overflow(settings)),
    }


def record_metadata_db_in_config(airflow_home: Path, url: str) -> None:
    """Write the metadata DB's URL into `airflow.cfg`, which `airflow standalone` generated.

    The stack's processes get it from the environment; this lets anything pointed at the stack by
    `AIRFLOW_HOME` alone (the `airflow` command, a hook in a script) reach the same database
    instead of creating a SQLite one. The URL holds no password (docs/local-stack.md).
    """
    path = airflow_home / "airflow.cfg"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return
    setting = f"sql_alchemy_conn = {url}"
    section = None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            if section == "database":
                break  # the section had no such line: add it at its end
            section = stripped[1:-1]
        elif section == "database" and stripped.split("=", 1)[0].strip() == "sql_alchemy_conn":
            lines[index] = setting
            break
    else:
        if section != "database":
            lines += ["", "[database]"]
        index = len(lines)
    if setting not in lines:
        lines.insert(index, setting)
    temporary = path.with_suffix(".tmp")
    temporary.touch(mode=0o600)
    temporary.write_text("\n".join(lines) + "\n")
    temporary.replace(path)
