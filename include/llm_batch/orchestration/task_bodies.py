"""The bodies of the DAG's tasks: connect to Mongo and the LLM through Airflow, call the logic.

Kept out of `dags/` so the DAG file stays cheap to parse: Airflow, pymongo and the hook are
imported here, when a task runs, not when the scheduler parses the file.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol

from airflow.providers.mongo.hooks.mongo import MongoHook
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from bson.errors import BSONError

from llm_batch import config, jobs, processing, provider_batch, reconcile
from llm_batch.alerts import failure_rate_alert
from llm_batch.batching import split_into_batches
from llm_batch.cache import ResponseCache
from llm_batch.jobs import estimate_request
from llm_batch.limiter_store import mongo_rate_limiter
from llm_batch.models import run_source
from llm_batch.orchestration.alert_channels import notify
from llm_batch.orchestration.shared_clients import read_llm_settings
from llm_batch.processing import JobAborted, utcnow
from llm_batch.request import InvalidJobRequest, default_of, is_job_id
from llm_batch.service import LLMService, Prices
from llm_batch.store import JobStore

if TYPE_CHECKING:
    from llm_hook.batch_api import BatchApiClient
    from llm_hook.client import LLMClient
    from llm_hook.pacing import RateLimiter

log = logging.getLogger(__name__)


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
    timeout_s = selection_timeout_s()
    if not params.get("job_id") and is_chosen_run_id(run_id):
        # A run id a person chose (the form's Run ID) names the job: findable from either side.
        params = {**params, "job_id": run_id}
    try:
        settings = read_llm_settings()
        service = LLMService.from_settings(settings)
        if params.get("dry_run"):
            with open_store() as store:
                estimate = estimate_request(store, params, service, selection_timeout_s=timeout_s)
            log.info("dry run, nothing sent: %s", estimate.render())
            ti.xcom_push(key=config.ESTIMATE_XCOM_KEY, value=estimate.to_dict())
            return {"dry_run": True, "estimate": estimate.to_dict()}
        with open_store() as store:
            store.ensure_indexes()
            response_cache(store).ensure_indexes()
            created = jobs.create_job(
                store,
                params,
                dag_id=dag_id,
                run_id=run_id,
                source=run_source(run_type, run_id),
                triggered_by=triggered_by,
                service=service,
                selection_timeout_s=timeout_s,
                run_active=lambda dag, run: run_still_active(ti, dag, run),
            )
    except BSONError as exc:
        # The request's values cannot be stored as BSON: trying again cannot help either.
        problems = [f"the request cannot be stored in MongoDB ({exc}): fix its keys and values"]
        ti.xcom_push(key=config.REJECTION_XCOM_KEY, value=problems)
        raise AirflowFailException(f"job request refused, nothing was sent: {problems[0]}") from exc
    except InvalidJobRequest as exc:
        # The listener makes these problems the run's note; the log says it without a traceback.
        ti.xcom_push(key=config.REJECTION_XCOM_KEY, value=exc.problems)
        for problem in exc.problems:
            log.error("job request refused, nothing was sent: %s", problem)
        raise AirflowFailException(f"job request refused, nothing was sent: {exc}") from None
    return {
        "job_id": created.job_id,
        "task_count": created.task_count,
        "resumed": created.resumed,
        # The job's batches run in the mode the connection has now: their first tries need not
        # read the connection again, one execution-API round trip each (`runs_deferred`).
        "execution_mode": settings.execution_mode,
    }


FINISHED_RUN_STATES = frozenset({"success", "failed"})


def run_still_active(ti: Any, dag_id: str, run_id: str) -> bool:
    """Return whether an Airflow run may still work on its job (unless Airflow says it ended).

    Asked only for a job whose document says it is still running: a run that ended (or was
    deleted) without closing its job lets a resume take the job over.
    """
    try:
        if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]) == 0:
            return False
        state = ti.get_dagrun_state(dag_id=dag_id, run_id=run_id)
    except Exception:  # the metadata DB is a second opinion: without it, the job's state rules
        log.exception(
            "could not read the state of run %s of %s; taking it as running", run_id, dag_id
        )
        return True
    return str(getattr(state, "value", state)) not in FINISHED_RUN_STATES


_GENERATED_RUN_ID = re.compile(r"^(manual|scheduled|backfill|asset_triggered|cli)__")


def is_chosen_run_id(run_id: str) -> bool:
    """Return whether a person chose `run_id` (not Airflow, nor the CLI) and it fits a job id."""
    return not _GENERATED_RUN_ID.match(run_id) and is_job_id(run_id)


def selection_timeout_s() -> float:
    """Return the bound on a job's selection time, `LLM_BATCH_SELECTION_TIMEOUT_S` if set."""
    return float(os.environ.get(config.SELECTION_TIMEOUT_ENV, config.SELECTION_TIMEOUT_S))


