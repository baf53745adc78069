"""The `process_batch` task: one batch request, waited on in the triggerer or in the worker.

Imported by the DAG factory at parse time: only `airflow.sdk` here; the task body and the
trigger are imported when an instance runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk import BaseOperator, Context


class ProcessBatchOperator(BaseOperator):
    """Send one batch of a job to the LLM and store its results, deferred or in this worker.

    The `llm_default` connection's `execution_mode` decides: as `create_job` read it for a
    first try, as it is now for a retry (`task_bodies.runs_deferred`). `deferred`: the
    instance is admitted by the pool, then defers at once to `ProcessBatchTrigger`, which runs
    the same task body in the triggerer and ends the task itself (the pool counts the deferred
    instance, so it still caps requests in flight). `sync`: the body runs here, holding this
    worker slot for the request.

    :param job: `create_job`'s result (`{"job_id", ...}`), usually its XComArg.
    :param batch_no: the batch to send, usually mapped with `.expand(batch_no=...)`.
    """

    template_fields = ("job",)
    ui_color = "#e8f0fe"

    def __init__(self, *, job: Mapping[str, Any] | Any, batch_no: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.batch_no = batch_no

    def execute(self, context: Context) -> None:
        """Defer to the triggerer, or process the batch here (`execution_mode` sync)."""
        from llm_batch.orchestration import task_bodies

        job_id = self.job["job_id"]
        try_number = context["ti"].try_number
        if task_bodies.runs_deferred(self.job, try_number):
            from llm_batch.orchestration.batch_trigger import ProcessBatchTrigger

            if try_number > 1:
                # A stopped job fails its batches without retries, as in sync mode; the
                # trigger's failure cannot say so (the triggerer retries every failed task).
                task_bodies.fail_if_job_stopped(job_id, self.batch_no)
            self.defer(
                trigger=ProcessBatchTrigger(job_id, self.batch_no, try_number),
                method_name=self.execute_complete.__name__,
            )
        # Nothing returned: a per-batch XCom costs a metadata-DB write and nobody reads it.
        task_bodies.process_batch(job_id, self.batch_no, try_number=try_number)

    def execute_complete(self, context: Context, event: Any = None) -> None:
        """Refuse to resume: the trigger ends the task itself, so a resume means it broke."""
        from airflow.sdk.exceptions import AirflowException

        raise AirflowException(
            f"process_batch for batch {self.batch_no} was resumed on a worker with {event!r}: "
            "its trigger failed outside the batch (see the triggerer's log); the retry sends "
            "only the tasks still unanswered"
        )
