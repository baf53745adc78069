"""The hostname Airflow records for a task instance: the address a container's hostname would be.

Two Celery workers on one machine share its hostname, so the task instances they run would look
alike in Airflow's records, and the api-server could not tell whose log server to ask for a
running task's log. The native compose topology points `[core] hostname_callable` here and gives
each worker `LLM_BATCH_WORKER_HOST`, a loopback address of its own (127.0.0.1, 127.0.0.2), as
separate containers have distinct hostnames.
"""

from __future__ import annotations

import os
import socket

WORKER_HOST_ENV = "LLM_BATCH_WORKER_HOST"


def hostname() -> str:
    """Return the worker's own address inside a named worker, else the machine's FQDN."""
    return os.environ.get(WORKER_HOST_ENV) or socket.getfqdn()
