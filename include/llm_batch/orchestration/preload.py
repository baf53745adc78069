"""Import, once per Airflow process, what every batch task instance would import again.

Imported from `airflow_local_settings.py` (the local stack writes one into its
`$AIRFLOW_HOME/config/`; see docs/performance.md for a deployment's own). Airflow imports that
file when it starts, before the scheduler forks its LocalExecutor workers (and before a Celery
worker forks its pool), and every task process is forked from one of those: so pymongo,
requests and the pipeline's modules are already in memory when `process_batch` starts, and
each of the 500 instances of a 5000-task job skips ~0.1 CPU-s of imports.

Runs while Airflow itself is still being imported: nothing here may import Airflow. Nothing
connects anywhere either (a client made before a fork is not fork-safe); modules only.
"""

from __future__ import annotations

import importlib

MODULES = (
    "pymongo",
    "requests",
    "llm_batch.cache",
    "llm_batch.jobs",
    "llm_batch.processing",
    "llm_batch.limiter_store",
    "llm_batch.reconcile",
    "llm_batch.store",
    "llm_hook.client",
)
"""What `llm_batch.orchestration.task_bodies` and the hook import, less what imports Airflow."""

AIRFLOW_MODULES = (
    "llm_batch.orchestration.dag_factory",
    "llm_batch.orchestration.task_bodies",
    "llm_batch.orchestration.batch_trigger",
    "llm_hook",
)
"""What the job DAG's file and `process_batch` import that imports Airflow (~40 ms a task)."""


def preload_airflow_modules() -> None:
    """Import `AIRFLOW_MODULES`: call once Airflow is loaded, before forking task workers.

    The stack's executor does, in `LocalExecutor.start` (local_executor.py).
    """
    for name in AIRFLOW_MODULES:
        importlib.import_module(name)


for _name in MODULES:
    importlib.import_module(_name)
