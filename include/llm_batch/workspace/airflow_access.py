"""Airflow's side of the workspace: who is logged in, what they may do, MongoDB, triggering.

The only workspace module that imports Airflow (imported lazily by the plugin, in the API
server). A user is whoever Airflow's own auth says (the UI's `_token` cookie or a bearer
token, `airflow.api_fastapi.core_api.security.get_user`); reading needs permission to read
`llm_batch_job`'s runs, changing data needs permission to trigger them (POST on its runs),
asked of Airflow's configured auth manager.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from airflow.api.common.trigger_dag import trigger_dag
from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import (
    DagAccessEntity,
    DagDetails,
)
from airflow.api_fastapi.core_api.security import get_user
from airflow.providers.mongo.hooks.mongo import MongoHook
from airflow.utils.types import DagRunTriggeredByType
from fastapi import HTTPException, Request
from fastapi.security import HTTPBearer

from llm_batch import config
from llm_batch.store import JobStore
from llm_batch.workspace.app import Viewer

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False)


class AirflowAccess:
    """Answers the workspace's questions with Airflow's auth manager and metadata database."""

    def __init__(self, mongo_conn_id: str = config.MONGO_CONN_ID) -> None:
        self.mongo_conn_id = mongo_conn_id
        self._store: JobStore | None = None
        self._lock = threading.Lock()

    async def viewer(self, request: Request) -> Viewer | None:
        """Return the logged-in user and what they may do, or None without a valid login."""
        try:
            user = await get_user(request, None, await _bearer(request))
        except HTTPException:
            return None
        manager = get_auth_manager()
        details = DagDetails(id=config.JOB_DAG_ID)
        may_read = manager.is_authorized_dag(
            method="GET", access_entity=DagAccessEntity.RUN, details=details, user=user
        )
        may_operate = manager.is_authorized_dag(
            method="POST", access_entity=DagAccessEntity.RUN, details=details, user=user
        )
        return Viewer(name=user.get_name(), may_read=may_read, may_operate=may_operate)

    def login_url(self, request: Request) -> str:
        """Return Airflow's login page, coming back to this page afterwards."""
        login = get_auth_manager().get_url_login()
        separator = "&" if "?" in login else "?"
        return f"{login}{separator}next={quote(str(request.url), safe='')}"

    def store(self) -> JobStore:
        """Return the store on `mongo_default`, one client per API server process."""
        with self._lock:
            if self._store is None:
                hook = MongoHook(mongo_conn_id=self.mongo_conn_id)
                client = hook.get_conn()
                database = hook.connection.schema or config.DEFAULT_DATABASE
                self._store = JobStore(client[database])
                log.info("workspace reads MongoDB database %s", database)
            return self._store

    def trigger_job_run(self, conf: dict[str, Any], user: str) -> str:
        """Trigger `llm_batch_job` with this conf as `user`; return the run id."""
        run_id = f"manual__workspace__{conf['job_id']}__{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
        run = trigger_dag(
            config.JOB_DAG_ID,
            triggered_by=DagRunTriggeredByType.UI,
            triggering_user_name=user,
            run_id=run_id,
            conf=conf,
        )
        return run.run_id if run is not None else run_id
