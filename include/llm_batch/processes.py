"""Start and stop local services (MongoDB-wire server, LLM simulator, Airflow) as process groups."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


@dataclass
class ManagedProcess:
    """A service started in its own session, so stopping it stops all its children too."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_for_port(self, host: str, port: int, timeout_s: float = 60.0) -> None:
        """Block until the port accepts connections; fail with the log tail if the process died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if port_open(host, port):
                return
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with code {self.popen.returncode} before listening on "
                    f"{host}:{port}; its log ({self.log_path}) ends with:\n{tail(self.log_path)}"
                )
            time.sleep(0.2)
        raise TimeoutError(
            f"{self.name} did not listen on {host}:{port} within {timeout_s:.0f}s; "
            f"see {self.log_path}:\n{tail(self.log_path)}"
        )

    def stop(self, grace_s: float = 10.0) -> None:
        stop_process_group(self.pid, grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=1)


def start(
    name: str,
    argv: Sequence[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start `argv` in a new session with stdout and stderr appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )
    return ManagedProcess(name, popen, log_path)


def python_module(module: str, *args: str) -> list[str]:
    """Argv that runs `python -m module` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def stop_process_group(pgid: int, grace_s: float = 10.0) -> None:
    """SIGTERM the whole group, then SIGKILL whatever is left after `grace_s`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; look for a live member.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_mongo_wire_server(port: int, storage: Path, log_path: Path) -> ManagedProcess:
    """Start SecantusDB (MongoDB wire protocol over TCP, on WiredTiger) on 127.0.0.1:`port`."""
    storage.mkdir(parents=True, exist_ok=True)
    proc = start(
        "mongo-wire server (SecantusDB)",
        python_module(
            "secantus", "--host", "127.0.0.1", "--port", str(port), "--storage-path", str(storage)
        ),
        log_path,
    )
    proc.wait_for_port("127.0.0.1", port)
    return proc


def start_simulator(port: int, log_path: Path, *args: str) -> ManagedProcess:
    """Start the LLM simulator on 127.0.0.1:`port`; extra `args` go to its command line."""
    proc = start(
        "LLM simulator",
        python_module("llm_batch.simulator", "--host", "127.0.0.1", "--port", str(port), *args),
        log_path,
    )
    proc.wait_for_port("127.0.0.1", port)
    return proc
