"""The embedded stack's settings: where it lives, what it starts, on which ports.

`StackSettings.from_env` reads the `LLM_BATCH_*` environment variables (docs/local-stack.md
lists them); every value is checked when the settings are made, so a mistake is reported with
what to fix before anything starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_batch import config
from llm_batch.cli.local_stack import REPO_ROOT, STATE_FILE, default_work_dir
from llm_batch_dev.stack import processes
from llm_batch_dev.stack.errors import StackError
from llm_batch_dev.stack.mongo_uri import parse_mongo_uri, uri_with_database
from llm_batch_dev.stack.postgres import PostgresLayout

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
    def postgres(self) -> PostgresLayout:
        """The metadata DB's data and socket: `<work dir>/postgres`."""
        return PostgresLayout(self.work_dir / "postgres")

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
