"""Stack settings, Airflow's environment, and the MongoDB URI -> `mongo` connection translation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pymongo.common import validate
from pymongo.uri_parser import parse_uri

from llm_batch import config
from llm_batch.cli.local_stack import MARKER, REPO_ROOT
from llm_batch.orchestration.local_settings import write_local_settings
from llm_batch_dev.stack.__main__ import render_status
from llm_batch_dev.stack.airflow_config import (
    AIRFLOW_TUNING,
    SQL_CONN_ENV,
    airflow_environment,
    max_connections,
    metadata_db_environment,
    record_metadata_db_in_config,
)
from llm_batch_dev.stack.errors import StackError
from llm_batch_dev.stack.launcher import Stack
from llm_batch_dev.stack.mongo_uri import (
    mongo_connection_fields,
    parse_mongo_uri,
    redact_uri,
    uri_with_database,
)
from llm_batch_dev.stack.settings import StackSettings


def settings_from(tmp_path: Path, **env: str) -> StackSettings:
    return StackSettings.from_env({"LLM_BATCH_HOME": str(tmp_path), **env})


def test_defaults_start_everything_locally_on_the_documented_ports(tmp_path: Path) -> None:
    settings = settings_from(tmp_path)
    assert settings.work_dir == tmp_path.resolve()
    assert settings.airflow_home == tmp_path.resolve() / "airflow"
    assert (settings.airflow_port, settings.mongo_port, settings.simulator_port) == (
        8080,
        27017,
        8765,
    )
    assert settings.pool_slots == config.DEFAULT_POOL_SLOTS
    assert settings.mongo_uri is None and settings.llm_url is None
    assert settings.effective_mongo_uri == "mongodb://127.0.0.1:27017/llm_batch"
    assert settings.simulator_config == {"latency_ms": 300, "latency_jitter_ms": 100}
    assert settings.dags_folder == REPO_ROOT / "dags"
    assert settings.plugins_folder == REPO_ROOT / "plugins"


def test_the_work_dir_defaults_to_dot_work_in_the_repo() -> None:
    assert StackSettings.from_env({}).work_dir == REPO_ROOT / ".work"


def test_environment_variables_override_ports_pool_and_simulator(tmp_path: Path) -> None:
    settings = settings_from(
        tmp_path,
        LLM_BATCH_AIRFLOW_PORT="18080",
        LLM_BATCH_MONGO_PORT="27018",
        LLM_BATCH_SIMULATOR_PORT="18765",
        LLM_BATCH_TASK_LOG_PORT="18793",
        LLM_BATCH_TRIGGER_LOG_PORT="18794",
        LLM_BATCH_POOL_SLOTS="4",
        LLM_BATCH_SIMULATOR_CONFIG='{"latency_ms": 5}',
    )
    assert settings.ports() == {
        "Airflow api-server (UI)": 18080,
        "Airflow task-log server": 18793,
        "Airflow trigger-log server": 18794,
        "MongoDB-wire server (SecantusDB)": 27018,
        "LLM simulator": 18765,
    }
    assert settings.airflow_url == "http://127.0.0.1:18080"
    assert settings.pool_slots == 4
    assert settings.parallelism > settings.pool_slots
    assert settings.simulator_config == {"latency_ms": 5}


def test_external_services_replace_the_local_ones(tmp_path: Path) -> None:
    settings = settings_from(
        tmp_path,
        LLM_BATCH_MONGO_URI="mongodb://db.example:27017/jobs",
        LLM_BATCH_LLM_URL="https://llm.example/api",
        LLM_BATCH_LLM_API_KEY="k-123",
        LLM_BATCH_LLM_MODEL="big-model",
        LLM_BATCH_LLM_ADAPTER="openai",
        LLM_BATCH_LLM_EXTRA='{"timeout_s": 90}',
    )
    assert settings.mongo_db_name == "jobs"
    assert settings.effective_mongo_uri == "mongodb://db.example:27017/jobs"
    assert settings.llm_extra["model"] == "big-model"
    assert settings.llm_extra["adapter"] == "openai"
    assert settings.llm_extra["timeout_s"] == 90
    assert settings.llm_extra["price_input_per_1k"] == 0.0005
    # Nothing is started for them, so their ports are not claimed.
    assert set(settings.ports()) == {
        "Airflow api-server (UI)",
        "Airflow task-log server",
        "Airflow trigger-log server",
    }
    stack = Stack(settings)
    assert stack.llm_url == "https://llm.example/api"
    assert stack.llm_api_key == "k-123"
    assert "k-123" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LLM_BATCH_AIRFLOW_PORT": "eighty"}, "LLM_BATCH_AIRFLOW_PORT must be a whole number"),
        ({"LLM_BATCH_MONGO_PORT": "70000"}, "mongo_port must be a TCP port"),
        ({"LLM_BATCH_POOL_SLOTS": "0"}, "pool_slots must be a whole number >= 1"),
        ({"LLM_BATCH_SIMULATOR_CONFIG": "{latency: 1}"}, "LLM_BATCH_SIMULATOR_CONFIG is not valid"),
        ({"LLM_BATCH_SIMULATOR_CONFIG": "[1]"}, "must be a JSON object"),
        ({"LLM_BATCH_LLM_URL": "http://x"}, "LLM_BATCH_LLM_API_KEY is not"),
        ({"LLM_BATCH_MONGO_URI": "postgres://x"}, "Not a MongoDB URI"),
        ({"LLM_BATCH_SIMULATOR_PORT": "8080"}, "Two services would share a port"),
    ],
)
def test_bad_settings_are_refused_with_what_to_fix(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(StackError, match=message.replace("[", r"\[")):
        settings_from(tmp_path, **env)


def test_free_port_settings_collide_with_nothing_and_with_each_other(tmp_path: Path) -> None:
    first = StackSettings.on_free_ports(tmp_path / "a")
    second = StackSettings.on_free_ports(tmp_path / "b", pool_slots=3)
    assert second.pool_slots == 3
    assert len(set(first.ports().values()) | set(second.ports().values())) == 10


def test_airflow_gets_its_home_ports_folders_and_the_marker(tmp_path: Path) -> None:
    settings = settings_from(tmp_path, LLM_BATCH_AIRFLOW_PORT="18080", LLM_BATCH_POOL_SLOTS="6")
    env = airflow_environment(settings, {"PATH": "/usr/bin", "AIRFLOW_HOME": "/elsewhere"})
    assert env["AIRFLOW_HOME"] == str(tmp_path.resolve() / "airflow")
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(REPO_ROOT / "dags")
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == str(REPO_ROOT / "plugins")
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] == "False"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "llm_batch.orchestration.local_executor.LocalExecutor"
    assert env["AIRFLOW__API__PORT"] == "18080"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18080/execution/"
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) >= 6
    assert len(env["AIRFLOW__API_AUTH__JWT_SECRET"]) >= 64
    assert env[MARKER] == str(tmp_path.resolve())


def test_the_triggerer_has_room_and_threads_for_the_whole_pool(tmp_path: Path) -> None:
    small = airflow_environment(settings_from(tmp_path, LLM_BATCH_POOL_SLOTS="8"), {})
    large = airflow_environment(settings_from(tmp_path, LLM_BATCH_POOL_SLOTS="2000"), {})
    assert small["AIRFLOW__TRIGGERER__CAPACITY"] == "1000"
    assert small[config.TRIGGER_THREADS_ENV] == "8"
    assert int(large["AIRFLOW__TRIGGERER__CAPACITY"]) > 2000
    assert large[config.TRIGGER_THREADS_ENV] == "2000"
    exported = {"AIRFLOW__TRIGGERER__CAPACITY": "50", config.TRIGGER_THREADS_ENV: "4"}
    env = airflow_environment(settings_from(tmp_path), exported)
    assert env["AIRFLOW__TRIGGERER__CAPACITY"] == "50" and env[config.TRIGGER_THREADS_ENV] == "4"


def test_the_callers_airflow_variables_win_over_tuning_but_not_over_placement(
    tmp_path: Path,
) -> None:
    settings = StackSettings(work_dir=tmp_path, airflow_env={"AIRFLOW__API__WORKERS": "3"})
    base = {
        "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY": "64",
        "AIRFLOW__API__PORT": "1",
        "AIRFLOW__API__WORKERS": "1",
    }
    env = airflow_environment(settings, base)
    assert "AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY" in AIRFLOW_TUNING
    assert env["AIRFLOW__SCHEDULER__MAX_TIS_PER_QUERY"] == "64"
    assert env["AIRFLOW__API__PORT"] == "8080"
    assert env["AIRFLOW__API__WORKERS"] == "3", "explicit airflow_env wins over everything"


def test_the_metadata_db_is_the_stacks_own_postgresql_whatever_the_caller_exports(
    tmp_path: Path,
) -> None:
    settings = StackSettings(work_dir=tmp_path)
    env = airflow_environment(settings, {SQL_CONN_ENV: "sqlite:////elsewhere/airflow.db"})
    socket_dir = tmp_path.resolve() / "postgres" / "run"
    assert env[SQL_CONN_ENV].startswith("postgresql+psycopg2://")
    assert env[SQL_CONN_ENV].endswith(f"/airflow?host={socket_dir}")
    assert ":" not in env[SQL_CONN_ENV].split("://", 1)[1].split("@")[0], "no password"
    assert metadata_db_environment(settings)[SQL_CONN_ENV] == env[SQL_CONN_ENV]


def test_the_pool_covers_every_running_task_and_the_server_every_pool(tmp_path: Path) -> None:
    settings = StackSettings(work_dir=tmp_path, pool_slots=32)
    env = airflow_environment(settings, {})
    pool = int(env["AIRFLOW__DATABASE__SQL_ALCHEMY_POOL_SIZE"])
    overflow = int(env["AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW"])
    assert pool + overflow >= settings.parallelism, "one connection per concurrent API call"
    api_workers = int(env["AIRFLOW__API__WORKERS"])
    assert max_connections(settings, env) >= (api_workers + 4) * (pool + overflow)
    more_workers = {**env, "AIRFLOW__API__WORKERS": str(api_workers + 2)}
    assert max_connections(settings, more_workers) > max_connections(settings, env)


def test_a_lost_instance_is_failed_within_a_minute_and_api_calls_are_not_resent_early(
    tmp_path: Path,
) -> None:
    env = airflow_environment(StackSettings(work_dir=tmp_path), {})
    timeout = int(env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"])
    interval = float(env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL"])
    assert timeout + interval <= 60
    assert timeout >= 5 * 6, "several missed heartbeats (one per 5 s) before a task is failed"
    assert float(env["AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT"]) > 5


# MongoDB URIs


def hook_view(
    fields: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> tuple[str, dict[str, Any]]:
    """The URI and client options MongoHook builds from these connection fields."""
    from airflow.providers.mongo.hooks.mongo import MongoHook

    connection = {k: v for k, v in fields.items() if v is not None and k != "extra"}
    connection["conn_type"] = "mongo"
    connection["extra"] = fields["extra"]
    monkeypatch.setenv("AIRFLOW_CONN_STACK_TEST", json.dumps(connection))
    hook = MongoHook("stack_test")
    return hook.uri, hook.extras


def client_view(uri: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What pymongo makes of a URI plus keyword options (no DNS, no connection)."""
    parsed = parse_uri(uri, validate=True, warn=False)
    merged = {k.lower(): v for k, v in parsed["options"].items()}
    # Keyword options go through the same validation MongoClient applies (ms -> s, tags -> dicts).
    merged.update(validate(k.lower(), v) for k, v in (options or {}).items())
    username = parsed["username"] or merged.get("username")
    return {
        "nodes": sorted(parsed["nodelist"]),
        "username": username,
        "password": parsed["password"],
        # Only credentials are checked against a database: the default one, unless authSource.
        "auth_database": (merged.get("authsource") or parsed["database"] or "admin")
        if username
        else None,
        "options": {k: v for k, v in merged.items() if k not in ("authsource", "username")},
    }


