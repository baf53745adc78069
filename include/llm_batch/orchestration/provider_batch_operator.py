"""The `deliver_provider_batch` task: submit or re-attach, defer to the triggerer, read back.

Between `create_job` and `plan_batches`. A job with `delivery=sync` passes straight through.
With `delivery=provider_batch` the task submits the job's unanswered tasks as provider batches
(or re-attaches to those already submitted for the job), then defers: while the provider
works (minutes to 24 h) the task holds no worker slot and no `llm_api` pool slot; the
triggerer polls. When every batch has ended, `execute_complete` runs on a worker and reads
the output and error files back into `results` and `llm_calls`.

Why the read-back runs on a worker and not in the trigger: it writes up to thousands of
documents with blocking pymongo and parses every answer, which would stall the triggerer's
event loop (shared by every deferred task of the installation) or need it to host the whole
domain; on a worker it keeps the task's retries and log, and holds a slot only for seconds.
An expired or provider-cancelled batch's answers are kept; the rest is sent once more, in a new
provider batch (deferring again) or, with `resend_via=sync`, by the mapped sync batches that
`plan_batches` then plans.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from llm_batch import config

if TYPE_CHECKING:
    from llm_batch.store import JobStore
    from llm_hook.batch_api import BatchApiClient

log = logging.getLogger(__name__)

WAIT_LIMIT = timedelta(hours=25)
"""The provider answers within its 24 h window; a wait longer than this has gone wrong."""


class DeliverProviderBatchOperator(BaseOperator):
    """Send a provider-batch job's tasks through the provider's batch API and wait deferred."""

    template_fields = ("job",)

    def __init__(self, *, job: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job = job

    def execute(self, context: Any) -> dict[str, Any] | None:
        from llm_batch.orchestration.task_bodies import batch_api, open_store

        job = self.job
        if not job or job.get("dry_run"):
            return None
        job_id = job["job_id"]
        with open_store() as store:
            stored = store.get_job(job_id) or {}
            if (stored.get("params") or {}).get("delivery") != "provider_batch":
                return None
            with batch_api() as api:
                if not api.settings.supports_provider_batch:
                    why = (
                        f"connection {config.LLM_CONN_ID} uses the {api.settings.adapter!r} "
                        "adapter, which has no provider batch API: the job runs sync"
                    )
                    log.warning("job_id=%s: %s", job_id, why)
                    store.update_job(
                        job_id, {"provider_batch": {"status": "none", "then": "sync", "why": why}}
                    )
                    return {"delivery": "sync", "why": why}
                return self._submit_and_wait(store, api, job_id)

    def _submit_and_wait(
        self, store: JobStore, api: BatchApiClient, job_id: str
    ) -> dict[str, Any] | None:
        from airflow.sdk.exceptions import AirflowFailException

        from llm_batch import provider_batch
        from llm_batch.orchestration.task_bodies import connection, response_cache
        from llm_batch.processing import JobAborted

        cache = response_cache(store)
        try:
            docs = provider_batch.attach_or_submit(
                store, api, connection(api), job_id, cache=cache if cache.max_age_s > 0 else None
            )
        except (JobAborted, ValueError) as exc:
            raise AirflowFailException(str(exc)) from exc
        if not docs:
            provider_batch.show_on_job(store, job_id)
            return {"delivery": "provider_batch", "submitted": 0}
        provider_batch.show_on_job(store, job_id)
        self.defer(
            trigger=trigger_for(job_id, api.settings.batch_poll_s),
            method_name="execute_complete",
            timeout=WAIT_LIMIT,
        )
        return None  # not reached: defer raises

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        from llm_batch import provider_batch, provider_output
        from llm_batch.orchestration.task_bodies import (
            batch_api,
            connection,
            open_store,
            response_cache,
        )

        job_id = self.job["job_id"]
        with open_store() as store, batch_api() as api:
            cache = response_cache(store)
            conn = connection(api)
            delivered = provider_output.read_back(
                store, api, conn, job_id, cache=cache if cache.max_age_s > 0 else None
            )
            step = provider_output.next_step(store, job_id, delivered)
            log.info("job_id=%s: read back %s; next: %s", job_id, delivered.to_dict(), step)
            if step == "sync":
                view = (store.get_job(job_id) or {}).get("provider_batch") or {}
                store.update_job(job_id, {"provider_batch": {**view, "then": "sync"}})
            elif step == "resend":
                docs = provider_batch.attach_or_submit(store, api, conn, job_id, cache=None)
                if docs:
                    self.defer(
                        trigger=trigger_for(job_id, api.settings.batch_poll_s),
                        method_name="execute_complete",
                        timeout=WAIT_LIMIT,
                    )
        return {"delivery": "provider_batch", "read_back": delivered.to_dict(), "next": step}


def trigger_for(job_id: str, poll_s: float) -> Any:
    from llm_batch.orchestration.provider_batch_trigger import ProviderBatchTrigger

    return ProviderBatchTrigger(
        job_id, llm_conn_id=config.LLM_CONN_ID, mongo_conn_id=config.MONGO_CONN_ID, poll_s=poll_s
    )