def plan_batches(job: Mapping[str, Any]) -> list[int]:
    """Return the numbers of the batches that still have unanswered tasks."""
    if job.get("dry_run"):
        return []
    with open_store() as store:
        stored = store.get_job(job["job_id"], with_task_ids=True)
        if stored is None:
            raise AirflowFailException(f"job {job['job_id']} vanished from MongoDB")
        if not provider_batch.wants_sync_batches(stored):
            log.info("job_id=%s: delivered through the provider's batch API", job["job_id"])
            return []
        answered = {doc["task_id"] for doc in store.job_results(job["job_id"], {"task_id": 1})}
    batches = split_into_batches(stored["task_ids"])
    pending = [n for n, ids in enumerate(batches) if any(t not in answered for t in ids)]
    log.info("job_id=%s: %d of %d batches to run", job["job_id"], len(pending), len(batches))
    return pending


def response_cache(store: JobStore) -> ResponseCache:
    """Return the response cache in the store's database, aged by `LLM_BATCH_CACHE_MAX_AGE_S`."""
    max_age_s = float(os.environ.get(config.CACHE_MAX_AGE_ENV, config.CACHE_MAX_AGE_S))
    return ResponseCache(store.db[config.LLM_CACHE], max_age_s=max_age_s)


def runs_deferred(job: Mapping[str, Any], try_number: int) -> bool:
    """Return whether a batch of `job` waits in the triggerer (`llm_default`'s `execution_mode`).

    A first try runs in the mode `create_job` read for the whole job; a retry (or a cleared
    instance) reads the connection again, so switching a deployment whose triggerer is down to
    `sync` and clearing the failed batches sends them from workers.
    """
    from llm_hook.settings import DEFERRED

    mode = job.get("execution_mode")
    if try_number > 1 or mode is None:  # None: created before the mode was recorded
        mode = read_llm_settings().execution_mode
    return mode == DEFERRED


def fail_if_job_stopped(job_id: str, batch_no: int) -> None:
    """Fail the task without retries if the job was stopped (as `process_batch` would)."""
    with open_store() as store:
        abort = store.load_batch(job_id, batch_no).abort
    if abort:
        raise AirflowFailException(f"job {job_id} was stopped: {abort.get('message')}")


class BatchClients(Protocol):
    """Where a batch gets its store and its LLM client: opened for it, or lent by its process."""

    def store(self) -> AbstractContextManager[JobStore]:
        """Yield the store on the `mongo_default` connection."""
        ...

    def llm_client(self, rate_limiter: RateLimiter) -> AbstractContextManager[LLMClient]:
        """Yield a client of the `llm_default` connection, paced by `rate_limiter`."""
        ...


class TaskClients:
    """Open the connections for one task and close them after it (a worker: one task a process).

    The connections are read afresh by every task instance: an endpoint added to one serves
    the next batch. (The triggerer shares them instead: `shared_clients.SharedClients`.)
    """

    def store(self) -> AbstractContextManager[JobStore]:
        return open_store()

    @contextmanager
    def llm_client(self, rate_limiter: RateLimiter) -> Iterator[LLMClient]:
        from llm_hook import LLMHook

        with LLMHook(llm_conn_id=config.LLM_CONN_ID).get_conn(rate_limiter=rate_limiter) as client:
            yield client


