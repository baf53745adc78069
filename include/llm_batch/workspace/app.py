"""The workspace web app: jobs with charts, a job's detail, the review queue (FastAPI + Jinja2).

Mounted in Airflow's API server by `plugins/llm_batch_workspace.py`. Who the user is and what
they may do is asked of an `Access` (Airflow's auth in the API server,
`llm_batch.workspace.airflow_access`); every page and JSON endpoint needs a user allowed to read
`llm_batch_job`'s runs, every change one allowed to trigger them, a POST (never a GET), a
same-origin request and the page's CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from llm_batch import config
from llm_batch.models import JobState
from llm_batch.request import InvalidJobRequest, parse_job_request
from llm_batch.review import Decision, ReviewConflict, ReviewError, Seen, decide
from llm_batch.store import JobStore
from llm_batch.workspace import charts, exports, queries

HERE = Path(__file__).resolve().parent
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Viewer:
    """The logged-in user and what they may do."""

    name: str
    may_read: bool
    may_operate: bool


class Access(Protocol):
    """What the app asks of its host (Airflow's API server, or a test's stand-in)."""

    async def viewer(self, request: Request) -> Viewer | None: ...

    def login_url(self, request: Request) -> str: ...

    def store(self) -> JobStore: ...

    def trigger_job_run(self, conf: dict[str, Any], user: str) -> str: ...


class FixedAccess:
    """One fixed user and a given store: for benchmarks and tests without Airflow."""

    def __init__(
        self, store: JobStore, name: str = "reviewer", *, may_operate: bool = True
    ) -> None:
        self._store = store
        self._viewer = Viewer(name, may_read=True, may_operate=may_operate)
        self.triggered: list[dict[str, Any]] = []

    async def viewer(self, request: Request) -> Viewer | None:
        return self._viewer

    def login_url(self, request: Request) -> str:
        return "/login"

    def store(self) -> JobStore:
        return self._store

    def trigger_job_run(self, conf: dict[str, Any], user: str) -> str:
        self.triggered.append({"conf": conf, "user": user})
        return f"manual__test__{conf['job_id']}"


def csrf_token(request: Request, viewer: Viewer) -> str:
    """Return the token the user's forms carry: proof a POST came from a page of this app."""
    secret: bytes = request.app.state.csrf_secret
    return hmac.new(secret, f"csrf:{viewer.name}".encode(), hashlib.sha256).hexdigest()


async def page_viewer(request: Request) -> Viewer:
    """The user of a page; without a login, a redirect to Airflow's login and back."""
    access: Access = request.app.state.access
    viewer = await access.viewer(request)
    if viewer is None:
        raise HTTPException(302, "log in to Airflow", {"Location": access.login_url(request)})
    if not viewer.may_read:
        raise HTTPException(403, f"{viewer.name} may not read {config.JOB_DAG_ID} runs")
    return viewer


async def api_viewer(request: Request) -> Viewer:
    """The user of a JSON endpoint or download; without a login, 401."""
    viewer = await request.app.state.access.viewer(request)
    if viewer is None:
        raise HTTPException(401, "log in to Airflow first", {"WWW-Authenticate": "Bearer"})
    if not viewer.may_read:
        raise HTTPException(403, f"{viewer.name} may not read {config.JOB_DAG_ID} runs")
    return viewer


async def operator(request: Request, viewer: Annotated[Viewer, Depends(api_viewer)]) -> Viewer:
    """A user who may change jobs, on a same-site POST carrying the page's token."""
    if not viewer.may_operate:
        raise HTTPException(
            403, f"{viewer.name} may not change {config.JOB_DAG_ID} runs: ask an admin"
        )
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(403, "cross-site request refused")
    if not request.headers.get("authorization", "").lower().startswith("bearer "):
        # A browser session (cookie): the page's token proves the form came from this app.
        form = await request.form()
        sent = request.headers.get(CSRF_HEADER) or str(form.get(CSRF_FIELD) or "")
        if not hmac.compare_digest(sent, csrf_token(request, viewer)):
            raise HTTPException(403, "missing or stale form token: reload the page and retry")
    return viewer


PageViewer = Annotated[Viewer, Depends(page_viewer)]
ApiViewer = Annotated[Viewer, Depends(api_viewer)]
Operator = Annotated[Viewer, Depends(operator)]


