"""The deferred batch: the trigger's events, its threads, and the operator's choice of mode."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from airflow.triggers.base import TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from llm_batch import config
from llm_batch.orchestration import batch_trigger
from llm_batch.orchestration.batch_trigger import ProcessBatchTrigger, trigger_threads
from llm_hook import ClientSettings
from llm_hook.exceptions import LLMConfigError


def events_of(trigger: ProcessBatchTrigger) -> list[TriggerEvent]:
    async def collect() -> list[TriggerEvent]:
        return [event async for event in trigger.run()]

    return asyncio.run(collect())


def test_the_trigger_serializes_to_what_rebuilds_it() -> None:
    classpath, kwargs = ProcessBatchTrigger("job-1", 7, 2).serialize()
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(__import__(module, fromlist=[name]), name)(**kwargs)
    assert isinstance(rebuilt, ProcessBatchTrigger)
    assert (rebuilt.job_id, rebuilt.batch_no, rebuilt.try_number) == ("job-1", 7, 2)


def test_a_processed_batch_ends_the_task_with_success_from_a_batch_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []
    loop_thread = threading.get_ident()

    def body(job_id: str, batch_no: int, try_number: int) -> dict[str, Any]:
        calls.append((job_id, batch_no, try_number, threading.current_thread().name))
        assert threading.get_ident() != loop_thread, "the batch blocked the event loop"
        return {"sent": 10}

    monkeypatch.setattr(batch_trigger, "run_batch", body)
    events = events_of(ProcessBatchTrigger("job-1", 3, 2))

    assert len(events) == 1 and isinstance(events[0], TaskSuccessEvent)
    assert [c[:3] for c in calls] == [("job-1", 3, 2)]
    assert calls[0][3].startswith("llm-batch")


@pytest.mark.parametrize(
    "error", [RuntimeError("3 of 10 tasks got no usable answer"), LookupError("no job")]
)
def test_any_failure_of_the_batch_ends_the_task_failed_instead_of_raising(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def body(job_id: str, batch_no: int, try_number: int) -> dict[str, Any]:
        raise error

    monkeypatch.setattr(batch_trigger, "run_batch", body)
    events = events_of(ProcessBatchTrigger("job-1", 3, 1))
    assert len(events) == 1 and isinstance(events[0], TaskFailedEvent)


def test_a_trigger_cancelled_before_a_thread_is_free_never_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run marked failed cancels its triggers: the queued batches must not start."""
    release = threading.Event()
    started: list[int] = []

    def body(job_id: str, batch_no: int, try_number: int) -> dict[str, Any]:
        started.append(batch_no)
        release.wait(5)
        return {}

    threads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-batch")
    monkeypatch.setattr(batch_trigger, "BATCH_THREADS", threads)
    monkeypatch.setattr(batch_trigger, "run_batch", body)

    async def scenario() -> None:
        first = asyncio.ensure_future(anext(ProcessBatchTrigger("j", 0, 1).run()))
        queued = asyncio.ensure_future(anext(ProcessBatchTrigger("j", 1, 1).run()))
        await asyncio.sleep(0.2)
        queued.cancel()
        await asyncio.sleep(0.1)
        release.set()
        assert isinstance(await first, TaskSuccessEvent)
        with pytest.raises(asyncio.CancelledError):
            await queued

    asyncio.run(scenario())
    threads.shutdown(wait=True)
    assert started == [0]


def test_the_thread_count_comes_from_the_environment_and_bad_values_say_what_to_set() -> None:
    assert trigger_threads({}) == config.DEFAULT_TRIGGER_THREADS
    assert trigger_threads({config.TRIGGER_THREADS_ENV: "64"}) == 64
    for bad in ("0", "many", "-3"):
        with pytest.raises(ValueError, match=config.TRIGGER_THREADS_ENV):
            trigger_threads({config.TRIGGER_THREADS_ENV: bad})


def test_the_execution_mode_defaults_to_deferred_and_typos_are_refused() -> None:
    base = {"base_url": "http://llm.test", "api_key": "k", "model": "m"}
    assert ClientSettings(**base).execution_mode == "deferred"
    assert ClientSettings(**base, execution_mode="sync").execution_mode == "sync"
    with pytest.raises(LLMConfigError, match="execution_mode"):
        ClientSettings(**base, execution_mode="async")


def settings_with_mode(mode: str) -> ClientSettings:
    return ClientSettings(base_url="http://llm.test", api_key="k", model="m", execution_mode=mode)


def test_a_first_try_runs_in_the_mode_create_job_read_without_reading_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llm_batch.orchestration import task_bodies

    def no_connection_read() -> ClientSettings:
        raise AssertionError("a first try read the connection")

    monkeypatch.setattr(task_bodies, "read_llm_settings", no_connection_read)
    assert task_bodies.runs_deferred({"job_id": "j", "execution_mode": "deferred"}, 1)
    assert not task_bodies.runs_deferred({"job_id": "j", "execution_mode": "sync"}, 1)


def test_a_retry_or_a_job_without_a_recorded_mode_reads_the_connection_as_it_is_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llm_batch.orchestration import task_bodies

    monkeypatch.setattr(task_bodies, "read_llm_settings", lambda: settings_with_mode("sync"))
    # The job was created deferred; the connection was switched to sync before the retry.
    assert not task_bodies.runs_deferred({"job_id": "j", "execution_mode": "deferred"}, 2)
    assert not task_bodies.runs_deferred({"job_id": "j"}, 1)
    monkeypatch.setattr(task_bodies, "read_llm_settings", lambda: settings_with_mode("deferred"))
    assert task_bodies.runs_deferred({"job_id": "j", "execution_mode": "sync"}, 3)
