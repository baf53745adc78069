"""Every name and number the pipeline agrees on, in one place."""

from __future__ import annotations

BATCH_SIZE = 10
"""Tasks per LLM request: the batch service takes at most 10."""

MAX_TASKS_PER_JOB = 5000

POOL_NAME = "llm_api"
"""Airflow pool whose slots are the LLM requests in flight across all runs."""
DEFAULT_POOL_SLOTS = 32

TRIGGER_THREADS_ENV = "LLM_BATCH_TRIGGER_THREADS"
"""Threads a triggerer runs deferred batches on; size it to the pool's slots (docs/scale-out.md)."""
DEFAULT_TRIGGER_THREADS = 128

CONNECTION_TTL_S = 30.0
"""How long the triggerer's batches reuse what they read of `mongo_default` and `llm_default`
before reading them again (a rotated key or a changed extra takes effect within this time);
a batch that fails makes the next one read them again at once."""

MONGO_CONN_ID = "mongo_default"
LLM_CONN_ID = "llm_default"
DEFAULT_DATABASE = "llm_batch"
"""Used when the Mongo connection names no database (its `schema`)."""

TASKS = "tasks"
JOBS = "jobs"
BATCHES = "batches"
RESULTS = "results"
LLM_CALLS = "llm_calls"
LLM_CACHE = "llm_cache"
"""Stored answers, reused for identical (model, instructions, params, input)."""
LLM_CALLS_DAILY = "llm_calls_daily"
"""Internal: per-day latency histograms of `llm_calls` for days that are over (the workspace's
charts read them instead of every request)."""
LLM_ENDPOINTS = "llm_endpoints"
"""The rate limiter's shared record per LLM endpoint: request budget and health."""

CACHE_MAX_AGE_S = 7 * 24 * 3600.0
"""Cached answers older than this are not reused; `LLM_BATCH_CACHE_MAX_AGE_S` overrides it
(0 turns the cache off)."""
CACHE_MAX_AGE_ENV = "LLM_BATCH_CACHE_MAX_AGE_S"

JOB_DAG_ID = "llm_batch_job"
NIGHTLY_DAG_ID = "llm_batch_nightly"

# The job DAG's task ids: the Airflow task, its body in `orchestration.task_bodies` and the
# domain function it calls share each name.
CREATE_JOB_TASK_ID = "create_job"
PLAN_BATCHES_TASK_ID = "plan_batches"
PROCESS_BATCH_TASK_ID = "process_batch"
RECONCILE_JOB_TASK_ID = "reconcile_job"
REPORT_TASK_ID = "report"

RETURN_VALUE_XCOM_KEY = "return_value"
"""Airflow's key for what a task returns (`create_job`: the job; `reconcile_job`: its summary)."""
STOPPED_XCOM_KEY = "stopped_in_airflow"
"""XCom of `create_job` that says an operator marked the run failed or success."""
ESTIMATE_XCOM_KEY = "estimate"
"""XCom of a dry run's `create_job`: its cost estimate (read by the CLI)."""
REJECTION_XCOM_KEY = "rejection"
"""XCom of `create_job`: why the request was refused (read by the CLI)."""

DEFAULT_DEADLINE_S = 4 * 3600.0
"""A run still going this long after it was queued raises a `deadline_missed` alert;
`LLM_BATCH_DEADLINE_S` overrides it (0 turns it off)."""
DEADLINE_ENV = "LLM_BATCH_DEADLINE_S"

# Alert channels: these settings say which are on and hold no secret; the secrets live in the
# Airflow connections they name (`orchestration.alert_channels`).
ALERT_EMAIL_TO_ENV = "LLM_BATCH_ALERT_EMAIL_TO"
"""Comma-separated recipients of alert e-mails; empty: no e-mail."""
ALERT_EMAIL_FROM_ENV = "LLM_BATCH_ALERT_EMAIL_FROM"
"""Sender of alert e-mails; empty: the SMTP connection's `from_email`, else the default."""
DEFAULT_ALERT_EMAIL_FROM = "llm-batch@localhost"
ALERT_SMTP_CONN_ID_ENV = "LLM_BATCH_ALERT_SMTP_CONN_ID"
DEFAULT_ALERT_SMTP_CONN_ID = "smtp_default"
"""Airflow's own SMTP connection id, which its e-mail features use too."""
ALERT_SLACK_CONN_ID_ENV = "LLM_BATCH_ALERT_SLACK_CONN_ID"
"""The `slackwebhook` connection alerts are posted to; empty: no Slack alerts."""
ALERT_SLACK_CONN_ID = "llm_batch_alert_slack"
"""The id the docs and docker-compose give that connection."""

LOOKUP_CHUNK = 100
"""Ids per `$in` query: large `$in` lists are slow on some servers."""

SELECTION_TIMEOUT_S = 30.0
"""Longest a job's selection (its filter, and the count of what it leaves over) may run in
MongoDB (`maxTimeMS`); a slower filter is refused. `LLM_BATCH_SELECTION_TIMEOUT_S` overrides it."""
SELECTION_TIMEOUT_ENV = "LLM_BATCH_SELECTION_TIMEOUT_S"
PROVIDER_BATCHES = "provider_batches"
"""Collection tracking each job's provider batches (see `provider_batch.py`)."""
DELIVER_PROVIDER_BATCH_TASK_ID = "deliver_provider_batch"
