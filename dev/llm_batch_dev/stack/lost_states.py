"""Task instances whose final state was lost: finished by their supervisor, yet left `running`.

Such an instance holds its job until Airflow's heartbeat timeout fails and retries it. The
evidence comes from two places, both kept by the stack:

- the metadata DB's audit log (table `log`): `heartbeat timeout` (the scheduler failed a running
  instance that no longer heartbeats), `state mismatch` (the executor reported the instance
  finished while the DB still said running or queued), and a `running` event recorded after a
  terminal event of the same try, or after an event it predates (a late start request, made
  before the state it overwrote: its row's time is older than the rows written before it);
- the scheduler's log: `TaskInstance Finished: ... state=running ... executor_state=success`
  (the DB said running when the executor reported the end), and `Detected a task instance
  without a heartbeat`.

`mark` notes where both end now; `find` reads what came after a mark (everything without one).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TERMINAL_EVENTS = frozenset({"success", "failed", "skipped", "up_for_retry", "upstream_failed"})
ALARM_EVENTS = frozenset({"heartbeat timeout", "state mismatch"})
UNFINISHED_STATES = frozenset({"running", "queued"})
"""DB states that contradict an executor's report that the instance's process has ended
(`deferred`, `scheduled` and `up_for_reschedule` are normal after a deferral or reschedule)."""

_FINISHED_LINE = re.compile(
    r"TaskInstance Finished: dag_id=(?P<dag_id>[^,]+), task_id=(?P<task_id>[^,]+), "
    r"run_id=(?P<run_id>[^,]+), map_index=(?P<map_index>-?\d+), .*? state=(?P<state>\w+), "
    r"executor=.*?, executor_state=(?P<executor_state>\w+), try_number=(?P<try_number>\d+)"
)
_NO_HEARTBEAT_LINE = re.compile(
    r"Detected a task instance without a heartbeat: .*?'DAG Id': '(?P<dag_id>[^']+)', "
    r"'Task Id': '(?P<task_id>[^']+)', 'Run Id': '(?P<run_id>[^']+)'"
    r"(?:, 'Map Index': (?P<map_index>-?\d+))?"
)


@dataclass(frozen=True)
class LostFinalState:
    """One instance that stayed `running` after its supervisor exited, and how we know."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    try_number: int | None
    evidence: str

    def __str__(self) -> str:
        where = f"{self.dag_id}/{self.run_id}/{self.task_id}[{self.map_index}]"
        return f"{where} try {self.try_number}: {self.evidence}"


@dataclass(frozen=True)
class Mark:
    """Where the audit log and the scheduler's log ended at some moment."""

    log_id: int
    scheduler_log_offset: int


def mark(db_url: str, scheduler_log: Path) -> Mark:
    """Where both sources end now: `find(since=...)` reads only what comes after."""
    with _connection(db_url) as connection:
        last = connection.exec_driver_sql("SELECT COALESCE(MAX(id), 0) FROM log").scalar()
    try:
        offset = scheduler_log.stat().st_size
    except FileNotFoundError:
        offset = 0
    return Mark(int(last or 0), offset)


def find(
    db_url: str,
    scheduler_log: Path,
    since: Mark | None = None,
    run_ids: Collection[str] | None = None,
) -> list[LostFinalState]:
    """Every lost final state recorded after `since` (of `run_ids` only, if given)."""
    found = [*_from_audit_log(db_url, since.log_id if since else 0)]
    found += _from_scheduler_log(scheduler_log, since.scheduler_log_offset if since else 0)
    if run_ids is not None:
        found = [lost for lost in found if lost.run_id in run_ids]
    unique: dict[tuple[str, str, str, int], LostFinalState] = {}
    for lost in found:
        key = (lost.dag_id, lost.run_id, lost.task_id, lost.map_index)
        if key in unique:
            kept = unique[key]
            if lost.evidence not in kept.evidence:
                lost = LostFinalState(
                    *key, kept.try_number or lost.try_number, f"{kept.evidence}; {lost.evidence}"
                )
            else:
                lost = kept
        unique[key] = lost
    return list(unique.values())


# Internals


class _connection:
    """A short-lived connection, no pool: the checks run rarely and must not hold a slot."""

    def __init__(self, db_url: str) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        self._engine = create_engine(db_url, poolclass=NullPool)

    def __enter__(self) -> Any:
        self._connection = self._engine.connect()
        return self._connection

    def __exit__(self, *exc_info: object) -> None:
        self._connection.close()
        self._engine.dispose()


def _from_audit_log(db_url: str, after_id: int) -> Iterator[LostFinalState]:
    events = tuple(sorted(TERMINAL_EVENTS | ALARM_EVENTS | {"running", "deferred"}))
    placeholders = ", ".join(f"'{event}'" for event in events)  # constants, not input
    query = (
        "SELECT id, dttm, event, dag_id, run_id, task_id, map_index, try_number FROM log "
        f"WHERE id > {int(after_id)} AND task_id IS NOT NULL AND event IN ({placeholders}) "
        "ORDER BY id"
    )
    with _connection(db_url) as connection:
        rows = connection.exec_driver_sql(query).all()
    ended: dict[tuple[Any, ...], str] = {}
    latest: dict[tuple[Any, ...], tuple[Any, str]] = {}
    for _id, dttm, event, dag_id, run_id, task_id, map_index, try_number in rows:
        key = (dag_id, run_id, task_id, map_index if map_index is not None else -1, try_number)
        if event in ALARM_EVENTS:
            yield LostFinalState(*key, f"audit log: {event!r}")
            continue
        if event == "running" and key in ended:
            yield LostFinalState(
                *key, f"audit log: 'running' recorded after {ended[key]!r} of the same try"
            )
        elif (
            event == "running"
            and key in latest
            and latest[key][1] != "running"  # a late duplicate of the start itself loses nothing
            and dttm is not None
            and dttm < latest[key][0]
        ):
            # Same DB, same column: both datetimes (PostgreSQL) or both ISO strings (SQLite).
            yield LostFinalState(
                *key,
                f"audit log: a start made at {dttm} written after {latest[key][1]!r} of "
                f"{latest[key][0]} (a late start request overwrote a later state)",
            )
        if event in TERMINAL_EVENTS:
            ended.setdefault(key, event)
        if dttm is not None and (key not in latest or dttm > latest[key][0]):
            latest[key] = (dttm, event)


def _from_scheduler_log(path: Path, offset: int) -> list[LostFinalState]:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return []
    found = []
    for line in text.splitlines():
        if "TaskInstance Finished:" in line:
            match = _FINISHED_LINE.search(line)
            if match and match["state"] in UNFINISHED_STATES:
                found.append(
                    LostFinalState(
                        match["dag_id"],
                        match["run_id"],
                        match["task_id"],
                        int(match["map_index"]),
                        int(match["try_number"]),
                        f"scheduler: executor reported {match['executor_state']} while the DB "
                        f"said {match['state']}",
                    )
                )
        elif "without a heartbeat" in line:
            match = _NO_HEARTBEAT_LINE.search(line)
            if match:
                found.append(
                    LostFinalState(
                        match["dag_id"],
                        match["run_id"],
                        match["task_id"],
                        int(match["map_index"] or -1),
                        None,
                        "scheduler: no heartbeat, failed by the heartbeat timeout",
                    )
                )
    return found