@pytest.mark.parametrize(
    "uri",
    [
        "mongodb://127.0.0.1:27017/llm_batch",
        "mongodb://db.example/jobs",
        "mongodb://user:p%40ss%3Aw%2Frd@db.example:27018/jobs?authSource=admin&retryWrites=false",
        "mongodb://user:secret@db.example:27017/?replicaSet=rs0&w=majority&connectTimeoutMS=3000",
        "mongodb://user:secret@db.example:27017",
        "mongodb://user:secret@h1:27017,h2:27018,h3/jobs?replicaSet=rs0&readPreference=secondary",
        "mongodb://[::1]:27017/jobs?tls=false",
        "mongodb://db.example/jobs?readPreferenceTags=dc:ny&readPreferenceTags=",
    ],
)
def test_the_mongo_connection_makes_mongohook_connect_as_the_uri_does(
    uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = mongo_connection_fields(uri, config.DEFAULT_DATABASE)
    hook_uri, hook_options = hook_view(fields, monkeypatch)
    assert client_view(hook_uri, hook_options) == client_view(uri)
    expected_database = parse_mongo_uri(uri).database or config.DEFAULT_DATABASE
    assert fields["schema"] == expected_database


def test_a_uri_without_database_gets_the_default_and_keeps_authenticating_against_admin() -> None:
    fields = mongo_connection_fields("mongodb://u:p@db.example:27017", "llm_batch")
    assert fields["schema"] == "llm_batch"
    assert fields["extra"] == {"authSource": "admin"}
    assert (fields["host"], fields["port"], fields["login"], fields["password"]) == (
        "db.example",
        27017,
        "u",
        "p",
    )
    # Without credentials there is nothing to authenticate, so no authSource is invented.
    assert mongo_connection_fields("mongodb://db.example", "x")["extra"] == {}
    # Mechanisms that authenticate elsewhere ($external) keep their own default.
    x509 = "mongodb://CN%3Dclient@db.example/?authMechanism=MONGODB-X509&tls=true"
    assert "authSource" not in mongo_connection_fields(x509, "x")["extra"]


def test_srv_and_options_move_to_the_extra_typed() -> None:
    fields = mongo_connection_fields(
        "mongodb+srv://u:p@cluster0.example.net/jobs?retryWrites=true&w=majority&maxPoolSize=20",
        "llm_batch",
    )
    assert fields["host"] == "cluster0.example.net"
    assert fields["port"] is None, "MongoHook refuses a port on srv connections"
    assert fields["schema"] == "jobs"
    assert fields["extra"] == {"srv": True, "retryWrites": True, "w": "majority", "maxPoolSize": 20}


def test_a_login_without_password_is_kept_as_a_client_option() -> None:
    fields = mongo_connection_fields(
        "mongodb://CN%3Dclient@db.example/?authMechanism=MONGODB-X509&tls=true", "x"
    )
    assert fields["login"] == "CN=client"
    assert fields["password"] is None
    assert fields["extra"]["username"] == "CN=client"


def test_replica_sets_keep_every_host_in_the_host_field() -> None:
    fields = mongo_connection_fields("mongodb://h1:1,h2:2/db?replicaSet=rs", "x")
    assert (fields["host"], fields["port"]) == ("h1:1,h2:2", None)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://db.example", "Not a MongoDB URI"),
        ("mongodb://", "names no host"),
        ("mongodb://user:pw@", "names no host"),
        ("mongodb+srv://a.example:27017/db", "exactly one host and no port"),
        ("mongodb+srv://a.example,b.example/db", "exactly one host and no port"),
    ],
)
def test_malformed_uris_are_refused_without_echoing_the_password(uri: str, message: str) -> None:
    with pytest.raises(StackError, match=message) as refused:
        parse_mongo_uri(uri)
    assert "pw" not in str(refused.value)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("mongodb://127.0.0.1:27017", "mongodb://127.0.0.1:27017/llm_batch"),
        ("mongodb://127.0.0.1:27017/", "mongodb://127.0.0.1:27017/llm_batch"),
        ("mongodb://h/?w=1", "mongodb://h/llm_batch?w=1"),
        ("mongodb://u:p@h", "mongodb://u:p@h/llm_batch?authSource=admin"),
        ("mongodb://u:p@h/?authSource=ops", "mongodb://u:p@h/llm_batch?authSource=ops"),
        ("mongodb://u:p@h/jobs", "mongodb://u:p@h/jobs"),
        ("mongodb+srv://c.example.net/?w=1", "mongodb+srv://c.example.net/llm_batch?w=1"),
    ],
)
def test_uri_with_database_names_the_database_and_changes_nothing_else(
    uri: str, expected: str
) -> None:
    assert uri_with_database(uri, "llm_batch") == expected
    if not uri.startswith("mongodb+srv"):
        before, after = client_view(uri), client_view(expected)
        assert (before["nodes"], before["auth_database"]) == (
            after["nodes"],
            after["auth_database"],
        )


