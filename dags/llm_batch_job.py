"""
### LLM batch job

Send a selection of task documents from MongoDB to the LLM service, ten per request, and store
one result per task. Operators trigger it from this Airflow form, the `llm-batch` CLI or the
REST API.

**Select tasks** by listing their ids *or* by a filter (a MongoDB query over `tasks`, plain
query operators only; `{}` selects all, up to *limit*). Give a **job id** of an existing job to
resume it: tasks that already have a result are never sent again.

Runs: `create_job` (validate, snapshot the task ids) -> `plan_batches` -> `process_batch`
(one mapped instance per batch of 10, in pool `llm_api`) -> `reconcile_job` (always runs; every
task ends in exactly one terminal state) -> `report`.

Results land in the `results`, `jobs` and `llm_calls` collections and on each task as
`last_result`; the run's note shows the job's summary. Bad input fails `create_job` with a
message that says what to fix; nothing is sent.

**Cancel** by marking the run *failed*: batches not yet started never send, running ones get a
few seconds to keep their answers, then `reconcile_job` ends the rest `cancelled`. A run still
going `LLM_BATCH_DEADLINE_S` (default 4 h) after it was queued raises a `deadline_missed` alert.
"""

from __future__ import annotations

from pathlib import Path

from llm_batch.orchestration.dag_factory import (
    MANUAL_PRIORITY,
    build_job_dag,
    deadline_from_env,
)
from llm_batch.orchestration.params import FORM_LIMIT, job_params

dag = build_job_dag(
    Path(__file__).stem,
    doc_md=__doc__,
    schedule=None,
    params=job_params(limit=FORM_LIMIT),
    priority_weight=MANUAL_PRIORITY,
    tags=["llm", "batch"],
    deadline_s=deadline_from_env(),
)
