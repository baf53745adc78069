"""What the workspace pages show, read from MongoDB: job lists, daily figures, a job, the queue.

Plain pymongo over the data contract; every query here is served by an index that
`JobStore.ensure_indexes` creates (listed in the README's data contract).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from llm_batch.models import JobSource, JobState, ResultStatus
from llm_batch.store import JobStore
from llm_batch.workspace import latency

Document = dict[str, Any]

PAGE_SIZE = 25
QUEUE_PAGE_SIZE = 20
DEFAULT_CHART_DAYS = 30
MAX_CHART_DAYS = 366
SOURCES = {
    JobSource.UI.value: "trigger form (UI)",
    JobSource.CLI.value: "CLI",
    JobSource.API.value: "REST API",
    JobSource.SCHEDULED.value: "schedule",
    JobSource.BACKFILL.value: "backfill",
}
"""Where a job came from (`jobs.source`), and how the source filter names it."""
JOB_LIST_PROJECTION = {"task_ids": 0, "params.task_ids": 0, "runs": 0}
HISTOGRAM_BINS = 20
TERMINAL_STATUSES = [status.value for status in ResultStatus]


@dataclass(frozen=True)
class JobFilters:
    """The jobs page's filters, each optional."""

    state: str | None = None
    source: str | None = None
    model: str | None = None
    triggered_by: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    """Inclusive: jobs created on this day are in."""
    page: int = 1

    def query(self) -> Document:
        """Return the MongoDB query over `jobs` these filters mean."""
        query: Document = {}
        if self.state:
            query["state"] = self.state
        if self.source:
            query["source"] = self.source
        if self.model:
            query["params.model"] = None if self.model == "(default)" else self.model
        if self.triggered_by:
            query["triggered_by"] = self.triggered_by
        created: Document = {}
        if self.date_from:
            created["$gte"] = day_start(self.date_from)
        if self.date_to:
            created["$lt"] = day_start(self.date_to + timedelta(days=1))
        if created:
            query["timings.created_at"] = created
        return query

    def without_dates(self) -> bool:
        return self.date_from is None and self.date_to is None