def test_a_redacted_uri_keeps_everything_but_the_password() -> None:
    uri = "mongodb://app:s3cr%40t@db1:27017,db2:27017/jobs?replicaSet=rs0"
    assert redact_uri(uri) == "mongodb://app:***@db1:27017,db2:27017/jobs?replicaSet=rs0"
    assert redact_uri("mongodb://db1:27017/jobs") == "mongodb://db1:27017/jobs"


# Status


def test_status_of_a_stack_that_never_started_says_how_to_start_it(tmp_path: Path) -> None:
    status = Stack(StackSettings(work_dir=tmp_path)).status()
    assert status["running"] is False
    assert "make up" in render_status(status)


def test_the_preload_imports_what_a_batch_task_needs_and_nothing_of_airflow(
    tmp_path: Path,
) -> None:
    """Run in a fresh interpreter: Airflow imports it while Airflow itself is half-imported."""
    settings = write_local_settings(tmp_path)
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]); "
        "from llm_batch.orchestration.preload import MODULES; "
        "assert all(m in sys.modules for m in MODULES), MODULES; "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'airflow'], 'airflow imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(settings)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert settings == tmp_path / "config" / "airflow_local_settings.py"


def test_airflow_cfg_names_the_stacks_database_so_airflow_home_alone_reaches_it(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "airflow.cfg"
    cfg.write_text(
        "[core]\nsql_alchemy_conn = not-this-one\n\n[database]\n# the URL\n"
        "sql_alchemy_conn = sqlite:////x/airflow.db\n\n[logging]\nlevel = INFO\n"
    )
    url = "postgresql+psycopg2://me@/airflow?host=/w/postgres/run"
    record_metadata_db_in_config(tmp_path, url)
    record_metadata_db_in_config(tmp_path, url)
    text = cfg.read_text()
    assert text.count(f"sql_alchemy_conn = {url}") == 1
    assert "sqlite" not in text and "sql_alchemy_conn = not-this-one" in text
    assert text.index(url) < text.index("[logging]")
    assert cfg.stat().st_mode & 0o077 == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "airflow.cfg").write_text("[core]\nload_examples = False\n")
    record_metadata_db_in_config(bare, url)
    assert (bare / "airflow.cfg").read_text().endswith(f"[database]\nsql_alchemy_conn = {url}\n")
