"""
### Nightly LLM batch run

Drains the backlog: each run creates a job from the tasks that have no good answer yet, at
most 5000 per job, and logs how many are left for the next night. It leaves tasks awaiting
review (`needs_review`), tasks whose last failure is their own (`invalid_input`,
`content_filtered`, `too_large`, `output_too_large`), and tasks that failed in
`LLM_BATCH_NIGHTLY_MAX_ATTEMPTS` (default 3) nightly jobs already; the run's note says how
many it left for each reason. Same tasks as `llm_batch_job`, at a lower priority: in the shared pool
`llm_api`, operators' jobs are served first.

Nobody waits for the nightly answers, so it defaults to `delivery=provider_batch`: the job goes
through the provider's batch API at about half the price, answered within 24 h (a connection
without one, e.g. the `batch` adapter, runs it sync).

Schedule: `LLM_BATCH_NIGHTLY_SCHEDULE` (a cron expression, default `0 2 * * *`, 02:00 UTC).
One run at a time: while a night's job still waits for the provider, the next night's run is
queued, not started (it would select the same tasks and pay for them twice).
Triggered by hand from the Airflow UI, its form takes the same fields as `llm_batch_job`.
"""

from __future__ import annotations

import os
from pathlib import Path

from llm_batch import config
from llm_batch.backlog import backlog_filter, max_attempts_from_env
from llm_batch.orchestration.dag_factory import (
    NIGHTLY_PRIORITY,
    build_job_dag,
    deadline_from_env,
)
from llm_batch.orchestration.params import job_params

BACKLOG_FILTER = backlog_filter(max_attempts_from_env())

dag = build_job_dag(
    Path(__file__).stem,
    doc_md=__doc__,
    schedule=os.environ.get("LLM_BATCH_NIGHTLY_SCHEDULE", "0 2 * * *"),
    params=job_params(
        filter=BACKLOG_FILTER, limit=config.MAX_TASKS_PER_JOB, delivery="provider_batch"
    ),
    priority_weight=NIGHTLY_PRIORITY,
    tags=["llm", "batch", "nightly"],
    deadline_s=deadline_from_env(),
    # A night's provider batch may wait ~24 h: the next night must not select its tasks again.
    max_active_runs=1,
)
