"""The full local stack for end-to-end tests: SecantusDB, the simulator, `airflow standalone`.

One stack per test session, in a temporary work dir on free ports, with the repo's dags and
plugins and a small pool (`LLM_BATCH_TEST_POOL_SLOTS`, default 8). Its alerts go to a webhook
served by the test session (`AlertSink`), through a `slackwebhook` connection stored in the
stack's metadata DB (so the triggerer's deadline callback looks it up through Airflow's execution
API, from its worker thread); and its runs' deadline is short
(`E2E_DEADLINE_S`), so a test can see a deadline alert fire. It always comes down at the end,
and the session fails if anything it started is still running.

Every test that uses the stack also fails if a task instance stayed `running` after its
supervisor exited while it ran (a lost final state: `llm_batch_dev.stack.lost_states`).

Work dirs are made under the system's temp dir, not pytest's: run as root, the stack's
PostgreSQL runs as an unprivileged user, which must be able to enter the work dir's parents
(pytest's base temp dir is private to its user).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llm_batch import config
from llm_batch.cli.airflow_client import AirflowClient
from llm_batch_dev.stack import processes
from llm_batch_dev.stack.errors import StackError
from llm_batch_dev.stack.launcher import Stack
from llm_batch_dev.stack.settings import StackSettings
from tests.conftest import Simulator

DEFAULT_TEST_POOL_SLOTS = 8
E2E_DEADLINE_S = 20
"""Every job run of the e2e stack alerts `deadline_missed` if still going after this."""


class AlertSink:
    """A webhook on loopback that keeps every alert POSTed to it: Slack's body, `{"text": ...}`."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.alerts.append(json.loads(body))
                # What Slack answers; the provider's hook takes anything else as a failure.
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, match: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict[str, Any]:
        """Return the first alert that `match`es, waiting up to `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [alert for alert in list(self.alerts) if match(alert)]
            if found:
                return found[0]
            time.sleep(0.5)
        raise AssertionError(f"no matching alert within {timeout_s:.0f} s; got {self.alerts}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class AirflowStack:
    """What a test needs to reach the running stack."""

    stack: Stack
    simulator: Simulator
    alerts: AlertSink
    """The stack's simulator: `stats()`, `configure(**settings)`, `reset()`."""
    pool_slots: int
    mongo_uri: str = field(init=False)
    mongo_db_name: str = field(init=False)
    simulator_url: str = field(init=False)
    simulator_api_key: str = field(init=False, repr=False)
    airflow_url: str = field(init=False)
    airflow_api: AirflowClient = field(init=False)
    work_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.mongo_uri = self.stack.mongo_uri
        self.mongo_db_name = self.stack.mongo_db_name
        self.simulator_url = self.simulator.url
        self.simulator_api_key = self.simulator.api_key
        self.airflow_url = self.stack.airflow_url
        self.airflow_api = self.stack.airflow_api
        self.work_dir = self.stack.work_dir

    @property
    def cli_env(self) -> dict[str, str]:
        """Environment that points the `llm-batch` CLI at this stack (overrides a developer's)."""
        return {
            "LLM_BATCH_HOME": str(self.work_dir),
            "LLM_BATCH_AIRFLOW_URL": self.airflow_url,
            "LLM_BATCH_AIRFLOW_USERNAME": self.stack.airflow_username,
            "LLM_BATCH_AIRFLOW_PASSWORD": self.stack.airflow_password or "",
            "LLM_BATCH_MONGO_URI": self.mongo_uri,
        }


def stack_work_dir(prefix: str) -> Path:
    """A fresh work dir the stack's PostgreSQL can reach (see the module docstring)."""
    return Path(tempfile.mkdtemp(prefix=f"llm-batch-{prefix}-"))


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """A fresh work dir for a stack of a test's own; removed afterwards."""
    path = stack_work_dir("test")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def configured_pool_slots() -> int:
    raw = os.environ.get("LLM_BATCH_TEST_POOL_SLOTS", str(DEFAULT_TEST_POOL_SLOTS))
    return int(raw)


@pytest.fixture(scope="session")
def airflow_stack() -> Iterator[AirflowStack]:
    """A running stack; a failed start fails the tests that use it, with Airflow's log tail."""
    slots = configured_pool_slots()
    work_dir = stack_work_dir("e2e")
    alerts = AlertSink()
    stack = Stack(
        StackSettings.on_free_ports(
            work_dir,
            pool_slots=slots,
            simulator_config={"latency_ms": 50},
            airflow_env={
                config.ALERT_SLACK_CONN_ID_ENV: config.ALERT_SLACK_CONN_ID,
                "LLM_BATCH_DEADLINE_S": str(E2E_DEADLINE_S),
            },
        )
    )
    try:
        try:
            stack.up()
        except (StackError, RuntimeError, TimeoutError) as exc:
            pytest.fail(f"The local stack did not start: {exc}", pytrace=False)
        # The webhook URL is the connection's secret, as an operator would store it.
        stack.airflow_api.put_connection(
            config.ALERT_SLACK_CONN_ID, "slackwebhook", password=alerts.url
        )
        simulator_process = stack.process("simulator")
        assert simulator_process is not None
        simulator = Simulator(stack.llm_url, stack.llm_api_key, simulator_process)
        yield AirflowStack(stack, simulator, alerts, slots)
    finally:
        stack.down()
        alerts.close()
    leftovers = [proc.pid for proc in processes.snapshot() if processes.within(proc.cwd, work_dir)]
    assert not leftovers, f"stack processes still running after down: {leftovers}"
    shutil.rmtree(work_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_lost_final_state(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test on the stack if an instance stayed `running` after its supervisor exited."""
    if "airflow_stack" not in request.fixturenames:
        yield
        return
    if request.node.get_closest_marker("kills_task_processes"):
        # A SIGKILLed task process is exactly an instance whose supervisor never reported.
        yield
        return
    stack: Stack = request.getfixturevalue("airflow_stack").stack
    mark = stack.audit_mark()
    yield
    # "Said queued": a deferred task's trigger fired and re-queued it before the scheduler
    # read the executor's report of the defer exit; Airflow fails and retries that try at once
    # (no heartbeat-timeout wait), and every retry here skips what is answered.
    lost = [
        found
        for found in stack.lost_final_states(since=mark)
        if "said queued" not in found.evidence
    ]
    assert not lost, (
        f"{len(lost)} task instance(s) stayed running after their supervisor exited (the job "
        "then waits for the heartbeat timeout):\n" + "\n".join(map(str, lost))
    )