def process_batch(
    job_id: str, batch_no: int, *, try_number: int, clients: BatchClients | None = None
) -> dict[str, Any]:
    """Process one batch through the `llm_default` connection, paced with all other workers.

    :param clients: where the store and the LLM client come from; default: opened for this
        batch and closed after it (`TaskClients`).
    """
    clients = clients if clients is not None else TaskClients()
    try:
        # The limiter shares budgets and endpoint health through MongoDB.
        with clients.store() as store, clients.llm_client(mongo_rate_limiter(store.db)) as client:
            cache = response_cache(store)
            report = processing.process_batch(
                store,
                client,
                job_id,
                batch_no,
                try_number=try_number,
                cache=cache if cache.max_age_s > 0 else None,
            )
    except JobAborted as exc:
        raise AirflowFailException(str(exc)) from exc
    return report.to_dict()


def reconcile_job(
    job: Mapping[str, Any] | None, *, stopped: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Close the job whatever happened upstream; skip when no job was created.

    `stopped` (`{"state", "at"}`) says an operator marked the run failed or success in
    Airflow: the job is cancelled first, so the tasks it never sent end `cancelled`.
    """
    if not job:
        raise AirflowSkipException("no job was created (the run's note says why)")
    if job.get("dry_run"):
        raise AirflowSkipException("dry run: no job to reconcile")
    job_id = job["job_id"]
    with open_store() as store:
        if stopped:
            by = f"the Airflow UI or API (run marked {stopped.get('state')})"
            if store.request_cancel(job_id, utcnow(), by):
                log.warning("job_id=%s cancelled: %s", job_id, by)
            cancel_provider_batches(store, job_id)
        summary = reconcile.reconcile_job(store, job_id)
        stored = store.get_job(job_id) or {}
    log.info("job summary\n%s", summary.render())
    params = stored.get("params") or {}
    threshold = params.get("alert_failure_rate", default_of("alert_failure_rate"))
    alert = failure_rate_alert(summary.to_dict(), threshold)
    if alert is not None:
        notify(alert)
    result = summary.to_dict()
    result["budget_usd"] = params.get("max_cost_usd")
    if stopped:
        result["stopped_in_airflow"] = stopped.get("state")
    if stored.get("provider_batch"):
        result["provider_batch"] = stored["provider_batch"]
    return result


def cancel_provider_batches(store: JobStore, job_id: str) -> None:
    """Cancel at the provider the job's batches still pending (the run was stopped in Airflow)."""
    if not provider_batch.active_batches(store, job_id):
        return
    with batch_api() as api:
        provider_batch.cancel(store, api, job_id)


@contextmanager
def batch_api(conn_id: str = config.LLM_CONN_ID) -> Iterator[BatchApiClient]:
    """Yield a client of the provider's batch API on the LLM connection."""
    from llm_hook.batch_api import BatchApiClient

    with BatchApiClient(read_llm_settings(conn_id)) as api:
        yield api


def connection(api: BatchApiClient) -> provider_batch.Connection:
    """Return what provider-batch delivery needs from the connection behind `api`."""
    from llm_hook.adapters import make_adapter

    settings = api.settings
    return provider_batch.Connection(
        adapter=make_adapter(settings.adapter),
        model=settings.model,
        endpoint=api.endpoint.url,
        prices=Prices(*settings.batch_prices),
        max_requests_per_file=settings.batch_max_requests_per_file,
        max_file_bytes=settings.batch_max_file_bytes,
        max_tokens_ceiling=settings.max_tokens_ceiling,
    )


def report(summary: Mapping[str, Any] | None, job: Mapping[str, Any] | None) -> None:
    """Fail the run, with the reasons, unless every task succeeded; the job keeps its results."""
    if summary is None and job is not None and job.get("dry_run"):
        log.info("dry run finished: %s", job["estimate"])
        return
    if summary is None:
        why = (
            "create_job refused the request (the run's note says why)"
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
