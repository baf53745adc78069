"""
### LLM batch job

Send a selection of task documents from MongoDB to the LLM service, ten per request, and store
one result per task.

**Select tasks** by listing their ids *or* by a filter (a MongoDB query over `tasks`, plain
query operators only; `{}` selects all, up to *limit*). Give a **job id** of an existing job to
resume it: tasks that already have a result are never sent again.

Runs: `create_job` (validate, snapshot the task ids) -> `plan_batches` -> `process_batch`
(one mapped instance per batch of 10, in pool `llm_api`) -> `reconcile_job` (always runs; every
task ends in exactly one terminal state) -> `report`.

Results land in the `results`, `jobs` and `llm_calls` collections and on each task as
`last_result`. Bad input fails `create_job` with a message that says what to fix; nothing is sent.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import Param, TriggerRule, dag, get_current_context, task

from llm_batch import config

JOB_PARAMS = {
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
}


@dag(
    dag_id=Path(__file__).stem,
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    tags=["llm", "batch"],
    params=JOB_PARAMS,
    max_active_runs=8,
    # The pool is the real limit on LLM requests in flight; this only has to stay out of its way.
    max_active_tasks=256,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=10)},
)
def llm_batch_job() -> None:
    @task(retries=3)
    def create_job(params: dict[str, Any], dag_run: Any, ti: Any) -> dict[str, Any]:
        from llm_batch.tasks import create_job

        return create_job(
            params,
            dag_id=dag_run.dag_id,
            run_id=dag_run.run_id,
            run_type=str(dag_run.run_type),
            ti=ti,
        )

    @task
    def plan_batches(job: dict[str, Any]) -> list[int]:
        from llm_batch.tasks import plan_batches

        return plan_batches(job)

    @task(
        pool=config.POOL_NAME,
        retries=4,
        retry_delay=timedelta(seconds=5),
        retry_exponential_backoff=2.0,
        max_retry_delay=timedelta(minutes=2),
        map_index_template="{{ batch_label }}",
    )
    def process_batch(job: dict[str, Any], batch_no: int, ti: Any) -> None:
        from llm_batch.tasks import run_batch

        get_current_context()["batch_label"] = f"batch {batch_no}"  # type: ignore[typeddict-unknown-key]
        # Nothing returned: a per-batch XCom costs a metadata-DB write x 500 and nobody reads it.
        run_batch(job["job_id"], batch_no, try_number=ti.try_number)

    @task(trigger_rule=TriggerRule.ALL_DONE, retries=3)
    def reconcile_job(ti: Any) -> dict[str, Any]:
        from llm_batch.tasks import reconcile

        return reconcile(ti.xcom_pull(task_ids="create_job"))

    # all_done: a leaf decides the run's state, so this task must run (and fail) even when
    # create_job refused the request and everything after it was skipped.
    @task(trigger_rule=TriggerRule.ALL_DONE, retries=0)
    def report(ti: Any) -> None:
        from llm_batch.tasks import report

        report(ti.xcom_pull(task_ids="reconcile_job"), ti.xcom_pull(task_ids="create_job"))

    job = create_job()
    batches = process_batch.partial(job=job).expand(batch_no=plan_batches(job))
    summary = reconcile_job()
    batches >> summary >> report()


llm_batch_job()
