"""The local stack as a user meets it: it comes up healthy, configured, reachable, and goes away."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from llm_batch import config
from llm_batch.cli.airflow_client import AirflowAPIError, AirflowClient
from llm_batch_dev.stack import processes
from tests.e2e.conftest import AirflowStack

pytestmark = pytest.mark.e2e

STACK_CLI = [sys.executable, "-m", "llm_batch_dev.stack"]


def test_airflow_reports_a_healthy_scheduler_and_dag_processor(
    airflow_stack: AirflowStack,
) -> None:
    health = airflow_stack.airflow_api.health()
    assert health["metadatabase"]["status"] == "healthy"
    assert health["scheduler"]["status"] == "healthy"
    assert health["dag_processor"]["status"] == "healthy"


def test_the_ui_answers_and_accepts_only_the_generated_login(airflow_stack: AirflowStack) -> None:
    page = requests.get(f"{airflow_stack.airflow_url}/", timeout=30)
    assert page.status_code == 200
    assert "<html" in page.text.lower()

    state = json.loads((airflow_stack.work_dir / "stack.json").read_text())
    passwords = json.loads(Path(state["airflow_password_file"]).read_text())
    password = passwords[state["airflow_username"]]
    login = {"username": state["airflow_username"], "password": password}
    token = requests.post(f"{airflow_stack.airflow_url}/auth/token", json=login, timeout=30)
    assert token.status_code == 201 and token.json()["access_token"]
    wrong = {**login, "password": password + "x"}
    refused = requests.post(f"{airflow_stack.airflow_url}/auth/token", json=wrong, timeout=30)
    assert refused.status_code == 401


def test_the_work_dir_and_every_secret_in_it_are_private_to_the_user(
    airflow_stack: AirflowStack,
) -> None:
    work_dir = airflow_stack.work_dir
    # 0700; run as root 0710 with the group of the PostgreSQL server's user, which may enter.
    assert work_dir.stat().st_mode & 0o067 == 0, oct(work_dir.stat().st_mode)
    secrets = [
        work_dir / "stack.json",
        work_dir / "simulator-api-key",
        airflow_stack.stack.settings.password_file,
        airflow_stack.stack.settings.airflow_home / "airflow.cfg",
    ]
    for secret in secrets:
        assert secret.stat().st_mode & 0o077 == 0, f"{secret}: {oct(secret.stat().st_mode)}"


def test_the_metadata_db_is_the_stacks_own_postgresql_on_a_socket_only(
    airflow_stack: AirflowStack,
) -> None:
    import psycopg2

    stack = airflow_stack.stack
    assert stack.metadata_db_url.startswith("postgresql+psycopg2://")
    postgres = stack.settings.postgres
    with psycopg2.connect(postgres.dsn()) as connection, connection.cursor() as cursor:
        cursor.execute("SHOW listen_addresses")
        assert cursor.fetchone() == ("",), "no TCP port: the socket only"
        cursor.execute("SHOW max_connections")
        row = cursor.fetchone()
        assert row is not None and int(row[0]) >= 100
        cursor.execute("SELECT count(*) FROM dag")
        assert cursor.fetchone() is not None
    assert (postgres.data_dir / "PG_VERSION").exists()
    assert postgres.socket_dir.stat().st_mode & 0o077 == 0


def test_the_state_file_points_clients_at_the_stack(airflow_stack: AirflowStack) -> None:
    path = airflow_stack.work_dir / "stack.json"
    state = json.loads(path.read_text())
    assert state["airflow_url"] == airflow_stack.airflow_url
    assert state["mongo_uri"] == airflow_stack.mongo_uri
    assert state["mongo_uri"].endswith(f"/{config.DEFAULT_DATABASE}")
    assert state["llm_url"] == airflow_stack.simulator_url
    assert path.stat().st_mode & 0o077 == 0, "the state file may hold a Mongo password"

    client = AirflowClient.from_env(stack_file=path, environ={})
    assert client.get_pool(config.POOL_NAME)["name"] == config.POOL_NAME
    with pytest.raises(AirflowAPIError) as missing:
        client.get_dag("no_such_dag")
    assert missing.value.status == 404
    assert "no_such_dag" in missing.value.detail


def test_the_pool_has_the_configured_slots_and_counts_deferred_batches(
    airflow_stack: AirflowStack,
) -> None:
    pool = airflow_stack.airflow_api.get_pool(config.POOL_NAME)
    assert pool["slots"] == airflow_stack.pool_slots
    # A deferred batch waits on its request in the triggerer: it must keep its slot.
    assert pool["include_deferred"] is True


def test_the_connections_have_the_types_and_fields_the_hooks_read(
    airflow_stack: AirflowStack,
) -> None:
    api = airflow_stack.airflow_api
    mongo = api.get_connection(config.MONGO_CONN_ID)
    assert mongo["conn_type"] == "mongo"
    assert mongo["host"] == "127.0.0.1"
    assert f":{mongo['port']}/" in airflow_stack.mongo_uri
    assert mongo["schema"] == airflow_stack.mongo_db_name

    llm = api.get_connection(config.LLM_CONN_ID)
    assert llm["conn_type"] == "llm_batch"
    assert llm["host"] == airflow_stack.simulator_url
    assert llm["password"] != airflow_stack.simulator_api_key, "the API returns keys masked"
    extra = json.loads(llm["extra"])
    assert extra["adapter"] == "batch"
    assert extra["model"] == "sim-small"
    assert extra["price_output_per_1k"] == 0.0015


HOOK_CHECK = """
import json
from airflow.providers.mongo.hooks.mongo import MongoHook
from llm_hook import LLMHook
from llm_batch import config
with MongoHook(config.MONGO_CONN_ID) as mongo:
    database = mongo.get_conn()[mongo.connection.schema]
    database.stack_check.replace_one({"_id": "ping"}, {"_id": "ping", "ok": 1}, upsert=True)
    found = database.stack_check.find_one({"_id": "ping"})
