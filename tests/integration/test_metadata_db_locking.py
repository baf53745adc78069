"""Why the embedded stack's metadata DB is PostgreSQL: a retried start cannot undo a final state.

Airflow's execution API starts a task instance (`PATCH .../run`, `ti_run`) by reading its state
with `SELECT ... FOR UPDATE`, checking it is `queued`, then writing `running` (end date cleared)
by id. A task's start request that takes longer than its execution-API timeout is sent again
while the first is still being served. These tests replay that interleaving with the same
statements on a real embedded PostgreSQL and on SQLite: the first request reads, stalls before
its write; the retry starts the task, the task finishes; then the first request writes.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Engine, MetaData, String, Table, create_engine, select, update

from llm_batch_dev.stack import postgres

metadata = MetaData()
task_instance = Table(
    "ti", metadata, Column("id", String, primary_key=True), Column("state", String)
)
STALL_S = 1.0


@pytest.fixture(scope="module")
def postgres_engine() -> Iterator[Engine]:
    # Under the system's temp dir: run as root, the server's own user must reach it.
    root = Path(tempfile.mkdtemp(prefix="llm-batch-test-pg-"))
    try:
        with postgres.running_server(root, max_connections=20) as layout:
            engine = create_engine(layout.url("postgres"))
            yield engine
            engine.dispose()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def start(engine: Engine, stall: threading.Event | None = None) -> str:
    """`ti_run`'s check-then-write; `stall` holds it between the two. Returns what it read."""
    with engine.connect() as connection, connection.begin():
        query = select(task_instance.c.state).where(task_instance.c.id == "t").with_for_update()
        state = str(connection.execute(query).scalar())
        if stall is not None:
            stall.wait(10)
        if state == "queued":
            connection.execute(
                update(task_instance).where(task_instance.c.id == "t").values(state="running")
            )
    return state


def finish(engine: Engine) -> None:
    with engine.connect() as connection, connection.begin():
        query = select(task_instance.c.state).where(task_instance.c.id == "t").with_for_update()
        if connection.execute(query).scalar() == "running":
            connection.execute(
                update(task_instance).where(task_instance.c.id == "t").values(state="success")
            )


def replay_a_retried_start(engine: Engine) -> tuple[str, str]:
    """Return what the retry read, and the final state after the stalled original wrote."""
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as connection:
        connection.execute(task_instance.insert().values(id="t", state="queued"))
    release = threading.Event()
    original = threading.Thread(target=start, args=(engine, release))
    original.start()
    time.sleep(0.3)  # the original has read `queued` and stalls (lock wait, no CPU)
    seen_by_retry: list[str] = []

    def retry_then_finish() -> None:
        seen_by_retry.append(start(engine))
        finish(engine)

    retry = threading.Thread(target=retry_then_finish)
    retry.start()
    time.sleep(STALL_S)
    release.set()
    original.join(10)
    retry.join(10)
    with engine.connect() as connection:
        final = str(connection.execute(select(task_instance.c.state)).scalar())
    return seen_by_retry[0], final


def test_on_postgresql_the_retry_waits_for_the_original_and_the_final_state_stays(
    postgres_engine: Engine,
) -> None:
    seen_by_retry, final = replay_a_retried_start(postgres_engine)
    assert seen_by_retry == "running", "the row lock made the retry wait for the original"
    assert final == "success"


def test_on_sqlite_the_stalled_original_overwrites_the_final_state_with_running(
    tmp_path: Path,
) -> None:
    """What the stack saw before it moved to PostgreSQL (docs/performance.md)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'airflow.db'}", connect_args={"timeout": 60})
    seen_by_retry, final = replay_a_retried_start(engine)
    assert seen_by_retry == "queued", "FOR UPDATE locks nothing on SQLite"
    assert final == "running", "the final state was lost"
