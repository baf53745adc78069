"""Fixtures shared by every test layer: real servers on loopback, started once per session."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymongo
import pytest
import requests
from pymongo.database import Database

from llm_batch_dev.stack import processes

REPO_ROOT = Path(__file__).resolve().parent.parent

# Airflow reads its home at import: keep test runs out of ~/airflow and the demo's home.
os.environ.setdefault("AIRFLOW_HOME", str(REPO_ROOT / ".work" / "test-airflow-home"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


@pytest.fixture(scope="session")
def mongo_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MongoDB-wire server: `LLM_BATCH_TEST_MONGO_URI`, else SecantusDB on loopback."""
    configured = os.environ.get("LLM_BATCH_TEST_MONGO_URI")
    if configured:
        yield configured
        return
    port = processes.free_port()
    base = tmp_path_factory.mktemp("mongo")
    proc = processes.start_mongo_wire_server(port, base / "data", base / "secantus.log")
    try:
        yield f"mongodb://127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def mongo_client(mongo_uri: str) -> Iterator[pymongo.MongoClient[dict[str, Any]]]:
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        mongo_uri, serverSelectionTimeoutMS=5000
    )
    yield client
    client.close()


@pytest.fixture
def mongo_db(mongo_client: pymongo.MongoClient[dict[str, Any]]) -> Iterator[Database[Any]]:
    """A fresh, uniquely named database, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield mongo_client[name]
    mongo_client.drop_database(name)


@dataclass
class Simulator:
    """A running LLM simulator process and a thin client for its admin endpoints."""

    url: str
    api_key: str
    process: processes.ManagedProcess
    session: requests.Session = field(default_factory=requests.Session)

    def stats(self, **query: Any) -> dict[str, Any]:
        response = self.session.get(f"{self.url}/stats", params=query, timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def configure(self, **settings: Any) -> dict[str, Any]:
        """Change the simulator's settings at run time (see `SimulatorConfig`)."""
        response = self.session.post(f"{self.url}/admin/config", json=settings, timeout=10)
        response.raise_for_status()
        return dict(response.json())

    def reset(self) -> None:
        self.session.post(f"{self.url}/admin/reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def start_simulator(tmp_path: Path) -> Iterator[Callable[..., Simulator]]:
    """Factory: start a simulator with the given `SimulatorConfig` settings; stopped after."""
    started: list[Simulator] = []

    def _start(api_key: str = "test-key", **settings: Any) -> Simulator:
        port = processes.free_port()
        proc = processes.start_simulator(
            port,
            tmp_path / f"simulator-{port}.log",
            "--api-key",
            api_key,
            "--config-json",
            json.dumps(settings),
        )
        sim = Simulator(f"http://127.0.0.1:{port}", api_key, proc)
        started.append(sim)
        return sim

    yield _start
    for sim in started:
        sim.stop()
