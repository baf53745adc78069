"""The stack's LocalExecutor: `parallelism` caps what its workers are handed; workers free on exit.

The executor is driven through its own `heartbeat` (what the scheduler calls) with its worker
processes left unstarted: the queues are real, the workers are this test reading them.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
from collections.abc import Iterator
from multiprocessing import SimpleQueue
from typing import Any

import psutil
import pytest
from airflow.executors import local_executor as airflow_local_executor
from airflow.executors.workloads import ExecuteTask
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.sdk.execution_time import supervisor
from airflow.utils.state import TaskInstanceState

from llm_batch.orchestration import local_executor
from llm_batch.orchestration.local_executor import LocalExecutor


class _Ti:
    """What the executor reads of a task instance DTO."""

    priority_weight = 1

    def __init__(self, key: TaskInstanceKey) -> None:
        self.key = key


def workload(map_index: int) -> ExecuteTask:
    key = TaskInstanceKey("llm_batch_job", "process_batch", "run-1", 1, map_index)
    return ExecuteTask.model_construct(ti=_Ti(key))


def without_workers(executor: Any) -> Any:
    """Give `executor` the queues `start` would, without forking its worker processes."""
    executor.activity_queue = SimpleQueue()
    executor.result_queue = SimpleQueue()
    executor.workers = {}
    executor._unread_messages = multiprocessing.Value("I")
    executor._check_workers = lambda: None
    executor._report_wait_s = 0.0  # tests that wait for a report set their own bound
    return executor


def handed_to_workers(executor: Any) -> list[TaskInstanceKey]:
    keys = []
    while not executor.activity_queue.empty():
        keys.append(executor.activity_queue.get().key)
    return keys


def queue(executor: Any, *items: ExecuteTask) -> None:
    for item in items:
        executor.queued_tasks[item.key] = item


@pytest.fixture
def executor() -> Iterator[LocalExecutor]:
    yield without_workers(LocalExecutor(parallelism=2))


def test_parallelism_caps_the_tasks_handed_to_the_workers_until_one_reports(
    executor: LocalExecutor,
) -> None:
    first, second, third = workload(0), workload(1), workload(2)
    queue(executor, first, second, third)

    executor.heartbeat()
    assert handed_to_workers(executor) == [first.key, second.key]
    assert executor.running == {first.key, second.key}
    assert list(executor.queued_tasks) == [third.key]  # waits for a worker to report

    executor.heartbeat()
    assert handed_to_workers(executor) == []

    executor.result_queue.put((first.key, TaskInstanceState.SUCCESS, None))
    # The scheduler's next loop counts the slots before it queues, then heartbeats: the report
    # is taken in when counted, so this very loop hands `third` over.
    assert executor.slots_occupied == 2  # `second` in hand, `third` queued
    executor.heartbeat()
    assert handed_to_workers(executor) == [third.key]
    assert executor.event_buffer[first.key][0] == TaskInstanceState.SUCCESS


@pytest.mark.timeout(30)  # the wait ends on the report, not on its 60 s bound
def test_a_full_executor_waits_for_a_workers_report_instead_of_leaving_it_idle(
    executor: LocalExecutor,
) -> None:
    first, second = workload(0), workload(1)
    queue(executor, first, second)
    executor.heartbeat()
    assert executor.slots_available == 0
    executor._report_wait_s = 60.0
    reporter = threading.Timer(
        0.2, executor.result_queue.put, [(first.key, TaskInstanceState.SUCCESS, None)]
    )
    reporter.start()

    executor.sync()

    reporter.join()
    assert executor.running == {second.key}
    assert first.key in executor.event_buffer


def test_airflows_own_local_executor_hands_out_more_than_parallelism() -> None:
    """The defect worked around (apache/airflow#71914): if this fails, Airflow fixed it."""
    stock = without_workers(airflow_local_executor.LocalExecutor(parallelism=2))
    queue(stock, workload(0), workload(1))
    stock.heartbeat()
    queue(stock, workload(2), workload(3))
    stock.heartbeat()
    assert len(handed_to_workers(stock)) == 4


def test_a_workload_no_worker_reports_is_released_once_its_instance_left_running(
    executor: LocalExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost, running = workload(0), workload(1)
    queue(executor, lost, running)
    executor.heartbeat()
    looked_up: list[list[TaskInstanceKey]] = []

    def unreported(keys: list[TaskInstanceKey], session: Any) -> list[TaskInstanceKey]:
        looked_up.append(sorted(keys))
        return [lost.key]  # the metadata DB: `lost` failed by heartbeat timeout, `running` runs

    monkeypatch.setattr(local_executor, "unreported", unreported)
    executor.sync()
    assert looked_up == []  # not before the reconcile interval, nor for fresh dispatches

    for key in executor._dispatched_at:
        executor._dispatched_at[key] -= local_executor.STALE_AFTER_S
    executor._last_reconcile -= local_executor.RECONCILE_INTERVAL_S
    executor.sync()

    assert looked_up == [sorted([lost.key, running.key])]
    assert executor.running == {running.key}
    assert executor.slots_available == 1


class _SpySelector:
    """Records the timeouts the supervisor selects with; nothing is registered."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def select(self, timeout: float) -> list[Any]:
        self.timeouts.append(timeout)
        return []


class _ExitedSockets:
    """The state `_service_subprocess` reads: a task whose sockets are all closed."""

    _check_subprocess_exit = supervisor.WatchedSubprocess._check_subprocess_exit

    def __init__(self, process: psutil.Popen) -> None:
        self._process = supervisor.PsutilTracker(process)
        self._exit_code: int | None = None
        self._open_sockets: dict[Any, str] = {}
        self._process_exit_monotonic: float | None = None
        self.selector = _SpySelector()


def test_the_patched_supervisor_waits_on_the_process_not_in_an_empty_select(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        supervisor.WatchedSubprocess,
        "_service_subprocess",
        supervisor.WatchedSubprocess._service_subprocess,
    )
    assert local_executor.wait_for_exit_without_sockets()
    assert local_executor.wait_for_exit_without_sockets()  # once is enough: not wrapped twice

    task = _ExitedSockets(psutil.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"]))
    exit_code = supervisor.WatchedSubprocess._service_subprocess(task, max_wait_time=30.0)

    assert exit_code == 0
    # Unpatched, this selects for the whole 30 s with nothing registered.
    assert task.selector.timeouts and max(task.selector.timeouts) <= 0.01
