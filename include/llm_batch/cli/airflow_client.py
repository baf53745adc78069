"""A small typed client for Airflow's REST API v2: trigger runs, follow them, read pools and XComs.

Authentication is Airflow 3's: a JWT from `POST /auth/token` (username and password), sent as a
bearer token and fetched again when the server answers 401 (tokens expire).

Where it points, in order of precedence: the environment (`LLM_BATCH_AIRFLOW_URL`,
`LLM_BATCH_AIRFLOW_USERNAME`, `LLM_BATCH_AIRFLOW_PASSWORD`), then the local stack's state file
(`<work dir>/stack.json`, written by `python -m llm_batch_dev.stack.launcher up`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from llm_batch import config
from llm_batch.cli.local_stack import read_password, read_stack_file, state_file

log = logging.getLogger(__name__)

API = "/api/v2"
PAGE_SIZE = 100
"""Rows per page: Airflow caps pages at `[api] maximum_page_limit` (default 100)."""


class AirflowAPIError(Exception):
    """Airflow answered with an error, or did not answer at all (`status` None)."""

    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class AirflowClient:
    """Calls to the REST API v2 of one Airflow deployment, as one user."""

    def __init__(
        self,
        url: str,
        username: str | None,
        password: str | None,
        *,
        timeout_s: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.username = username or "admin"
        self._password = password
        self.timeout_s = timeout_s
        self.session = session or requests.Session()
        self._token: str | None = None

    def __repr__(self) -> str:
        return f"AirflowClient({self.url!r}, user={self.username!r})"

    @classmethod
    def from_env(
        cls, stack_file: Path | None = None, environ: Mapping[str, str] | None = None
    ) -> AirflowClient:
        """Read `LLM_BATCH_AIRFLOW_*`, falling back to the stack file (default: the work dir's)."""
        env = os.environ if environ is None else environ
        if stack_file is None:
            stack_file = state_file(env)
        recorded = read_stack_file(stack_file)
        username = env.get("LLM_BATCH_AIRFLOW_USERNAME") or recorded.get("airflow_username")
        password = env.get("LLM_BATCH_AIRFLOW_PASSWORD")
        password_file = recorded.get("airflow_password_file")
        if password is None and password_file:
            password = read_password(Path(password_file), username or "admin")
        url = env.get("LLM_BATCH_AIRFLOW_URL") or recorded.get("airflow_url")
        if not url:
            raise AirflowAPIError(
                f"No Airflow address: {stack_file} does not exist and LLM_BATCH_AIRFLOW_URL is not "
                "set. Start the local stack with `make up`, or set LLM_BATCH_AIRFLOW_URL."
            )
        return cls(str(url), username, password)

    # Monitoring

    def health(self) -> dict[str, Any]:
        """Return `/monitor/health`: metadata DB, scheduler, triggerer and DAG processor status."""
        return dict(self._call("GET", "/monitor/health", auth=False))

    # DAGs and runs

    def get_dag(self, dag_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/dags/{_seg(dag_id)}"))

    def list_import_errors(self) -> list[dict[str, Any]]:
        """Return every DAG file that failed to import, with its traceback."""
        return list(self._paginate("/importErrors", "import_errors"))

    def trigger_dag_run(
        self,
        dag_id: str,
        conf: Mapping[str, Any],
        run_id: str | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """Start a manual run of `dag_id` with `conf` as its params; return the new run."""
        body: dict[str, Any] = {"logical_date": None, "conf": dict(conf)}
        if run_id is not None:
            body["dag_run_id"] = run_id
        if note is not None:
            body["note"] = note
        run = dict(self._call("POST", f"/dags/{_seg(dag_id)}/dagRuns", json=body))
        log.debug("triggered dag_id=%s run_id=%s", dag_id, run.get("dag_run_id"))
        return run

    def get_dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """Return the run `run_id` of `dag_id` (its `state`, `note`, dates, `conf`).

        Read through the list endpoint, filtered by run id: Airflow 3.3's single-run endpoint
        loads every task instance of the run to list the run's DAG versions (~0.13 CPU-s of the
        api-server for a 500-batch run, measured), a cost a progress loop polling every second
        pays each time; the list endpoint gets the versions in one query.
        """
        page = self._call(
            "GET",
            f"/dags/{_seg(dag_id)}/dagRuns",
            params={"run_id_pattern": run_id, "limit": PAGE_SIZE},
        )
        for run in page.get("dag_runs") or []:
            if run.get("dag_run_id") == run_id:
                return dict(run)
        # Not matched (more than a page of look-alike ids, or an API without the filter): ask
        # by id, which also gives the API's own 404.
        return dict(self._call("GET", f"/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}"))

    def set_dag_run_state(self, dag_id: str, run_id: str, state: str) -> dict[str, Any]:
        """Mark a run `failed`, `success` or `queued`, as the UI's buttons do."""
        path = f"/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}"
        return dict(self._call("PATCH", path, json={"state": state}))

    def list_task_instances(
        self, dag_id: str, run_id: str, task_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Return the run's task instances (each mapped instance is one, with its `map_index`)."""
        params = {"order_by": "id"}  # unique, so offset pages neither skip nor repeat rows
        if task_id is not None:
            params["task_id"] = task_id
        path = f"/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}/taskInstances"
        rows = self._paginate(path, "task_instances", params)
        return sorted(rows, key=lambda ti: (ti["task_id"], ti["map_index"]))

    def get_xcom(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        key: str = config.RETURN_VALUE_XCOM_KEY,
        map_index: int = -1,
    ) -> Any:
        """Return the XCom `key` the task pushed, or None if it pushed none (as `xcom_pull`)."""
        path = (
            f"/dags/{_seg(dag_id)}/dagRuns/{_seg(run_id)}/taskInstances/{_seg(task_id)}"
            f"/xcomEntries/{_seg(key)}"
        )
        try:
            entry = self._call("GET", path, params={"map_index": map_index})
        except AirflowAPIError as exc:
            if exc.status == 404 and "XCom entry" in exc.detail:
                return None
            raise
        return _json_value(entry.get("value"))

    # Pools and connections

    def get_pool(self, name: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/pools/{_seg(name)}"))

    def put_pool(
        self, name: str, slots: int, description: str = "", include_deferred: bool = False
    ) -> None:
        """Create the pool, or overwrite its slots and settings if it exists."""
        entity = {
            "name": name,
            "slots": slots,
            "description": description,
            "include_deferred": include_deferred,
        }
        self._bulk_overwrite("/pools", entity, name)

    def get_connection(self, conn_id: str) -> dict[str, Any]:
        """Return the connection; its password and secret extras come back masked."""
        return dict(self._call("GET", f"/connections/{_seg(conn_id)}"))

    def put_connection(self, conn_id: str, conn_type: str, **fields: Any) -> None:
        """Create or overwrite a connection; fields: host, port, login, password, schema, extra."""
        extra = fields.pop("extra", None)
        entity = {"connection_id": conn_id, "conn_type": conn_type, **fields}
        if extra is not None:
            entity["extra"] = extra if isinstance(extra, str) else json.dumps(extra)
        self._bulk_overwrite("/connections", entity, conn_id)

    # Plumbing

    def _bulk_overwrite(self, path: str, entity: dict[str, Any], key: str) -> None:
        body = {
            "actions": [
                {"action": "create", "entities": [entity], "action_on_existence": "overwrite"}
            ]
        }
        answer = self._call("PATCH", path, json=body)
        errors = (answer.get("create") or {}).get("errors") or []
        if errors:
            raise AirflowAPIError(
                f"Airflow refused to write {path.strip('/')[:-1]} {key!r}: {errors}",
                status=200,
                detail=json.dumps(errors),
            )

    def _paginate(
        self, path: str, items_key: str, params: Mapping[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield every row of a list endpoint, page by page."""
        offset = 0
        while True:
            page = self._call(
                "GET", path, params={**(params or {}), "limit": PAGE_SIZE, "offset": offset}
            )
            rows = page.get(items_key) or []
            yield from rows
            offset += len(rows)
            if not rows or offset >= int(page.get("total_entries") or 0):
                return

    def _login(self) -> str:
        if not self._password:
            raise AirflowAPIError(
                f"No password for Airflow user {self.username!r} at {self.url}: set "
                "LLM_BATCH_AIRFLOW_PASSWORD, or start the local stack (`make up`), which records "
                "where its generated password is."
            )
        answer = self._send(
            "POST",
            f"{self.url}/auth/token",
            json={"username": self.username, "password": self._password},
        )
        if not answer.ok:
            raise _error("POST", "/auth/token", answer, hint=_LOGIN_HINT)
        return str(answer.json()["access_token"])

    def _call(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
    ) -> Any:
        url = f"{self.url}{API}{path}"
        headers: dict[str, str] = {}
        if auth:
            if self._token is None:
                self._token = self._login()
            headers["Authorization"] = f"Bearer {self._token}"
        answer = self._send(method, url, params=params, json=json, headers=headers)
        if answer.status_code == 401 and auth:
            # Tokens expire: log in again once, then give up.
            self._token = self._login()
            headers["Authorization"] = f"Bearer {self._token}"
            answer = self._send(method, url, params=params, json=json, headers=headers)
        if not answer.ok:
            raise _error(method, f"{API}{path}", answer)
        return answer.json() if answer.content else {}

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        # A busy api-server (a small machine running hundreds of task instances) can miss one
        # read; reads are safe to repeat, writes (a trigger) are not.
        attempts = READ_ATTEMPTS if method == "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                return self.session.request(method, url, timeout=self.timeout_s, **kwargs)
            except requests.exceptions.InvalidJSONError as exc:
                # Raised before anything is sent: not Airflow's silence, but our own body.
                raise AirflowAPIError(
                    f"the request to {method} {url.removeprefix(self.url)} holds a value JSON "
                    f"cannot carry (NaN or infinity?), nothing was sent: {exc}"
                ) from exc
            except requests.RequestException as exc:
                if attempt < attempts and isinstance(exc, requests.Timeout):
                    time.sleep(attempt)
                    continue
                raise self._unreachable(method, url, exc) from exc
        raise AssertionError("unreachable")

    def _unreachable(self, method: str, url: str, exc: Exception) -> AirflowAPIError:
        return AirflowAPIError(
            f"Airflow at {self.url} did not answer {method} {url.removeprefix(self.url)} "
            f"({exc.__class__.__name__}). Is it running? `make status` shows the local stack; "
            "`make up` starts it; LLM_BATCH_AIRFLOW_URL points elsewhere."
        )


READ_ATTEMPTS = 3

_LOGIN_HINT = (
    "Check LLM_BATCH_AIRFLOW_USERNAME / LLM_BATCH_AIRFLOW_PASSWORD, or the password file named in "
    "the stack file (`make status` prints the login)."
)


def _error(method: str, path: str, answer: requests.Response, hint: str = "") -> AirflowAPIError:
    detail = _detail(answer)
    message = f"Airflow answered {method} {path} with HTTP {answer.status_code}: {detail}"
    return AirflowAPIError(f"{message} {hint}".strip(), status=answer.status_code, detail=detail)


def _detail(answer: requests.Response) -> str:
    """The server's `detail`: FastAPI gives a string, or a list of validation problems."""
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:500] or answer.reason
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg')}"
            if isinstance(item, dict)
            else str(item)
            for item in detail
        )
    return detail if isinstance(detail, str) else json.dumps(detail)


def _json_value(value: Any) -> Any:
    """XCom values come back as JSON text or decoded, depending on how they were stored."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _seg(value: str) -> str:
    """Quote one URL path segment (run ids contain `:` and `+`)."""
    return quote(value, safe="")