print(json.dumps({"mongo": found["ok"], "llm": LLMHook(config.LLM_CONN_ID).test_connection()}))
"""


def test_the_hooks_reach_the_services_through_the_stored_connections(
    airflow_stack: AirflowStack,
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        "AIRFLOW_HOME": str(airflow_stack.work_dir / "airflow"),
        # Read connections from the metadata DB, as Airflow's own servers do (not only env vars).
        "_AIRFLOW_PROCESS_CONTEXT": "server",
    }
    done = subprocess.run(
        [sys.executable, "-c", HOOK_CHECK],
        env=env,
        cwd=airflow_stack.work_dir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["mongo"] == 1
    ok, message = answer["llm"]
    assert ok, message


PORT_VARIABLES = (
    "AIRFLOW_PORT",
    "MONGO_PORT",
    "SIMULATOR_PORT",
    "TASK_LOG_PORT",
    "TRIGGER_LOG_PORT",
)


def stack_env(work_dir: Path, **ports: int) -> dict[str, str]:
    """The environment of a throwaway stack: its own work dir and ports, nothing external."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_BATCH_", "AIRFLOW"))}
    env["LLM_BATCH_HOME"] = str(work_dir)
    env["LLM_BATCH_POOL_SLOTS"] = "2"
    for name in PORT_VARIABLES:
        env[f"LLM_BATCH_{name}"] = str(ports.get(name.lower(), processes.free_port()))
    return env


def run_stack(
    command: str, env: dict[str, str], timeout_s: float = 400
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STACK_CLI, command], env=env, capture_output=True, text=True, timeout=timeout_s
    )


def session_members(sessions: set[int]) -> list[int]:
    return [p.pid for p in processes.snapshot() if p.sid in sessions and not p.zombie]


def test_up_twice_reuses_the_stack_and_down_leaves_no_process_behind(work_dir: Path) -> None:
    env = stack_env(work_dir)

    up = run_stack("up", env)
    assert up.returncode == 0, up.stderr[-3000:]
    assert "login     admin / " in up.stdout
    state: dict[str, Any] = json.loads((work_dir / "stack.json").read_text())
    pids = {name: record["pid"] for name, record in state["processes"].items()}
    assert set(pids) == {"postgres", "airflow", "mongo", "simulator"}

    started = time.monotonic()
    again = run_stack("up", env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already runs" in again.stderr
    assert time.monotonic() - started < 30
    state_again = json.loads((work_dir / "stack.json").read_text())
    assert {name: r["pid"] for name, r in state_again["processes"].items()} == pids

    assert run_stack("status", env).returncode == 0

    # Killing `airflow standalone` alone orphans its scheduler, api-server and workers ...
    sessions = set(pids.values())
    os.kill(pids["airflow"], signal.SIGKILL)
    time.sleep(1)
    assert session_members({pids["airflow"]}), "expected orphaned Airflow components"

    # ... and `down` still finds and stops every one of them, and the other services.
    down = run_stack("down", env, timeout_s=120)
    assert down.returncode == 0, down.stderr[-3000:]
    assert session_members(sessions) == []
    assert [p.pid for p in processes.snapshot() if processes.within(p.cwd, work_dir)] == []
    for name in PORT_VARIABLES:
        assert not processes.port_open("127.0.0.1", int(env[f"LLM_BATCH_{name}"]))
    assert not (work_dir / "stack.json").exists()
    assert run_stack("status", env).returncode == 1


def test_up_refuses_a_port_taken_by_another_program_and_says_which(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = stack_env(tmp_path / "work", airflow_port=port)
        refused = run_stack("up", env, timeout_s=120)
    assert refused.returncode == 1
    assert f"{port} for the Airflow api-server (UI)" in refused.stderr
    assert f"pid {os.getpid()}" in refused.stderr
    assert "LLM_BATCH_AIRFLOW_PORT" in refused.stderr
    assert not (tmp_path / "work" / "stack.json").exists()
