"""The deferred `process_batch`: the batch runs in the triggerer, on a bounded thread pool.

One implementation serves both modes: the trigger runs the same synchronous task body as a
worker (`task_bodies.process_batch`: the store, the shared rate limiter, the cache,
`processing.process_batch`) on a thread of a pool owned by this module, so nothing blocking
runs on the triggerer's event loop. The pool is sized by `LLM_BATCH_TRIGGER_THREADS` (set it
to the `llm_api` pool's slots: a deferred batch holds one of each); the loop's default
executor, shared with Airflow's own blocking calls, is never used.

Only where the body gets its clients differs. A worker opens them per task (a process per task
anyway); here every batch of the process is lent the same ones (`BATCH_CLIENTS`, see
`shared_clients`): one MongoDB client per connection URI, one HTTP session per set of LLM
endpoints (each batch still builds its own `LLMClient` around it: its own rounds, keys and
view of endpoint health), and what `mongo_default` and `llm_default` say, read at most every
`CONNECTION_TTL_S` (30 s) and again right after a failed batch, so a rotated key or a changed
extra is picked up without restarting the triggerer. A client replaced by a changed connection
is closed only when the last batch using it is done. Per batch this saves two connection
look-ups (round trips through the triggerer's supervisor to the api-server), a MongoDB
handshake with its monitor threads, and new HTTP connections (docs/performance.md has the
measured CPU).

A triggerer can run a trigger twice (after a failover): the body keeps the request's
idempotency key and writes only idempotent upserts, as a retried worker does; the shared
clients change none of that (pymongo's client is thread-safe; every write is an upsert).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskFailedEvent, TaskSuccessEvent, TriggerEvent

from llm_batch import config
from llm_batch.orchestration.shared_clients import SharedClients


def trigger_threads(environ: Mapping[str, str] = os.environ) -> int:
    """Return how many batches one triggerer runs at once (`LLM_BATCH_TRIGGER_THREADS`)."""
    raw = environ.get(config.TRIGGER_THREADS_ENV, "").strip()
    if not raw:
        return config.DEFAULT_TRIGGER_THREADS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(
            f"{config.TRIGGER_THREADS_ENV}={raw!r} is not a whole number >= 1; set it to the "
            f"{config.POOL_NAME} pool's slots, e.g. 128"
        )
    return value


BATCH_THREADS = ThreadPoolExecutor(max_workers=trigger_threads(), thread_name_prefix="llm-batch")
"""The triggerer's threads for batches: a resource of the process, no state (threads start on
first use, so importing this module in a worker costs nothing)."""

BATCH_CLIENTS = SharedClients(pool_maxsize=trigger_threads())
"""The clients every batch of this process shares (built on first use, like the threads)."""


def run_batch(job_id: str, batch_no: int, try_number: int) -> dict[str, Any]:
    """Run the worker's task body on the shared clients (on a batch thread: it blocks)."""
    from llm_batch.orchestration.task_bodies import process_batch

    return process_batch(job_id, batch_no, try_number=try_number, clients=BATCH_CLIENTS)


class ProcessBatchTrigger(BaseTrigger):
    """Process one batch in the triggerer and end its task: success, or failure to retry.

    :param job_id: the job the batch belongs to.
    :param batch_no: the batch to send.
    :param try_number: the deferred task instance's try (recorded on `llm_calls`).
    """

    def __init__(self, job_id: str, batch_no: int, try_number: int) -> None:
        super().__init__()
        self.job_id = job_id
        self.batch_no = batch_no
        self.try_number = try_number

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {"job_id": self.job_id, "batch_no": self.batch_no, "try_number": self.try_number},
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Run the batch on a batch thread; yield the event that ends the task."""
        # The copied context carries the trigger's log routing to the thread: the batch's log
        # lines land in the task try's log, as on a worker.
        call = functools.partial(
            contextvars.copy_context().run,
            run_batch,
            self.job_id,
            self.batch_no,
            self.try_number,
        )
        # If the task is stopped (run marked failed) before a thread picks the batch up, the
        # cancelled await cancels the queued call: nothing is sent.
        try:
            report = await asyncio.get_running_loop().run_in_executor(BATCH_THREADS, call)
        except Exception:
            # Raised out of run(), it would send the task to a worker only to fail there.
            self.log.exception(
                "job_id=%s batch_no=%d try=%d failed", self.job_id, self.batch_no, self.try_number
            )
            yield TaskFailedEvent()
            return
        self.log.info("job_id=%s batch_no=%d done: %s", self.job_id, self.batch_no, report)
        yield TaskSuccessEvent()