def day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def aware(value: datetime | None) -> datetime | None:
    """Mongo hands back naive UTC datetimes unless the client is tz-aware."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def job_source(job: Mapping[str, Any]) -> str:
    """Return where a job came from, as the source filter names it."""
    return str(job.get("source") or "")


# jobs page


@dataclass(frozen=True)
class JobRow:
    job: Document
    counts: dict[str, int]
    answered: int
    cost_usd: float
    failure_rate: float | None
    source: str

    @property
    def running(self) -> bool:
        return not JobState(self.job["state"]).is_final


@dataclass(frozen=True)
class JobPage:
    rows: list[JobRow]
    total: int
    page: int
    pages: int


def list_jobs(store: JobStore, filters: JobFilters, page_size: int = PAGE_SIZE) -> JobPage:
    """Return one page of jobs, newest first, with live counts for those still running."""
    query = filters.query()
    total = store.jobs.count_documents(query)
    pages = max(1, math.ceil(total / page_size))
    page = min(max(1, filters.page), pages)
    cursor = (
        store.jobs.find(query, JOB_LIST_PROJECTION)
        .sort("timings.created_at", -1)
        .skip((page - 1) * page_size)
        .limit(page_size)
    )
    return JobPage([job_row(store, job) for job in cursor], total, page, pages)


def job_row(store: JobStore, job: Document) -> JobRow:
    """Return a job's figures; a running job's counts come from its results so far."""
    running = not JobState(job["state"]).is_final
    counts = {status: 0 for status in TERMINAL_STATUSES}
    counts.update(store.count_results(job["_id"]) if running else job.get("counts") or {})
    answered = sum(counts.values())
    cost = job.get("spent_usd") if running else job.get("cost_usd")
    failed = counts.get(ResultStatus.FAILED.value, 0)
    return JobRow(
        job=job,
        counts=counts,
        answered=answered,
        cost_usd=float(cost or 0.0),
        failure_rate=failed / answered if answered else None,
        source=job_source(job),
    )


@dataclass
class DailySeries:
    """The charts over the selected range, one value per day (None: no data that day)."""

    days: list[date]
    cost_usd: list[float] = field(default_factory=list)
    tasks_by_status: dict[str, list[int]] = field(default_factory=dict)
    failure_rate: list[float | None] = field(default_factory=list)
    latency_p50_ms: list[float | None] = field(default_factory=list)
    latency_p95_ms: list[float | None] = field(default_factory=list)
    models: list[str] = field(default_factory=list)
    """The models of the jobs in the range (the model filter's menu)."""
    people: list[str] = field(default_factory=list)
    """Who triggered the jobs in the range (the triggered-by filter's menu)."""


def chart_range(
    store: JobStore, filters: JobFilters, today: date | None = None
) -> tuple[date, date]:
    """Return the charts' first and last day: the filter's dates, else the last 30 days of data."""
    today = today or datetime.now(UTC).date()
    last = filters.date_to
    if last is None:
        newest = store.jobs.find_one(
            filters.query(), {"timings.created_at": 1}, sort=[("timings.created_at", -1)]
        )
        created = aware((newest or {}).get("timings", {}).get("created_at"))
        last = created.date() if created else today
    first = filters.date_from or last - timedelta(days=DEFAULT_CHART_DAYS - 1)
    first = max(first, last - timedelta(days=MAX_CHART_DAYS - 1))
    return first, last


def daily_series(store: JobStore, filters: JobFilters) -> DailySeries:
    """Sum the matching jobs per day they were created, and their requests' latency per day."""
    first, last = chart_range(store, filters)
    days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
    index = {day: i for i, day in enumerate(days)}
    ranged = JobFilters(**{**filters.__dict__, "date_from": first, "date_to": last, "page": 1})
    series = DailySeries(days=days)
    cost = [0.0] * len(days)
    by_status = {status: [0] * len(days) for status in TERMINAL_STATUSES}
    job_ids: set[str] = set()
    models: set[str] = {filters.model} if filters.model else set()
    people: set[str] = {filters.triggered_by} if filters.triggered_by else set()
    projection = {
        "timings.created_at": 1,
        "counts": 1,
        "cost_usd": 1,
        "spent_usd": 1,
        "state": 1,
        "params.model": 1,
        "triggered_by": 1,
    }
    for job in store.jobs.find(ranged.query(), projection):
        created = aware(job["timings"]["created_at"])
        assert created is not None
        i = index[created.date()]
        job_ids.add(job["_id"])
        model = (job.get("params") or {}).get("model")
        models.add("(default)" if model is None else str(model))
        if job.get("triggered_by"):
            people.add(str(job["triggered_by"]))
        final = JobState(job["state"]).is_final
        cost[i] += float((job.get("cost_usd") if final else job.get("spent_usd")) or 0.0)
        for status, n in (job.get("counts") or {}).items():
            if status in by_status:
                by_status[status][i] += int(n)
    series.cost_usd = cost
    series.tasks_by_status = by_status
    series.models, series.people = sorted(models), sorted(people)
    for i in range(len(days)):
        done = sum(by_status[status][i] for status in TERMINAL_STATUSES)
        failed = by_status[ResultStatus.FAILED.value][i]
        series.failure_rate.append(failed / done if done else None)
    histograms = latency.daily_histograms(store, days)
    wanted = None if _only_dates(filters) else job_ids
    for day in days:
        merged = latency.merged(histograms.get(day, {}), wanted)
        series.latency_p50_ms.append(latency.percentile(merged, 0.50))
        series.latency_p95_ms.append(latency.percentile(merged, 0.95))
    return series


def _only_dates(filters: JobFilters) -> bool:
    return not (filters.state or filters.source or filters.model or filters.triggered_by)


# one job


@dataclass(frozen=True)
class BatchSpan:
    batch_no: int
    state: str
    started_at: datetime | None
    finished_at: datetime | None
    try_number: int
    requests: int
    retried: bool
    last_error: Document | None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class JobDetail:
    row: JobRow
    params: Document
    errors: list[Document]
    batches: list[BatchSpan]
    confidence_bins: list[int]
    confidence_missing: int
    review_below: float | None
    requests: int


def job_detail(store: JobStore, job_id: str) -> JobDetail | None:
    """Return everything the job page shows, or None if there is no such job."""
    job = store.jobs.find_one({"_id": job_id}, {"task_ids": 0})
    if job is None:
        return None
    params = dict(job.get("params") or {})
    requests_per_batch: Counter[int] = Counter()
    for call in store.llm_calls.find({"job_id": job_id}, {"_id": 0, "batch_no": 1}):
        requests_per_batch[int(call.get("batch_no") or 0)] += 1
    batches = [
        BatchSpan(
            batch_no=int(doc["batch_no"]),
            state=str(doc.get("state")),
            started_at=aware(doc.get("started_at")),
            finished_at=aware(doc.get("finished_at")),
            try_number=int(doc.get("try_number") or 1),
            requests=requests_per_batch.get(int(doc["batch_no"]), 0),
            retried=int(doc.get("try_number") or 1) > 1
            or requests_per_batch.get(int(doc["batch_no"]), 0) > 1,
            last_error=doc.get("last_error"),
        )
        for doc in store.batches.find({"job_id": job_id}).sort("batch_no", 1)
    ]
    bins = [0] * HISTOGRAM_BINS
    missing = 0
    for doc in store.results.find({"job_id": job_id}, {"_id": 0, "confidence": 1}):
        value = doc.get("confidence")
        if value is None:
            missing += 1
            continue
        bins[min(HISTOGRAM_BINS - 1, max(0, int(float(value) * HISTOGRAM_BINS)))] += 1
    return JobDetail(
        row=job_row(store, job),
        params=params,
        errors=store.top_errors(job_id, limit=50),
        batches=batches,
        confidence_bins=bins,
        confidence_missing=missing,
        review_below=params.get("review_below"),
        requests=sum(requests_per_batch.values()),
    )


def job_progress(store: JobStore, job_id: str) -> Document | None:
    """Return a job's live progress: answered of total, and its state."""
    job = store.jobs.find_one({"_id": job_id}, {"state": 1, "task_count": 1})
    if job is None:
        return None
    answered = store.results.count_documents({"job_id": job_id})
    return {
        "job_id": job_id,
        "state": job["state"],
        "answered": answered,
        "total": int(job.get("task_count") or 0),
        "final": JobState(job["state"]).is_final,
    }


EXPORT_FIELDS = ("task_id", "status", "output", "confidence", "error", "model", "updated_at")


def iter_results(store: JobStore, job_id: str) -> Iterator[Document]:
    """Yield the job's results one by one, in task order of their batches."""
    projection = {name: 1 for name in (*EXPORT_FIELDS, "batch_no", "original_output", "review")}
    yield from store.results.find({"job_id": job_id}, projection).sort("_id", 1).batch_size(500)


# review queue


@dataclass(frozen=True)
class QueueFilters:
    job_id: str | None = None
    model: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    reviewed: bool = False
    """False: answers waiting for review (oldest first); True: recent decisions (newest first)."""
    page: int = 1

    def query(self) -> Document:
        # Both are ranges or equalities over an indexed field: the index narrows the scan.
        query: Document = (
            {"review.at": {"$gte": datetime(1970, 1, 1, tzinfo=UTC)}}
            if self.reviewed
            else {"status": ResultStatus.NEEDS_REVIEW.value}
        )
        if self.job_id:
            query["job_id"] = self.job_id
        if self.model:
            query["model"] = self.model
        confidence: Document = {}
        if self.min_confidence is not None:
            confidence["$gte"] = self.min_confidence
        if self.max_confidence is not None:
            confidence["$lte"] = self.max_confidence
        if confidence:
            query["confidence"] = confidence
        return query


@dataclass(frozen=True)
class QueueItem:
    result: Document
    task_input: Any
    instructions: str | None


@dataclass(frozen=True)
class QueuePage:
    items: list[QueueItem]
    total: int
    page: int
    pages: int
    models: list[str]
    """The models of the matching answers (the model filter's menu)."""


def review_queue(
    store: JobStore, filters: QueueFilters, page_size: int = QUEUE_PAGE_SIZE
) -> QueuePage:
    """Return one page of the queue, with each task's input and its job's instructions.

    The matching results are listed once with a few fields (the index narrows them to the
    queue), ordered here, and only the page's own results are read whole.
    """
    keys = list(store.results.find(filters.query(), {"updated_at": 1, "review.at": 1, "model": 1}))
    if filters.reviewed:
        keys.sort(key=lambda r: (r["review"]["at"], r["_id"]), reverse=True)
    else:
        keys.sort(key=lambda r: (r["updated_at"], r["_id"]))
    total = len(keys)
    pages = max(1, math.ceil(total / page_size))
    page = min(max(1, filters.page), pages)
    chosen = [r["_id"] for r in keys[(page - 1) * page_size : page * page_size]]
    by_id = {r["_id"]: r for r in store.results.find({"_id": {"$in": chosen}})} if chosen else {}
    results = [by_id[rid] for rid in chosen if rid in by_id]
    inputs = store.task_payloads([r["task_id"] for r in results]) if results else {}
    jobs = {
        job["_id"]: (job.get("params") or {}).get("instructions")
        for job in store.jobs.find(
            {"_id": {"$in": sorted({r["job_id"] for r in results})}}, {"params.instructions": 1}
        )
    }
    items = [QueueItem(r, inputs.get(r["task_id"]), jobs.get(r["job_id"])) for r in results]
    models = {str(r["model"]) for r in keys if r.get("model")}
    if filters.model:
        models.add(filters.model)
    return QueuePage(items, total, page, pages, sorted(models))
