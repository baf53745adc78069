"""Start, find and stop the local services (MongoDB-wire server, LLM simulator, Airflow).

Each runs as a process group in a session of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llm_batch.cli.local_stack import MARKER


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
    user: tuple[int, int] | None = None,
) -> ManagedProcess:
    """Start `argv` in a new session with stdout and stderr appended to `log_path`.

    Whatever it creates is private to its user (umask 077): Airflow writes generated secrets
    (the admin password, `airflow.cfg`'s keys) with the umask it inherits. `user` is a
    (uid, gid) to run as instead of this process's own.
    """
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
            umask=0o077,
            user=None if user is None else user[0],
            group=None if user is None else user[1],
            extra_groups=None if user is None else [],
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


MONGO_WIRE_SERVER = "mongo-wire server (SecantusDB)"
SIMULATOR = "LLM simulator"


def mongo_wire_server_argv(port: int, storage: Path) -> list[str]:
    """Argv of SecantusDB on 127.0.0.1:`port` with its data in `storage`."""
    return python_module(
        "secantus", "--host", "127.0.0.1", "--port", str(port), "--storage-path", str(storage)
    )


def simulator_argv(port: int, *args: str) -> list[str]:
    """Argv of the LLM simulator on 127.0.0.1:`port`; `args` go to its command line."""
    return python_module(
        "llm_batch_dev.simulator", "--host", "127.0.0.1", "--port", str(port), *args
    )


def start_mongo_wire_server(port: int, storage: Path, log_path: Path) -> ManagedProcess:
    """Start SecantusDB (MongoDB wire protocol over TCP, on WiredTiger) on 127.0.0.1:`port`."""
    storage.mkdir(parents=True, exist_ok=True)
    proc = start(MONGO_WIRE_SERVER, mongo_wire_server_argv(port, storage), log_path)
    proc.wait_for_port("127.0.0.1", port)
    return proc


def start_simulator(port: int, log_path: Path, *args: str) -> ManagedProcess:
    """Start the LLM simulator on 127.0.0.1:`port`; extra `args` go to its command line."""
    proc = start(SIMULATOR, simulator_argv(port, *args), log_path)
    proc.wait_for_port("127.0.0.1", port)
    return proc


@dataclass(frozen=True)
class ProcessInfo:
    """One process as /proc shows it."""

    pid: int
    ppid: int
    sid: int
    zombie: bool
    cwd: str | None
    environ: tuple[bytes, ...]
    """`NAME=value` entries; empty once a process rewrites its title (setproctitle)."""


def snapshot() -> list[ProcessInfo]:
    """Every process this user may inspect."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cwd: str | None = None
            with contextlib.suppress(OSError):
                cwd = os.readlink(stat.parent / "cwd")
            environ = b""
            with contextlib.suppress(OSError):
                environ = (stat.parent / "environ").read_bytes()
            found.append(
                ProcessInfo(
                    pid=int(stat.parent.name),
                    ppid=int(fields[1]),
                    sid=int(fields[3]),
                    zombie=fields[0] == "Z",
                    cwd=cwd,
                    environ=tuple(environ.split(b"\0")),
                )
            )
    return found


def within(path: str | None, directory: Path) -> bool:
    """True if `path` (a process's cwd) is `directory` or inside it."""
    return path is not None and (path == str(directory) or path.startswith(f"{directory}/"))


def ancestors(pid: int) -> set[int]:
    """`pid` and every process above it up to init."""
    chain = {pid}
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        chain.add(pid)
    return chain


def find_stack_processes(work_dir: Path, sessions: Collection[int] = ()) -> list[ProcessInfo]:
    """Return the live processes of the stack in `work_dir`: every member of a session it started.

    A session is this stack's if one of its processes carries the marker, or if it is a
    recorded one and still runs in the work dir: Airflow's api-server and executor workers
    rewrite their titles, which wipes the environment /proc shows, but not their session or
    working directory (PostgreSQL's is its data dir, inside the work dir). Nothing below this
    process is ever included.
    """
    everything = snapshot()
    marker = f"{MARKER}={work_dir}".encode()
    ours = {proc.sid for proc in everything if marker in proc.environ}
    ours |= {proc.sid for proc in everything if proc.sid in sessions and within(proc.cwd, work_dir)}
    members = {proc.pid for proc in everything if proc.sid in ours}
    # PostgreSQL's server processes start sessions of their own and lose the marker with
    # their titles: they are the children of its postmaster, in its data dir.
    members |= {
        proc.pid for proc in everything if proc.ppid in members and within(proc.cwd, work_dir)
    }
    spare = ancestors(os.getpid())
    return [
        proc
        for proc in everything
        if proc.pid in members and proc.pid not in spare and not proc.zombie
    ]


def terminate(pids: Sequence[int], grace_s: float = 10.0) -> None:
    """SIGTERM each process, then SIGKILL whichever still runs after `grace_s`."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    remaining = list(pids)
    while remaining and time.monotonic() < deadline:
        time.sleep(0.2)
        remaining = [pid for pid in remaining if process_alive(pid)]
    for pid in remaining:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def process_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


def exited_children(pid: int) -> list[int]:
    """Return the children of `pid` that have exited but were not reaped (zombies)."""
    return [proc.pid for proc in snapshot() if proc.ppid == pid and proc.zombie]


def listening_pids(port: int) -> list[int]:
    """Return the processes listening on TCP `port` (any address), as far as /proc shows them."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return []
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        with contextlib.suppress(OSError):
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in inodes:
                        pids.add(int(fd_dir.parent.name))
                        break
    return sorted(pids)


def command_line(pid: int) -> str:
    """The process's command line, or '' if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()
