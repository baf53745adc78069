"""Airflow plugin: the LLM batch workspace (jobs with charts, a job's detail, the review queue).

A FastAPI app mounted in the API server at `/llm-batch` (`llm_batch.workspace.app`, behind
Airflow's own login and permissions) and three entries in the UI: *LLM batch jobs* and
*LLM review queue* in the navigation, and an *LLM job* tab on each run of the job DAGs.
The app is built only in the API server (`fastapi_apps` is read there); other processes that
load this plugin import nothing but the plugin base.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/llm-batch"


class LazyWorkspaceApp:
    """An ASGI app that builds the workspace on its first request, in the API server."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from airflow.configuration import conf

            from llm_batch.workspace.airflow_access import AirflowAccess
            from llm_batch.workspace.app import create_app

            secret = conf.get("api", "secret_key", fallback="") or None
            self._app = create_app(AirflowAccess(), csrf_secret=secret.encode() if secret else None)
        await self._app(scope, receive, send)


class LLMBatchWorkspacePlugin(AirflowPlugin):
    name = "llm_batch_workspace"
    fastapi_apps = [
        {"app": LazyWorkspaceApp(), "url_prefix": URL_PREFIX, "name": "LLM batch workspace"}
    ]
    external_views = [
        {
            "name": "LLM batch jobs",
            "href": "llm-batch/jobs",
            "url_route": "llm-batch-jobs",
            "destination": "nav",
            "category": "LLM batch",
        },
        {
            "name": "LLM review queue",
            "href": "llm-batch/review",
            "url_route": "llm-batch-review",
            "destination": "nav",
            "category": "LLM batch",
        },
        {
            "name": "LLM job",
            "href": "llm-batch/runs/{DAG_ID}/{RUN_ID}",
            "url_route": "llm-batch-run",
            "destination": "dag_run",
        },
    ]
