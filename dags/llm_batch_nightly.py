"""
### Nightly LLM batch run

Drains the backlog: each run creates a job from the tasks that have no succeeded result yet
(`last_result.status` is not `succeeded`), at most 5000 per job, and logs how many are left
for the next night. Same tasks as `llm_batch_job`, at a lower priority: in the shared pool
`llm_api`, operators' jobs are served first.

Schedule: `LLM_BATCH_NIGHTLY_SCHEDULE` (a cron expression, default `0 2 * * *`, 02:00 UTC).
Triggered by hand from the Airflow UI, its form takes the same fields as `llm_batch_job`.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm_batch import config
from llm_batch.dag_factory import NIGHTLY_PRIORITY, build_job_dag, deadline_from_env, job_params

BACKLOG_FILTER = {"last_result.status": {"$ne": "succeeded"}}

dag = build_job_dag(
    Path(__file__).stem,
    doc_md=__doc__,
    schedule=os.environ.get("LLM_BATCH_NIGHTLY_SCHEDULE", "0 2 * * *"),
    params=job_params(filter=BACKLOG_FILTER, limit=config.MAX_TASKS_PER_JOB),
    priority_weight=NIGHTLY_PRIORITY,
    tags=["llm", "batch", "nightly"],
    deadline_s=deadline_from_env(),
)
