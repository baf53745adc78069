"""The hostname Airflow records for a task instance: the Celery worker's name when it has one.

Two Celery workers on one machine share its hostname, so the task instances they run would look
alike in Airflow's records. The scale-out test points `[core] hostname_callable` here and gives
each worker `LLM_BATCH_WORKER_NAME`, as separate machines (or containers) would have distinct
hostnames.
"""

from __future__ import annotations

import os
import socket

WORKER_NAME_ENV = "LLM_BATCH_WORKER_NAME"


def hostname() -> str:
    """Return `<worker name>@<fqdn>` inside a named worker, else the machine's FQDN."""
    name = os.environ.get(WORKER_NAME_ENV)
    fqdn = socket.getfqdn()
    return f"{name}@{fqdn}" if name else fqdn
