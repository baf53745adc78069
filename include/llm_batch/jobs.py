"""Create a job from an operator's request, or resume an existing one."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from llm_batch import documents
from llm_batch.backlog import backlog_cap, skip_queries
from llm_batch.batching import batch_count
from llm_batch.config import SELECTION_TIMEOUT_S
from llm_batch.estimate import CostEstimate, estimate_job
from llm_batch.models import RESUMABLE_ERROR_TYPES, JobSource, JobState, ResultStatus
from llm_batch.processing import utcnow
from llm_batch.request import InvalidJobRequest, JobRequest, default_of, parse_job_request
from llm_batch.selection import count_matching, refuse_colliding_ids, resolve_selection
from llm_batch.service import DEFAULT_SERVICE, LLMService
from llm_batch.store import JobStore

log = logging.getLogger(__name__)


RESUME_MAY_CHANGE = (
    "max_cost_usd", "review_below", "alert_failure_rate", "use_cache", "cache_below_review",
    "resend_via",
)  # fmt: skip
"""Params a resume may change (recorded in the job's `history`): what the job may spend, how
its answers are judged and how an expired provider batch's rest is sent, not the question."""
RESUME_KEEPS = ("instructions", "model", "llm_params")
"""Params a resume refuses to change, with the selection: the job's answers so far answer its
stored question, and a new one would mix answers to two questions in one job."""
REDRIVE_INHERITS = ("instructions", "model", "llm_params", "review_below", "alert_failure_rate")
"""Params a re-drive (`retry_of`) takes from the earlier job when the request leaves them empty
or at their default: the same question, judged the same way. Not `max_cost_usd`: a budget is
per job."""


@dataclass(frozen=True)
class CreatedJob:
    """Which job a run works on and how many batches it has."""

    job_id: str
    task_count: int
    batch_count: int
    resumed: bool


def new_job_id(dag_id: str, run_id: str, at: datetime) -> str:
    """Return a readable job id: when it was made, and a digest of the run that made it."""
    digest = hashlib.sha256(f"{dag_id}\0{run_id}".encode()).hexdigest()[:8]
    return f"job-{at:%Y%m%d-%H%M%S}-{digest}"


def create_job(
    store: JobStore,
    conf: Mapping[str, Any],
    *,
    dag_id: str,
    run_id: str,
    source: JobSource | str,
    triggered_by: str | None = None,
    now: Callable[[], datetime] = utcnow,
    service: LLMService = DEFAULT_SERVICE,
    selection_timeout_s: float = SELECTION_TIMEOUT_S,
    run_active: Callable[[str, str], bool] | None = None,
) -> CreatedJob:
    """Validate the request and write the job in one insert, or resume the job it names.

    A resume may change only `RESUME_MAY_CHANGE`, and only of a job whose run has ended: the
    job's state says so, or `run_active(dag_id, run_id)` (the orchestrator's view of the
    job's last run) says that run ended without closing it.

    Raises `InvalidJobRequest` (nothing written) when the request can't run as given through
    `service` (the LLM connection), or its selection takes longer than `selection_timeout_s`.
    """
    origin = JobSource(source).value
    request = checked_request(conf, service)
    at = now()
    existing = (
        store.get_job(request.job_id)
        if request.job_id is not None
        else store.job_of_run(dag_id, run_id)
    )
    if existing is not None:
        running = not JobState(existing["state"]).is_final
        if running and (existing.get("dag_id"), existing.get("run_id")) == (dag_id, run_id):
            # This run created it on an earlier try (e.g. the task died right after the insert).
            return CreatedJob(
                existing["_id"], existing["task_count"], existing["batch_count"], False
            )
        if running:
            _refuse_takeover(existing, run_active)
        # A job named to resume, or this run's own job again after an operator cleared the run.
        changes = resume_changes(existing, request)
        return _resume(
            store,
            existing,
            dag_id=dag_id,
            run_id=run_id,
            at=at,
            triggered_by=triggered_by,
            changes=changes,
        )

    history: list[dict[str, Any]] = []
    if (retry_of := request.retry_of) is not None:
        request, changes = redrive_request(store, request, service)
        if changes:
            history.append(documents.redriven(retry_of, triggered_by, at, changes))
    task_ids = select_tasks(store, request, timeout_s=selection_timeout_s)
    # A filter may match more than one job takes (the nightly backlog): say what is left.
    left_over = (
        count_matching(store.tasks, request.filter, timeout_s=selection_timeout_s) - len(task_ids)
        if request.filter is not None
        else 0
    )
    job_id = request.job_id or new_job_id(dag_id, run_id, at)
    cap = backlog_cap(request.filter)
    backlog = (
        {"max_attempts": cap, "skipped": store.count_tasks(skip_queries(cap))}
        if cap is not None
        else None
    )

    batches = batch_count(len(task_ids))
    store.insert_job(
        documents.new_job(
            job_id,
            task_ids=task_ids,
            batch_count=batches,
            params=request.to_document(),
            source=origin,
            triggered_by=triggered_by,
            dag_id=dag_id,
            run_id=run_id,
            left_over=left_over,
            backlog=backlog,
            at=at,
            history=history,
        )
    )
    log.info(
        "job_id=%s created: tasks=%d batches=%d source=%s run_id=%s; %d more tasks match the "
        "selection and are left for a later job",
        job_id,
        len(task_ids),
        batches,
        origin,
        run_id,
        left_over,
    )
    return CreatedJob(job_id, len(task_ids), batches, False)


def estimate_request(
    store: JobStore,
    conf: Mapping[str, Any],
    service: LLMService,
    *,
    selection_timeout_s: float = SELECTION_TIMEOUT_S,
) -> CostEstimate:
    """Validate and resolve the request like `create_job`, and estimate it; write nothing."""
    request = checked_request(conf, service)
    if request.retry_of is not None:
        request, _ = redrive_request(store, request, service)
    task_ids = select_tasks(store, request, timeout_s=selection_timeout_s)
    return estimate_job(
        store,
        task_ids,
        instructions=request.instructions,
        model=request.model,
        service=service,
        llm_params=request.llm_params,
    )


def checked_request(conf: Mapping[str, Any], service: LLMService) -> JobRequest:
    """Return the request `conf` describes, if `service` can send what it asks; no I/O."""
    request = parse_job_request(conf)
    problems = service.llm_params_problems(request.llm_params)
    if problems:
        raise InvalidJobRequest(problems)
    return request


def select_tasks(store: JobStore, request: JobRequest, *, timeout_s: float) -> list[Any]:
    """Return the ids the request selects, each of which travels under its own wire id."""
    task_ids = (
        redrive_selection(store, request)
        if request.retry_of is not None
        else resolve_selection(store.tasks, request, timeout_s=timeout_s)
    )
    refuse_colliding_ids(task_ids)
    return task_ids


def redrive_request(
    store: JobStore, request: JobRequest, service: LLMService
) -> tuple[JobRequest, dict[str, dict[str, Any]]]:
    """Return a re-drive's request with the earlier job's question, and what it asks otherwise.

    Each of `REDRIVE_INHERITS` left empty or at its default takes the earlier job's value (the
    rule a resume follows). One given explicitly wins: the changes are returned as
    `{name: {"from", "to"}}`, to be recorded on the new job.
    """
    assert request.retry_of is not None
    earlier = store.get_job(request.retry_of)
    if earlier is None:
        return request, {}  # redrive_selection says there is no such job
    stored = earlier.get("params") or {}
    inherited = {
        name: stored[name]
        for name in REDRIVE_INHERITS
        if not _given(name, getattr(request, name)) and stored.get(name) is not None
    }
    changes = {
        name: {"from": stored.get(name, default_of(name)), "to": value}
        for name in REDRIVE_INHERITS
        if name not in inherited
        and _given(name, value := getattr(request, name))
        and value != stored.get(name, default_of(name))
    }
    if changes:
        log.warning(
            "re-drive of job %s asks otherwise than it did: %s",
            request.retry_of,
            ", ".join(f"{k} {v['from']!r} -> {v['to']!r}" for k, v in changes.items()),
        )
    redrive = dataclasses.replace(request, **inherited)
    problems = service.llm_params_problems(redrive.llm_params)
    if problems:
        raise InvalidJobRequest(problems)
    return redrive, changes


def redrive_selection(store: JobStore, request: JobRequest) -> list[Any]:
    """Return the failed (and, if asked, needs-review) tasks of `request.retry_of`, in its order."""
    assert request.retry_of is not None
    earlier = store.get_job(request.retry_of, with_task_ids=True)
    if earlier is None:
        raise InvalidJobRequest(
            [f"retry_of: there is no job {request.retry_of!r}; check the id (llm-batch history)"]
        )
    statuses = [ResultStatus.FAILED.value]
    if request.include_needs_review:
        statuses.append(ResultStatus.NEEDS_REVIEW.value)
    chosen = {
        doc["task_id"]
        for doc in store.results.find(
            {"job_id": request.retry_of, "status": {"$in": statuses}}, {"task_id": 1}
        )
    }
    task_ids = [t for t in earlier["task_ids"] if t in chosen][: request.limit]
    if not task_ids:
        raise InvalidJobRequest(
            [f"job {request.retry_of} has no {' or '.join(statuses)} tasks to re-drive"]
        )
    return task_ids


def resume_changes(job: Mapping[str, Any], request: JobRequest) -> dict[str, dict[str, Any]]:
    """Return the params a resume changes, as `{name: {"from", "to"}}`.

    A field left empty or at its default keeps the job's value. Raises `InvalidJobRequest`
    when the request would change the question (`RESUME_KEEPS`), the delivery or the selection.
    """
    job_id, stored = job["_id"], job.get("params") or {}
    problems = [
        f"{name} cannot change when resuming job {job_id} (it has {stored.get(name)!r}, the "
        f"request {value!r}): its answers so far answer the job's own {name}, and a new one "
        "would mix answers to two questions in one job. Leave it empty to resume (the job "
        "keeps its own), or submit a new job"
        for name in RESUME_KEEPS
        if _given(name, value := getattr(request, name)) and value != stored.get(name)
    ]
    # A job switched between sync and provider-batch delivery could have both send its tasks.
    delivery = request.delivery
    if _given("delivery", delivery) and delivery != stored.get("delivery", default_of("delivery")):
        problems.append(
            f"delivery cannot change when resuming job {job_id} (it has "
            f"{stored.get('delivery')!r}, the request {delivery!r}): a provider batch it "
            "submitted may still hold its tasks, and the other delivery would send them again. "
            "Leave it at its default to resume, or submit a new job"
        )
    selection = _changed_selection(stored, request)
    if selection:
        problems.append(
            f"the selection cannot change when resuming job {job_id} ({', '.join(selection)} "
            f"differ from the job's): it keeps the {job.get('task_count')} tasks it selected. "
            "Resume with its own selection or with all tasks ({} / --all), or submit a new job "
            "for other tasks"
        )
    if problems:
        raise InvalidJobRequest(problems)
    return {
        name: {"from": stored.get(name, default_of(name)), "to": value}
        for name in RESUME_MAY_CHANGE
        if _given(name, value := getattr(request, name))
        and value != stored.get(name, default_of(name))
    }


def _changed_selection(stored: Mapping[str, Any], request: JobRequest) -> list[str]:
    """Return the selecting fields the request gives otherwise than the job has them."""
    changed = []
    if request.task_ids is not None and list(request.task_ids) != stored.get("task_ids"):
        changed.append("task_ids")
    # An empty filter stands for "all of the job's tasks" (the CLI's --all).
    if request.filter not in (None, {}) and request.filter != stored.get("filter"):
        changed.append("filter")
    # Not `limit`: the job's tasks are a snapshot, and the form always sends its own limit.
    changed += [
        name
        for name in ("retry_of", "include_needs_review")
        if _given(name, value := getattr(request, name)) and value != stored.get(name)
    ]
    return changed


def _given(name: str, value: Any) -> bool:
    """Return whether a request field was filled in: neither empty nor its default."""
    return value is not None and value != default_of(name)


def _refuse_takeover(job: Mapping[str, Any], run_active: Callable[[str, str], bool] | None) -> None:
    """Refuse to resume a job whose run still works on it; allow it once that run has ended."""
    job_id, dag_id, run_id = job["_id"], job.get("dag_id"), job.get("run_id")
    if run_active is not None and dag_id and run_id and not run_active(dag_id, run_id):
        log.warning(
            "job_id=%s is still %s but its run %s has ended without closing it: resuming",
            job_id,
            job["state"],
            run_id,
        )
        return
    raise InvalidJobRequest(
        [
            f"job {job_id} is still {job['state']} under run {run_id} of DAG {dag_id}; "
            "resuming it now would have two runs send the same batches. Wait for that run to "
            f"end, or stop it first (mark run {run_id} failed in the Airflow UI, or "
            f"`llm-batch cancel {job_id}`) and resume once it has ended"
        ]
    )


def _resume(
    store: JobStore,
    job: dict[str, Any],
    *,
    dag_id: str,
    run_id: str,
    at: datetime,
    triggered_by: str | None = None,
    changes: Mapping[str, Mapping[str, Any]] | None = None,
) -> CreatedJob:
    """Reopen a job: tasks that were never answered become sendable again, answers stay."""
    job_id = job["_id"]
    cleared = store.delete_results(job_id, {"error.type": {"$in": sorted(RESUMABLE_ERROR_TYPES)}})
    store.reopen_job(job_id, dag_id, run_id, at, triggered_by, changes=changes)
    log.info(
        "job_id=%s resumed by run_id=%s: %d unanswered tasks reopened; params changed: %s",
        job_id,
        run_id,
        cleared,
        ", ".join(f"{k} {v['from']!r} -> {v['to']!r}" for k, v in (changes or {}).items())
        or "none",
    )
    return CreatedJob(job_id, job["task_count"], job["batch_count"], True)
