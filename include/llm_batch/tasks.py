"""The bodies of the DAG's tasks: connect to Mongo and the LLM through Airflow, call the logic.

Kept out of `dags/` so the DAG file stays cheap to parse: Airflow, pymongo and the hook are
imported here, when a task runs, not when the scheduler parses the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from airflow.providers.mongo.hooks.mongo import MongoHook
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from llm_batch import config
from llm_batch.alerts import DEFAULT_FAILURE_RATE, failure_rate_alert, notify
from llm_batch.batching import split_into_batches
from llm_batch.cache import ResponseCache
from llm_batch.estimate import Prices
from llm_batch.jobs import estimate_request, start_job
from llm_batch.processing import BatchReport, JobAborted, process_batch, utcnow
from llm_batch.ratelimit import mongo_rate_limiter
from llm_batch.reconcile import reconcile_job
from llm_batch.selection import InvalidJobRequest
from llm_batch.store import JobStore

log = logging.getLogger(__name__)

ESTIMATE_XCOM_KEY = "estimate"
"""XCom key under which a dry run's `create_job` leaves its cost estimate (for the CLI)."""
REJECTION_XCOM_KEY = "rejection"
"""XCom key under which `create_job` leaves the reason a request was refused (for the CLI)."""


@contextmanager
def open_store(conn_id: str = config.MONGO_CONN_ID) -> Iterator[JobStore]:
    """Yield a store on the connection's database (its `schema`, else the default)."""
    hook = MongoHook(mongo_conn_id=conn_id)
    client = hook.get_conn()
    try:
        yield JobStore(client[hook.connection.schema or config.DEFAULT_DATABASE])
    finally:
        client.close()


def create_job(
    params: Mapping[str, Any],
    *,
    dag_id: str,
    run_id: str,
    run_type: str,
    ti: Any,
    triggered_by: str | None = None,
) -> dict[str, Any]:
    """Validate the request and create (or resume) its job; refuse bad input without retrying.

    A dry run resolves and estimates the request, then stops: no job, no LLM request.
    """
    try:
        if params.get("dry_run"):
            with open_store() as store:
                estimate = estimate_request(store, params, connection_prices())
            log.info("dry run, nothing sent: %s", estimate.render())
            ti.xcom_push(key=ESTIMATE_XCOM_KEY, value=estimate.to_dict())
            return {"dry_run": True, "estimate": estimate.to_dict()}
        with open_store() as store:
            store.ensure_indexes()
            response_cache(store).ensure_indexes()
            start = start_job(
                store,
                params,
                dag_id=dag_id,
                run_id=run_id,
                source=run_type,
                triggered_by=triggered_by,
            )
    except InvalidJobRequest as exc:
        message = f"job request refused, nothing was sent: {exc}"
        ti.xcom_push(key=REJECTION_XCOM_KEY, value=exc.problems)
        raise AirflowFailException(message) from exc
    return {"job_id": start.job_id, "task_count": start.task_count, "resumed": start.resumed}


def connection_prices() -> Prices:
    """Return the `llm_default` connection's prices per 1k tokens."""
    from llm_hook import LLMHook

    client = LLMHook(llm_conn_id=config.LLM_CONN_ID).get_conn()
    try:
        return Prices(client.settings.price_input_per_1k, client.settings.price_output_per_1k)
    finally:
        client.close()


def plan_batches(job: Mapping[str, Any]) -> list[int]:
    """Return the numbers of the batches that still have unanswered tasks."""
    if job.get("dry_run"):
        return []
    with open_store() as store:
        stored = store.get_job(job["job_id"], with_task_ids=True)
        if stored is None:
            raise AirflowFailException(f"job {job['job_id']} vanished from MongoDB")
        answered = {doc["task_id"] for doc in store.job_results(job["job_id"], {"task_id": 1})}
    batches = split_into_batches(stored["task_ids"])
    pending = [n for n, ids in enumerate(batches) if any(t not in answered for t in ids)]
    log.info("job_id=%s: %d of %d batches to run", job["job_id"], len(pending), len(batches))
    return pending


