"""Lost final states: read from an audit log table and a scheduler log as Airflow writes them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from llm_batch_dev.stack import lost_states

FINISHED = (
    "scheduler | [2026-12-02T10:00:00.000+0000] {{scheduler_job_runner.py:1447}} INFO - "
    "TaskInstance Finished: dag_id=llm_batch_job, task_id=process_batch, run_id=bench-zero-1, "
    "map_index={map_index}, ti_id=0199, run_start_date=2026-12-02 10:00:00+00:00, "
    "run_end_date={end}, run_duration=1.5, state={state}, "
    "executor=LocalExecutor(parallelism=40), executor_state=success, try_number=1, max_tries=4, "
    "pool=llm_api, queue=default, priority_weight=1, operator=_PythonDecoratedOperator, "
    "queued_dttm=2026-12-02 10:00:00+00:00, scheduled_dttm=2026-12-02 10:00:00+00:00,"
    "queued_by_job_id=1, pid=4242"
)
NO_HEARTBEAT = (
    "scheduler | ERROR - Detected a task instance without a heartbeat: TaskCallbackRequest("
    "msg=\"{'DAG Id': 'llm_batch_job', 'Task Id': 'process_batch', 'Run Id': 'bench-zero-1', "
    "'Map Index': 15, 'Hostname': 'box'}\", ...)"
)


@pytest.fixture
def audit_db(tmp_path: Path) -> tuple[str, sqlite3.Connection]:
    """An audit log table with Airflow's columns, in a real (SQLite) database."""
    path = tmp_path / "airflow.db"
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute(
        "CREATE TABLE log (id INTEGER PRIMARY KEY, dttm TEXT, dag_id TEXT, task_id TEXT, "
        "map_index INTEGER, event TEXT NOT NULL, run_id TEXT, try_number INTEGER, extra TEXT)"
    )
    return f"sqlite:///{path}", connection


def add(
    connection: sqlite3.Connection,
    event: str,
    map_index: int,
    try_number: int = 1,
    dttm: str | None = None,
) -> None:
    connection.execute(
        "INSERT INTO log (dttm, dag_id, task_id, map_index, event, run_id, try_number) "
        "VALUES (?, 'd', 'process_batch', ?, ?, 'r1', ?)",
        (dttm, map_index, event, try_number),
    )


def test_a_start_recorded_after_the_same_trys_success_is_a_lost_final_state(
    audit_db: tuple[str, sqlite3.Connection], tmp_path: Path
) -> None:
    url, db = audit_db
    for event in ("running", "success"):
        add(db, event, map_index=0)
    add(db, "running", map_index=1)
    add(db, "success", map_index=1)
    add(db, "running", map_index=1)  # the late, stale start request
    add(db, "running", map_index=2)
    add(db, "up_for_retry", map_index=2)
    add(db, "running", map_index=2, try_number=2)  # a retry is a new try: fine

    lost = lost_states.find(url, tmp_path / "no-log")

    assert [(item.map_index, item.try_number) for item in lost] == [(1, 1)]
    assert "'running' recorded after 'success'" in lost[0].evidence


def test_a_start_written_after_a_deferral_it_predates_is_a_lost_final_state(
    audit_db: tuple[str, sqlite3.Connection], tmp_path: Path
) -> None:
    """The rows of map index 390 in the SQLite run of 2026-12-02 19:20 (docs/performance.md)."""
    url, db = audit_db
    add(db, "running", 390, dttm="2026-12-02 19:21:03.815122")  # the retried start
    add(db, "deferred", 390, dttm="2026-12-02 19:21:05.281371")
    add(db, "running", 390, dttm="2026-12-02 19:20:58.365231")  # the original, written last
    # A normal resume after a deferral: later in time as in order.
    add(db, "running", 7, dttm="2026-12-02 19:21:00.000000")
    add(db, "deferred", 7, dttm="2026-12-02 19:21:01.000000")
    add(db, "running", 7, dttm="2026-12-02 19:21:09.000000")
    add(db, "success", 7, dttm="2026-12-02 19:21:10.000000")
    # A late duplicate of a start, written while the instance still runs: nothing lost.
    add(db, "running", 8, dttm="2026-12-02 19:21:05.000000")
    add(db, "running", 8, dttm="2026-12-02 19:21:00.000000")
    add(db, "success", 8, dttm="2026-12-02 19:21:09.000000")

    lost = lost_states.find(url, tmp_path / "no-log")

    assert [item.map_index for item in lost] == [390]
    assert "written after 'deferred'" in lost[0].evidence


def test_heartbeat_timeouts_and_state_mismatches_are_lost_final_states(
    audit_db: tuple[str, sqlite3.Connection], tmp_path: Path
) -> None:
    url, db = audit_db
    add(db, "heartbeat timeout", map_index=3)
    add(db, "state mismatch", map_index=4)
    assert {item.map_index for item in lost_states.find(url, tmp_path / "no-log")} == {3, 4}


def test_a_mark_hides_what_came_before_it(
    audit_db: tuple[str, sqlite3.Connection], tmp_path: Path
) -> None:
    url, db = audit_db
    log = tmp_path / "airflow.log"
    log.write_text(NO_HEARTBEAT + "\n")
    add(db, "heartbeat timeout", map_index=3)
    mark = lost_states.mark(url, log)
    assert lost_states.find(url, log, since=mark) == []
    add(db, "state mismatch", map_index=5)
    assert [item.map_index for item in lost_states.find(url, log, since=mark)] == [5]


def test_the_scheduler_log_shows_an_instance_the_db_kept_running_after_it_finished(
    audit_db: tuple[str, sqlite3.Connection], tmp_path: Path
) -> None:
    url, _db = audit_db
    log = tmp_path / "airflow.log"
    log.write_text(
        "\n".join(
            [
                FINISHED.format(map_index=1, state="success", end="2026-12-02 10:00:01+00:00"),
                FINISHED.format(map_index=15, state="running", end="None"),
                FINISHED.format(map_index=2, state="deferred", end="None"),  # normal after defer
                NO_HEARTBEAT,
            ]
        )
        + "\n"
    )
    lost = lost_states.find(url, log)
    assert len(lost) == 1, "one instance, two pieces of evidence"
    assert (lost[0].run_id, lost[0].map_index) == ("bench-zero-1", 15)
    assert "executor reported success while the DB said running" in lost[0].evidence
    assert "heartbeat" in lost[0].evidence
    assert lost_states.find(url, log, run_ids={"another-run"}) == []
