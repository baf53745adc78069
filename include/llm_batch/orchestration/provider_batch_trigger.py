"""The trigger that waits for a job's provider batches in the triggerer, holding no worker slot.

Every `poll_s` it asks the provider about each batch (in a thread: the HTTP client and pymongo
are blocking, the triggerer's event loop must not be), records the statuses on the job, and
passes an operator's cancel of the job on to the provider. It fires once every batch has
reached a terminal status; the operator's `execute_complete` then reads the output back on a
worker (see `provider_batch_operator.py` for why there and not here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

log = logging.getLogger(__name__)


class ProviderBatchTrigger(BaseTrigger):
    """Fire when every provider batch of a job has ended (completed, failed, expired, cancelled)."""

    def __init__(
        self,
        job_id: str,
        *,
        llm_conn_id: str,
        mongo_conn_id: str,
        poll_s: float,
    ) -> None:
        super().__init__()
        self.job_id = job_id
        self.llm_conn_id = llm_conn_id
        self.mongo_conn_id = mongo_conn_id
        self.poll_s = poll_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "job_id": self.job_id,
                "llm_conn_id": self.llm_conn_id,
                "mongo_conn_id": self.mongo_conn_id,
                "poll_s": self.poll_s,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from asgiref.sync import sync_to_async

        poll = sync_to_async(self.poll_once, thread_sensitive=False)
        while True:
            try:
                state = await poll()
            except Exception as exc:  # the provider or Mongo may be briefly away: ask again
                log.warning("job_id=%s: polling provider batches failed: %s", self.job_id, exc)
                state = {"done": False}
            if state["done"]:
                yield TriggerEvent(state)
                return
            await asyncio.sleep(self.poll_s)

    def poll_once(self) -> dict[str, Any]:
        """Ask the provider once; cancel at the provider if the job was cancelled."""
        from llm_batch import provider_batch
        from llm_batch.orchestration.task_bodies import batch_api, open_store

        with open_store(self.mongo_conn_id) as store, batch_api(self.llm_conn_id) as api:
            job = store.get_job(self.job_id) or {}
            if job.get("cancel"):
                provider_batch.cancel(store, api, self.job_id)
            active = provider_batch.active_batches(store, self.job_id)
            batches = [api.get_batch(doc["provider_batch_id"]) for doc in active]
            status = provider_batch.record_progress(store, self.job_id, batches)
        done = all(batch.get("status") in provider_batch.TERMINAL for batch in batches)
        log.info("job_id=%s: provider batches %s", self.job_id, status)
        return {"done": done, "job_id": self.job_id, "status": status}
