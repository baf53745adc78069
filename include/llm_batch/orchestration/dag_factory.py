"""Build the job DAGs: the operator-triggered one and the nightly one share every task.

Imported by the files in dags/ at parse time, so only `airflow.sdk` and constants are
imported here; task bodies import the pipeline when they run.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Param, dag, task
from airflow.sdk.definitions.callback import AsyncCallback
from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

from llm_batch import config
from llm_batch.orchestration.batch_operator import ProcessBatchOperator
from llm_batch.orchestration.provider_batch_operator import DeliverProviderBatchOperator

MANUAL_PRIORITY = 100
NIGHTLY_PRIORITY = 1
"""Free pool slots go to the highest `priority_weight`: operators' jobs overtake the nightly."""
DEADLINE_CALLBACK = "llm_batch.orchestration.deadline.job_past_deadline"


def build_job_dag(
    dag_id: str,
    *,
    doc_md: str,
    schedule: str | None,
    params: dict[str, Param],
    priority_weight: int,
    tags: list[str],
    deadline_s: float = 0,
    max_active_runs: int = 8,
) -> DAG:
    """Return a job DAG: create_job, deliver_provider_batch, plan_batches, process_batch[],
    reconcile_job, report.

    `reconcile_job` and `report` are teardowns of `create_job`: marking the run failed in the
    UI kills running batches and skips queued ones but leaves both to run, so the job is still
    closed (its unsent tasks end `cancelled`) and `report` fails the run. With `deadline_s`,
    a run still going that long after it was queued raises a `deadline_missed` alert.
    `max_active_runs=1` keeps a scheduled run from starting while the last one still waits:
    its selection would take the tasks still at the provider and pay for them again.
    """

    @dag(
        dag_id=dag_id,
        schedule=schedule,
        catchup=False,
        doc_md=doc_md,
        tags=tags,
        params=params,
        max_active_runs=max_active_runs,
        # The pool is the real limit on LLM requests in flight; this only stays out of its way.
        max_active_tasks=256,
        default_args={"retries": 2, "retry_delay": timedelta(seconds=10)},
        deadline=job_deadline(deadline_s),
    )
    def llm_batch_job() -> None:
        @task(task_id=config.CREATE_JOB_TASK_ID, retries=3)
        def create_job(params: dict[str, Any], dag_run: Any, ti: Any) -> dict[str, Any]:
            from llm_batch.orchestration.task_bodies import create_job

            return create_job(
                params,
                dag_id=dag_run.dag_id,
                run_id=dag_run.run_id,
                # DagRunType is a str Enum whose str() is "DagRunType.MANUAL": store its value.
                run_type=getattr(dag_run.run_type, "value", str(dag_run.run_type)),
                triggered_by=getattr(dag_run, "triggering_user_name", None),
                ti=ti,
            )

        @task(task_id=config.PLAN_BATCHES_TASK_ID)
        def plan_batches(job: dict[str, Any]) -> list[int]:
            from llm_batch.orchestration.task_bodies import plan_batches

            return plan_batches(job)

        @task(task_id=config.RECONCILE_JOB_TASK_ID, retries=3)
        def reconcile_job(ti: Any) -> dict[str, Any]:
            from llm_batch.orchestration.task_bodies import reconcile_job

            return reconcile_job(
                ti.xcom_pull(task_ids=config.CREATE_JOB_TASK_ID),
                stopped=ti.xcom_pull(
                    task_ids=config.CREATE_JOB_TASK_ID, key=config.STOPPED_XCOM_KEY
                ),
            )

        # The teardown that decides the run's state (on_failure_fail_dagrun): it fails the run,
        # with the reasons, unless every task succeeded.
        @task(task_id=config.REPORT_TASK_ID, retries=0)
        def report(ti: Any) -> None:
            from llm_batch.orchestration.task_bodies import report

            report(
                ti.xcom_pull(task_ids=config.RECONCILE_JOB_TASK_ID),
                ti.xcom_pull(task_ids=config.CREATE_JOB_TASK_ID),
            )

        job = create_job()
        # A provider-batch job waits here, deferred (no worker slot); a sync job passes through.
        delivered = DeliverProviderBatchOperator(
            task_id=config.DELIVER_PROVIDER_BATCH_TASK_ID, job=job, retries=3
        )
        planned = plan_batches(job)
        delivered >> planned
        # Class-based: in `deferred` mode (the connection's `execution_mode`) it defers at
        # once and the request waits in the triggerer, still holding its pool slot.
        batches = ProcessBatchOperator.partial(
            task_id=config.PROCESS_BATCH_TASK_ID,
            pool=config.POOL_NAME,
            priority_weight=priority_weight,
            weight_rule="absolute",
            retries=4,
            retry_delay=timedelta(seconds=5),
            retry_exponential_backoff=2.0,
            max_retry_delay=timedelta(minutes=2),
            map_index_template="batch {{ task.batch_no }}",
            job=job,
        ).expand(batch_no=planned)
        summary = reconcile_job().as_teardown(setups=job)
        batches >> summary >> report().as_teardown(setups=job, on_failure_fail_dagrun=True)

    return llm_batch_job()


def job_deadline(deadline_s: float) -> DeadlineAlert | None:
    """Return the alert for a run not finished `deadline_s` after it was queued (0: none)."""
    if deadline_s <= 0:
        return None
    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=timedelta(seconds=deadline_s),
        # A path, not the function: the triggerer imports it; the DAG file stays light.
        callback=AsyncCallback(DEADLINE_CALLBACK),
    )


def deadline_from_env(default_s: float = config.DEFAULT_DEADLINE_S) -> float:
    """Return `LLM_BATCH_DEADLINE_S` (seconds after queueing; 0 turns the alert off)."""
    raw = os.environ.get(config.DEADLINE_ENV, "").strip()
    if not raw:
        return default_s
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"{config.DEADLINE_ENV}={raw!r} is not a number of seconds; set e.g. 14400 (4 h), "
            "or 0 to turn the deadline alert off"
        ) from None
    if value < 0:
        raise ValueError(f"{config.DEADLINE_ENV}={raw!r} is negative; use 0 to turn it off")
    return value
