"""Every name and number the pipeline agrees on, in one place."""

from __future__ import annotations

BATCH_SIZE = 10
"""Tasks per LLM request: the batch service takes at most 10."""

MAX_TASKS_PER_JOB = 5000

POOL_NAME = "llm_api"
"""Airflow pool whose slots are the LLM requests in flight across all runs."""
DEFAULT_POOL_SLOTS = 32

MONGO_CONN_ID = "mongo_default"
LLM_CONN_ID = "llm_default"
DEFAULT_DATABASE = "llm_batch"
"""Used when the Mongo connection names no database (its `schema`)."""

TASKS = "tasks"
JOBS = "jobs"
BATCHES = "batches"
RESULTS = "results"
LLM_CALLS = "llm_calls"
BILLED_KEYS = "llm_billed_keys"
"""Internal: one document per idempotency key whose usage `llm_calls` already counts."""
LLM_CACHE = "llm_cache"
"""Stored answers, reused for identical (model, instructions, params, input)."""
LLM_ENDPOINTS = "llm_endpoints"
"""The rate limiter's shared record per LLM endpoint: request budget and health."""

CACHE_MAX_AGE_S = 7 * 24 * 3600.0
"""Cached answers older than this are not reused; `LLM_BATCH_CACHE_MAX_AGE_S` overrides it
(0 turns the cache off)."""
CACHE_MAX_AGE_ENV = "LLM_BATCH_CACHE_MAX_AGE_S"

JOB_DAG_ID = "llm_batch_job"
NIGHTLY_DAG_ID = "llm_batch_nightly"
CREATE_JOB_TASK_ID = "create_job"
RECONCILE_TASK_ID = "reconcile_job"
STOPPED_XCOM_KEY = "stopped_in_airflow"
"""XCom of `create_job` that says an operator marked the run failed or success."""

DEFAULT_DEADLINE_S = 4 * 3600.0
"""A run still going this long after it was queued raises a `deadline_missed` alert;
`LLM_BATCH_DEADLINE_S` overrides it (0 turns it off)."""
DEADLINE_ENV = "LLM_BATCH_DEADLINE_S"

LOOKUP_CHUNK = 100
"""Ids per `$in` query: large `$in` lists are slow on some servers."""