def response_cache(store: JobStore) -> ResponseCache:
    """Return the response cache in the store's database, aged by `LLM_BATCH_CACHE_MAX_AGE_S`."""
    max_age_s = float(os.environ.get(config.CACHE_MAX_AGE_ENV, config.CACHE_MAX_AGE_S))
    return ResponseCache(store.db[config.LLM_CACHE], max_age_s=max_age_s)


def run_batch(job_id: str, batch_no: int, *, try_number: int) -> dict[str, Any]:
    """Process one batch through the `llm_default` connection, paced with all other workers."""
    from llm_hook import LLMHook

    try:
        with open_store() as store:
            # The connection is read afresh by every task instance: an endpoint added to it
            # serves the next batch. The limiter shares budgets and health through MongoDB.
            client = LLMHook(llm_conn_id=config.LLM_CONN_ID).get_conn(
                rate_limiter=mongo_rate_limiter(store.db)
            )
            cache = response_cache(store)
            try:
                report: BatchReport = process_batch(
                    store,
                    client,
                    job_id,
                    batch_no,
                    try_number=try_number,
                    cache=cache if cache.max_age_s > 0 else None,
                )
            finally:
                client.close()
    except JobAborted as exc:
        raise AirflowFailException(str(exc)) from exc
    return report.to_dict()


def reconcile(
    job: Mapping[str, Any] | None, *, stopped: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Close the job whatever happened upstream; skip when no job was created.

    `stopped` (`{"state", "at"}`) says an operator marked the run failed or success in
    Airflow: the job is cancelled first, so the tasks it never sent end `cancelled`.
    """
    if not job:
        raise AirflowSkipException("no job was created (see create_job's log for why)")
    if job.get("dry_run"):
        raise AirflowSkipException("dry run: no job to reconcile")
    job_id = job["job_id"]
    with open_store() as store:
        if stopped:
            by = f"the Airflow UI or API (run marked {stopped.get('state')})"
            if store.request_cancel(job_id, utcnow(), by):
                log.warning("job_id=%s cancelled: %s", job_id, by)
        summary = reconcile_job(store, job_id)
        stored = store.get_job(job_id) or {}
    log.info("job summary\n%s", summary.render())
    threshold = (stored.get("params") or {}).get("alert_failure_rate", DEFAULT_FAILURE_RATE)
    alert = failure_rate_alert(summary.to_dict(), threshold)
    if alert is not None:
        notify(alert)
    result = summary.to_dict()
    if stopped:
        result["stopped_in_airflow"] = stopped.get("state")
    return result


def report(summary: Mapping[str, Any] | None, job: Mapping[str, Any] | None) -> None:
    """Fail the run, with the reasons, unless every task succeeded; the job keeps its results."""
    if summary is None and job is not None and job.get("dry_run"):
        log.info("dry run finished: %s", job["estimate"])
        return
    if summary is None:
        why = (
            "create_job refused the request (its log says what to fix)"
            if job is None
            else f"reconcile_job did not finish for job {job['job_id']}"
        )
        raise AirflowFailException(f"no job summary: {why}")
    if summary["state"] == "succeeded":
        log.info("job_id=%s succeeded: %s", summary["job_id"], summary["counts"])
        return
    if summary.get("stopped_in_airflow") == "success":
        log.warning(
            "job_id=%s ended %s after its run was marked success: %s",
            summary["job_id"],
            summary["state"],
            summary["counts"],
        )
        return
    if summary["state"] == "cancelled":
        raise AirflowFailException(
            f"job {summary['job_id']} was cancelled: {summary['counts']}; nothing more was sent. "
            f"To send the cancelled tasks, resume it with job_id={summary['job_id']}."
        )
    errors = "; ".join(
        f"{e['type']} x{e['count']} (e.g. {e['example']})" for e in summary.get("top_errors", [])
    )
    raise AirflowFailException(
        f"job {summary['job_id']} ended {summary['state']}: {summary['counts']}. "
        f"Top errors: {errors or 'none recorded'}. Fix the cause, then resume the job with "
        f"job_id={summary['job_id']} (only unanswered tasks are sent again)."
    )
