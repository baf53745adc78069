"""Build the job DAGs: the operator-triggered one and the nightly one share every task.

Imported by the files in dags/ at parse time, so only `airflow.sdk` and constants are
imported here; task bodies import the pipeline when they run.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.sdk import DAG, Param, dag, get_current_context, task
from airflow.sdk.definitions.callback import AsyncCallback
from airflow.sdk.definitions.deadline import DeadlineAlert, DeadlineReference

from llm_batch import config

MANUAL_PRIORITY = 100
NIGHTLY_PRIORITY = 1
"""Free pool slots go to the highest `priority_weight`: operators' jobs overtake the nightly."""
DEADLINE_CALLBACK = "llm_batch.deadline.job_past_deadline"


def job_params(**defaults: Any) -> dict[str, Param]:
    """Return the trigger form, with `defaults` overriding the fields' default values."""
    params = {
        "task_ids": Param(
            None,
            type=["null", "array"],
            items={"type": "string"},
            title="Task ids",
            description="The _id of each task document to process, one per line. "
            "Leave empty to select by filter instead.",
        ),
        "filter": Param(
            None,
            type=["null", "object"],
            title="Filter",
            description='A MongoDB query over the tasks collection, e.g. {"payload.lang": "en"}. '
            "Plain query operators only ($where, $function, $expr are refused). "
            "{} selects all tasks, up to the limit.",
        ),
        "retry_of": Param(
            None,
            type=["null", "string"],
            title="Re-drive job",
            description="Select the failed tasks of this earlier job (instead of task ids or a "
            "filter) and send them again in a new job.",
        ),
        "include_needs_review": Param(
            False,
            type="boolean",
            title="Re-drive needs-review tasks too",
            description="With a re-drive job: also select its tasks whose answers need review.",
        ),
        "limit": Param(
            config.MAX_TASKS_PER_JOB,
            type="integer",
            minimum=1,
            maximum=config.MAX_TASKS_PER_JOB,
            title="Limit",
            description=f"At most this many tasks (1 to {config.MAX_TASKS_PER_JOB}).",
        ),
        "instructions": Param(
            None,
            type=["null", "string"],
            format="multiline",
            title="Instructions",
            description="Text the LLM applies to every task.",
        ),
        "model": Param(
            None,
            type=["null", "string"],
            title="Model",
            description="Model name; empty uses the llm_default connection's model.",
        ),
        "job_id": Param(
            None,
            type=["null", "string"],
            title="Job id",
            description="Resume this existing job (only its unanswered tasks are sent), or give a "
            "new job this id. Empty: a new id is generated.",
        ),
        "llm_params": Param(
            {},
            type="object",
            title="LLM parameters",
            description='Passed to the service with every request, e.g. {"temperature": 0}.',
        ),
        "use_cache": Param(
            True,
            type="boolean",
            title="Use cached answers",
            description="Answer a task from a stored answer to the same input, instructions, model "
            "and parameters (spends nothing). Turn off to ask the LLM again.",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Only estimate tokens and cost of the selection (see create_job's log "
            "and XCom 'estimate'); nothing is sent and no job is created.",
        ),
        "review_below": Param(
            None,
            type=["null", "number"],
            minimum=0,
            maximum=1,
            title="Review below confidence",
            description="Answers whose confidence (0 to 1) is below this end as needs_review "
            "instead of succeeded. Empty: no review routing.",
        ),
        "max_cost_usd": Param(
            None,
            type=["null", "number"],
            minimum=0,
            title="Budget (USD)",
            description="Hard budget: once the job has spent this much, nothing more is sent and "
            "the remaining tasks end cancelled (budget_exhausted).",
        ),
        "alert_failure_rate": Param(
            0.3,
            type="number",
            minimum=0,
            maximum=1,
            title="Alert above failure rate",
            description="Alert (log, and the webhook in LLM_BATCH_ALERT_WEBHOOK) when more than "
            "this share of the job's tasks failed.",
        ),
    }
    for name, value in defaults.items():
        params[name] = Param(value, **params[name].schema, description=params[name].description)
    return params


def build_job_dag(
    dag_id: str,
    *,
    doc_md: str,
    schedule: str | None,
    params: dict[str, Param],
    priority_weight: int,
    tags: list[str],
    deadline_s: float = 0,
) -> DAG:
    """Return a job DAG: create_job, plan_batches, process_batch[], reconcile_job, report.

    `reconcile_job` and `report` are teardowns of `create_job`: marking the run failed in the
    UI kills running batches and skips queued ones but leaves both to run, so the job is still
    closed (its unsent tasks end `cancelled`) and `report` fails the run. With `deadline_s`,
    a run still going that long after it was queued raises a `deadline_missed` alert.
    """

    @dag(
        dag_id=dag_id,
        schedule=schedule,
        catchup=False,
        doc_md=doc_md,
        tags=tags,
        params=params,
        max_active_runs=8,
        # The pool is the real limit on LLM requests in flight; this only stays out of its way.
        max_active_tasks=256,
        default_args={"retries": 2, "retry_delay": timedelta(seconds=10)},
        deadline=job_deadline(deadline_s),
    )
    def llm_batch_job() -> None:
        @task(retries=3)
        def create_job(params: dict[str, Any], dag_run: Any, ti: Any) -> dict[str, Any]:
            from llm_batch.tasks import create_job

            return create_job(
                params,
                dag_id=dag_run.dag_id,
                run_id=dag_run.run_id,
                # DagRunType is a str Enum whose str() is "DagRunType.MANUAL": store its value.
                run_type=getattr(dag_run.run_type, "value", str(dag_run.run_type)),
                triggered_by=getattr(dag_run, "triggering_user_name", None),
                ti=ti,
            )

        @task
        def plan_batches(job: dict[str, Any]) -> list[int]:
            from llm_batch.tasks import plan_batches

            return plan_batches(job)

        @task(
            pool=config.POOL_NAME,
            priority_weight=priority_weight,
            weight_rule="absolute",
            retries=4,
            retry_delay=timedelta(seconds=5),
            retry_exponential_backoff=2.0,
            max_retry_delay=timedelta(minutes=2),
            map_index_template="{{ batch_label }}",
        )
        def process_batch(job: dict[str, Any], batch_no: int, ti: Any) -> None:
            from llm_batch.tasks import run_batch

            get_current_context()["batch_label"] = f"batch {batch_no}"  # type: ignore[typeddict-unknown-key]
            # Nothing returned: a per-batch XCom costs a metadata-DB write and nobody reads it.
            run_batch(job["job_id"], batch_no, try_number=ti.try_number)

        @task(retries=3)
        def reconcile_job(ti: Any) -> dict[str, Any]:
            from llm_batch.tasks import reconcile

            return reconcile(
                ti.xcom_pull(task_ids="create_job"),
                stopped=ti.xcom_pull(task_ids="create_job", key=config.STOPPED_XCOM_KEY),
            )

        # The teardown that decides the run's state (on_failure_fail_dagrun): it fails the run,
        # with the reasons, unless every task succeeded.
        @task(retries=0)
        def report(ti: Any) -> None:
            from llm_batch.tasks import report

            report(ti.xcom_pull(task_ids="reconcile_job"), ti.xcom_pull(task_ids="create_job"))

        job = create_job()
        batches = process_batch.partial(job=job).expand(batch_no=plan_batches(job))
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