def create_app(access: Access, *, csrf_secret: bytes | None = None) -> FastAPI:
    """Return the workspace app; `csrf_secret` must be shared by all API server workers."""
    app = FastAPI(title="LLM batch workspace", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.access = access
    app.state.csrf_secret = csrf_secret or secrets.token_bytes(32)
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["tojson_pretty"] = _pretty_json
    templates.env.filters["when"] = _when
    templates.env.globals.update(charts=charts, JobState=JobState)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def render(request: Request, name: str, viewer: Viewer, **context: Any) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        airflow_root = root.removesuffix(app_prefix(request))
        return templates.TemplateResponse(
            request,
            name,
            {
                "viewer": viewer,
                "root": root,
                "airflow_root": airflow_root,
                "csrf": csrf_token(request, viewer),
                "notice": request.query_params.get("notice"),
                "error": request.query_params.get("error"),
                **context,
            },
        )

    @app.get("/", include_in_schema=False)
    async def home(request: Request, viewer: PageViewer) -> RedirectResponse:
        return RedirectResponse(f"{request.scope.get('root_path', '')}/jobs", 302)

    @app.get("/jobs", response_class=HTMLResponse)
    def jobs_page(request: Request, viewer: PageViewer) -> HTMLResponse:
        filters = job_filters(request)
        store = access.store()
        page = queries.list_jobs(store, filters)
        series = queries.daily_series(store, filters)
        return render(
            request,
            "jobs.html",
            viewer,
            filters=filters,
            page=page,
            series=series,
            states=[state.value for state in JobState],
            sources=queries.SOURCES,
            query_without_page=_query_without(request, "page"),
        )

    @app.get("/api/jobs")
    def jobs_json(request: Request, viewer: ApiViewer) -> JSONResponse:
        page = queries.list_jobs(access.store(), job_filters(request))
        rows = [
            {
                "job_id": row.job["_id"],
                "state": row.job["state"],
                "source": row.source,
                "task_count": row.job.get("task_count"),
                "counts": row.counts,
                "cost_usd": row.cost_usd,
                "failure_rate": row.failure_rate,
                "triggered_by": row.job.get("triggered_by"),
                "run_id": row.job.get("run_id"),
            }
            for row in page.rows
        ]
        body = {"jobs": rows, "total": page.total, "page": page.page, "pages": page.pages}
        return JSONResponse(json.loads(json.dumps(body, default=str)))

    @app.get("/api/jobs/{job_id}/progress")
    def job_progress(job_id: str, viewer: ApiViewer) -> dict[str, Any]:
        progress = queries.job_progress(access.store(), job_id)
        if progress is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return progress

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job_page(request: Request, job_id: str, viewer: PageViewer) -> HTMLResponse:
        detail = queries.job_detail(access.store(), job_id)
        if detail is None:
            raise HTTPException(404, f"no job {job_id!r}: check the id on the jobs page")
        spans = [
            charts.Span(
                label=f"batch {b.batch_no}",
                start=b.started_at,
                end=b.finished_at,
                kind="failed"
                if b.state in ("incomplete", "aborted")
                else ("retried" if b.retried else "done"),
            )
            for b in detail.batches
            if b.started_at is not None and b.finished_at is not None
        ]
        return render(request, "job.html", viewer, d=detail, job=detail.row.job, spans=spans)

    @app.get("/runs/{dag_id}/{run_id}", include_in_schema=False)
    def run_page(request: Request, dag_id: str, run_id: str, viewer: PageViewer) -> Response:
        job = access.store().jobs.find_one(
            {"dag_id": dag_id, "$or": [{"run_id": run_id}, {"runs": run_id}]}, {"_id": 1}
        )
        if job is None:
            return render(request, "no_job.html", viewer, dag_id=dag_id, run_id=run_id)
        return RedirectResponse(f"{request.scope.get('root_path', '')}/jobs/{job['_id']}", 302)

    @app.get("/jobs/{job_id}/results.{fmt}")
    def download(job_id: str, fmt: str, viewer: ApiViewer) -> Response:
        store = access.store()
        if store.jobs.find_one({"_id": job_id}, {"_id": 1}) is None:
            raise HTTPException(404, f"no job {job_id!r}")
        if fmt not in exports.FORMATS:
            raise HTTPException(404, f"results come as {' or '.join(exports.FORMATS)}")
        return exports.streaming_response(store, job_id, fmt)

    @app.get("/jobs/{job_id}/confirm", response_class=HTMLResponse)
    def confirm(request: Request, job_id: str, action: str, viewer: PageViewer) -> HTMLResponse:
        if action not in ACTIONS:
            raise HTTPException(404, f"no action {action!r}; one of {', '.join(ACTIONS)}")
        job = access.store().get_job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return render(request, "confirm.html", viewer, job=job, action=action, what=ACTIONS[action])

    @app.post("/jobs/{job_id}/{action}")
    def act(request: Request, job_id: str, action: str, viewer: Operator) -> Response:
        if action not in ACTIONS:
            raise HTTPException(404, f"no action {action!r}; one of {', '.join(ACTIONS)}")
        store = access.store()
        back = f"{request.scope.get('root_path', '')}/jobs/{job_id}"
        if action == "cancel":
            if not store.request_cancel(job_id, datetime.now(UTC), viewer.name):
                job = store.get_job(job_id)
                state = job["state"] if job else "unknown"
                return _back(back, error=f"job {job_id} cannot be cancelled (state: {state})")
            return _back(
                back,
                notice="cancel requested: nothing more is sent; in-flight "
                "requests finish and the rest end cancelled",
            )
        conf = {
            "retry_of": job_id,
            "include_needs_review": action == "redrive-needs-review",
            "limit": config.MAX_TASKS_PER_JOB,
        }
        try:
            parse_job_request(conf)
        except InvalidJobRequest as exc:
            return _back(back, error="; ".join(exc.problems))
        conf["job_id"] = f"job-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
        try:
            run_id = access.trigger_job_run(conf, viewer.name)
        except Exception as exc:  # the host's error, shown to the operator as is
            return _back(back, error=f"could not trigger the re-drive: {exc}")
        return _back(back, notice=f"re-drive triggered as job {conf['job_id']} (run {run_id})")

    @app.get("/review", response_class=HTMLResponse)
    def review_page(request: Request, viewer: PageViewer) -> HTMLResponse:
        filters = queue_filters(request)
        store = access.store()
        page = queries.review_queue(store, filters)
        return render(
            request,
            "review.html",
            viewer,
            filters=filters,
            page=page,
            this_url=_this_url(request),
            query_without_page=_query_without(request, "page"),
        )

    @app.post("/review/decide")
    async def review_decide(request: Request, viewer: Operator) -> Response:
        form = await request.form()
        wants_json = "application/json" in request.headers.get("accept", "")
        back = _safe_next(request, str(form.get("next") or ""))
        try:
            decision = Decision(str(form.get("decision")))
            output = None
            if decision is Decision.CORRECT:
                try:
                    output = json.loads(str(form.get("output") or ""))
                except json.JSONDecodeError as exc:
                    raise ReviewError(f"the corrected output is not valid JSON: {exc}") from exc
            seen = Seen(str(form.get("seen_status")), int(str(form.get("seen_decisions") or 0)))
            result = await run_in_threadpool(
                decide,
                access.store(),
                str(form.get("job_id")),
                str(form.get("task_id")),
                decision,
                by=viewer.name,
                seen=seen,
                output=output,
                note=str(form.get("note") or "").strip() or None,
            )
        except ReviewConflict as exc:
            if wants_json:
                return JSONResponse({"detail": str(exc)}, status_code=409)
            return _back(back, error=str(exc))
        except (ReviewError, ValueError) as exc:
            if wants_json:
                return JSONResponse({"detail": str(exc)}, status_code=400)
            return _back(back, error=str(exc))
        message = f"{result['task_id']}: {result['review']['decision']} (now {result['status']})"
        if wants_json:
            return JSONResponse({"detail": message, "status": result["status"]})
        return _back(back, notice=message)

    return app


ACTIONS = {
    "cancel": "Cancel the job: nothing more is sent; requests in flight finish; the tasks not "
    "yet answered end cancelled. Resuming the job later sends them.",
    "redrive-failures": "Re-drive the failures: a new job over this job's failed tasks "
    "(rejected ones included), with the same settings as a new request.",
    "redrive-needs-review": "Re-drive failures and needs-review: a new job over this job's "
    "failed tasks and the answers still waiting for review.",
}


def app_prefix(request: Request) -> str:
    """The part of `root_path` that is this app's own mount (Airflow's base path before it)."""
    return "/" + request.scope.get("root_path", "").rstrip("/").rsplit("/", 1)[-1]


def job_filters(request: Request) -> queries.JobFilters:
    q = request.query_params
    return queries.JobFilters(
        state=q.get("state") or None,
        source=q.get("source") or None,
        model=q.get("model") or None,
        triggered_by=q.get("triggered_by") or None,
        date_from=_date(q.get("date_from")),
        date_to=_date(q.get("date_to")),
        page=_int(q.get("page"), 1),
    )


def queue_filters(request: Request) -> queries.QueueFilters:
    q = request.query_params
    return queries.QueueFilters(
        job_id=q.get("job_id") or None,
        model=q.get("model") or None,
        min_confidence=_float(q.get("min_confidence")),
        max_confidence=_float(q.get("max_confidence")),
        reviewed=q.get("show") == "reviewed",
        page=_int(q.get("page"), 1),
    )


def _date(value: str | None) -> date | None:
    try:
        return date.fromisoformat(value) if value else None
    except ValueError as exc:
        raise HTTPException(400, f"{value!r} is not a date (YYYY-MM-DD)") from exc


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError as exc:
        raise HTTPException(400, f"{value!r} is not a number") from exc


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value else default
    except ValueError:
        return default


def _query_without(request: Request, name: str) -> str:
    return urlencode([(k, v) for k, v in request.query_params.multi_items() if k != name and v])


def _this_url(request: Request) -> str:
    """Return this page's path and query, without the last action's message."""
    query = urlencode(
        [(k, v) for k, v in request.query_params.multi_items() if k not in ("notice", "error")]
    )
    return request.url.path + (f"?{query}" if query else "")


def _safe_next(request: Request, target: str) -> str:
    """Return `target` if it is a path in this app, else the queue (no open redirects)."""
    root = request.scope.get("root_path", "")
    if target.startswith(root + "/") and not target.startswith("//") and "://" not in target:
        return target
    return f"{root}/review"


def _back(url: str, **message: str) -> RedirectResponse:
    separator = "&" if "?" in url else "?"
    return RedirectResponse(f"{url}{separator}{urlencode(message)}", status_code=303)


def _pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.strftime("%Y-%m-%d %H:%M:%S UTC")
    return "" if value is None else str(value)
