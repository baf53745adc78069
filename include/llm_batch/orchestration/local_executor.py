"""Airflow's LocalExecutor with two Airflow 3.3 defects worked around; the stack's executor.

Set `[core] executor = llm_batch.orchestration.local_executor.LocalExecutor` (the embedded stack
does). Both defects cost pool slots, the resource a deployment buys from its LLM provider: a
mapped batch instance holds its `llm_api` slot from the moment the scheduler queues it.

1. **`parallelism` caps nothing.** Airflow's LocalExecutor never records a dispatched workload
   in `running` (apache/airflow#71914), so every scheduler loop hands its workers another
   `parallelism` instances. With 8 worker slots and a pool of 128, 48 instances sat queued
   behind the workers, each holding a pool slot while sending nothing: a third of the pool.
   Here a dispatched task holds its slot until its worker reports it, so instances are queued
   only when a worker can start them. A worker killed before it could report would hold its
   slot forever: `sync` releases, every `RECONCILE_INTERVAL_S`, the slots of workloads whose
   task instance has left `queued`/`running` in the metadata DB (failed by the heartbeat
   timeout, deferred, finished).
2. **A worker sleeps up to 5 s after its task exited.** The supervisor waits for the task's
   sockets to close in `select`, then for the exit; when the sockets close first (a third of
   the time, measured), it waits in `select` with nothing left to select on, for a whole
   `[workers] min_heartbeat_interval`. A deferring batch instance is done in ~0.4 s and then
   held its worker for 5 more. `start` patches the supervisor, before the workers are forked,
   to wait on the process itself once no socket is left (`wait_for_exit_without_sockets`).

Both are gone when Airflow fixes them; the patch checks that what it wraps still exists.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.executors import local_executor
from airflow.executors.workloads import ExecuteTask
from airflow.models.taskinstance import TaskInstance
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.sdk.execution_time import supervisor
from airflow.utils.session import create_session
from airflow.utils.state import TaskInstanceState
from sqlalchemy import select, tuple_

from llm_batch.orchestration.preload import preload_airflow_modules

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 30.0
"""How often `sync` looks for slots held by workloads no worker will report."""
STALE_AFTER_S = 60.0
"""A workload is looked up only once dispatched this long ago: a deferring instance reports in
about a second, and one still running (a synchronous batch) keeps its slot whatever its age."""

REPORT_POLL_S = 0.01
"""How often a full executor looks for a worker's report while it waits for one."""

_PATCHED = "_llm_batch_waits_for_exit_without_sockets"


def wait_for_exit_without_sockets() -> bool:
    """Make the task supervisor wait on the task process once its sockets are all closed.

    Return whether the supervisor is patched (False: this Airflow's supervisor has changed
    shape, and it is left as it is).
    """
    watched = supervisor.WatchedSubprocess
    original = getattr(watched, "_service_subprocess", None)
    if original is None or not hasattr(watched, "_check_subprocess_exit"):
        log.warning("the task supervisor has no _service_subprocess: not patched")
        return False
    if getattr(original, _PATCHED, False):
        return True

    @functools.wraps(original)
    def service_subprocess(
        self: Any, max_wait_time: float, raise_on_timeout: bool = False, expect_signal: Any = None
    ) -> int | None:
        if self._exit_code is None and not self._open_sockets:
            # Nothing to select on: `select` would sleep the whole timeout even if the process
            # exits at once. Wait for the exit instead, then let the original collect it.
            with suppress(self._process.TimeoutExpired):
                self._process.wait(timeout=max(0.01, max_wait_time))
            max_wait_time = 0.0
        return original(
            self, max_wait_time, raise_on_timeout=raise_on_timeout, expect_signal=expect_signal
        )

    setattr(service_subprocess, _PATCHED, True)
    watched._service_subprocess = service_subprocess  # type: ignore[method-assign]
    return True


class LocalExecutor(local_executor.LocalExecutor):
    """Airflow's LocalExecutor: `parallelism` caps dispatched tasks, workers free on exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._dispatched_at: dict[TaskInstanceKey, float] = {}
        self._report_wait_s = conf.getfloat("scheduler", "scheduler_idle_sleep_time")
        self._last_reconcile = time.monotonic()

    def start(self) -> None:
        """Patch the supervisor and preload the tasks' imports, then fork the workers."""
        wait_for_exit_without_sockets()
        preload_airflow_modules()
        super().start()

    def _process_workloads(self, workload_list: Sequence[Any]) -> None:
        super()._process_workloads(workload_list)
        now = time.monotonic()
        for workload in workload_list:
            if isinstance(workload, ExecuteTask):
                self.running.add(workload.key)
                self._dispatched_at[workload.key] = now

    @property
    def slots_occupied(self) -> int:
        """Count the workloads in hand, having first taken in the workers' reports.

        The scheduler reads this just before it queues task instances, and reads the workers'
        reports only later in its loop (`heartbeat` -> `sync`): a worker done since the last
        loop would sit idle through one more. Taking the reports in here lets the same loop
        queue its next instance, which that loop's `heartbeat` hands over.
        """
        if getattr(self, "result_queue", None) is not None:  # started
            self._read_results()
        return super().slots_occupied

    def change_state(
        self, key: Any, state: Any, info: Any = None, remove_running: bool = True
    ) -> None:
        super().change_state(key, state, info, remove_running=remove_running)
        if remove_running:
            self._dispatched_at.pop(key, None)

    def sync(self) -> None:
        if len(self.running) >= self.parallelism:
            self._wait_for_a_report(self._report_wait_s)
        super().sync()
        now = time.monotonic()
        if now - self._last_reconcile >= RECONCILE_INTERVAL_S:
            self._last_reconcile = now
            stale = [k for k, at in self._dispatched_at.items() if now - at >= STALE_AFTER_S]
            if stale:
                with create_session() as session:
                    self.release(unreported(stale, session))

    def _wait_for_a_report(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, until a worker reports.

        Called with every worker busy: the scheduler can start nothing before a report, and a
        loop that takes in no report ends in its idle sleep (`scheduler_idle_sleep_time`),
        during which a freed worker would wait for it. Waiting here instead ends that loop as
        soon as a worker is free, so the next one hands it an instance.
        """
        deadline = time.monotonic() + timeout_s
        while self.result_queue.empty() and time.monotonic() < deadline:
            time.sleep(REPORT_POLL_S)

    def release(self, keys: Iterable[TaskInstanceKey]) -> None:
        """Free the slots of `keys`: workloads no worker will report."""
        for key in keys:
            log.warning(
                "releasing the worker slot of %s: its task instance left queued/running "
                "without its worker reporting (the worker was killed?)",
                key,
            )
            self.running.discard(key)
            self._dispatched_at.pop(key, None)


def unreported(keys: Sequence[TaskInstanceKey], session: Session) -> list[TaskInstanceKey]:
    """Return those of `keys` whose task instance is no longer queued or running (that try)."""
    ti = TaskInstance
    rows = session.execute(
        select(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, ti.try_number).where(
            tuple_(ti.dag_id, ti.task_id, ti.run_id, ti.map_index).in_(
                [(k.dag_id, k.task_id, k.run_id, k.map_index) for k in keys]
            ),
            ti.state.in_([TaskInstanceState.QUEUED, TaskInstanceState.RUNNING]),
        )
    ).all()
    live = {TaskInstanceKey(d, t, r, n, m) for d, t, r, m, n in rows}
    return [key for key in keys if key not in live]
