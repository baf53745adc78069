"""MongoDB access for the data contract: `tasks`, `jobs`, `batches`, `results`, `llm_calls`.

Every write is idempotent so a retried Airflow task can repeat it safely: results are
inserted once per (job, task) and never overwritten by a later attempt.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from llm_batch import config, documents
from llm_batch.backlog import ATTEMPTS_FIELD
from llm_batch.batching import batch_bounds, batch_id, result_id, split_into_batches
from llm_batch.models import FINAL_JOB_STATES, JobState

log = logging.getLogger(__name__)

Document = dict[str, Any]

JOB_SUMMARY_PROJECTION = {"task_ids": 0}
"""The job document without its task id snapshot (up to 5000 ids)."""


@dataclass(frozen=True)
class BatchWork:
    """What one batch task needs from its job: the request settings and its task ids."""

    job_id: str
    batch_no: int
    task_ids: list[Any]
    instructions: str | None
    model: str | None
    llm_params: dict[str, Any]
    abort: Document | None
    use_cache: bool = True
    """Whether stored answers may answer this job's tasks (job param `use_cache`)."""
    cancel: Document | None = None
    """Set when an operator cancelled the job: send nothing more."""
    review_below: float | None = None
    max_cost_usd: float | None = None
    spent_usd: float = 0.0
    """Cost of the job's billed requests so far: with a budget, summed from `llm_calls`."""
    retry_of: str | None = None
    include_needs_review: bool = False
    cache_below_review: bool = False
    """Whether cached answers that need review may answer this job's tasks (see `cache`)."""

    @property
    def budget_spent(self) -> bool:
        return self.max_cost_usd is not None and self.spent_usd >= self.max_cost_usd


class JobStore:
    """The pipeline's reads and writes, over one database."""

    def __init__(self, db: Database[Document]) -> None:
        self.db = db
        self.tasks = db[config.TASKS]
        self.jobs = db[config.JOBS]
        self.batches = db[config.BATCHES]
        self.results = db[config.RESULTS]
        self.llm_calls = db[config.LLM_CALLS]

    def ensure_indexes(self) -> None:
        """Create the indexes the pipeline and analysts' queries need (idempotent)."""
        self.jobs.create_indexes(
            [
                IndexModel([("state", ASCENDING), ("timings.created_at", DESCENDING)]),
                IndexModel([("timings.created_at", DESCENDING)]),
                IndexModel([("dag_id", ASCENDING), ("run_id", ASCENDING)]),
            ]
        )
        self.batches.create_indexes([IndexModel([("job_id", ASCENDING), ("batch_no", ASCENDING)])])
        self.results.create_indexes(
            [
                IndexModel([("job_id", ASCENDING), ("status", ASCENDING)]),
                IndexModel([("task_id", ASCENDING), ("updated_at", DESCENDING)]),
                # The review queue: answers waiting, oldest first; decisions, newest first.
                IndexModel([("status", ASCENDING), ("updated_at", ASCENDING)]),
                IndexModel([("review.at", DESCENDING)]),
            ]
        )
        self.llm_calls.create_indexes(
            [
                IndexModel([("job_id", ASCENDING), ("batch_no", ASCENDING)]),
                IndexModel([("idempotency_key", ASCENDING)]),
                IndexModel([("at", DESCENDING)]),
            ]
        )

    # jobs

    def insert_job(self, job: Document) -> None:
        """Insert a new job in one write: its task id snapshot travels inside the document."""
        self.jobs.insert_one(job)

    def get_job(self, job_id: str, *, with_task_ids: bool = False) -> Document | None:
        projection = None if with_task_ids else JOB_SUMMARY_PROJECTION
        return self.jobs.find_one({"_id": job_id}, projection)

    def job_of_run(self, dag_id: str, run_id: str) -> Document | None:
        """Return the job that this Airflow run works on, or None."""
        return self.jobs.find_one({"dag_id": dag_id, "run_id": run_id}, JOB_SUMMARY_PROJECTION)

    def update_job(self, job_id: str, fields: Mapping[str, Any]) -> Document | None:
        return self.jobs.find_one_and_update(
            {"_id": job_id},
            {"$set": dict(fields)},
            projection=JOB_SUMMARY_PROJECTION,
            return_document=ReturnDocument.AFTER,
        )

    def abort_job(self, job_id: str, error_type: str, message: str, at: datetime) -> None:
        """Record why the job must stop; the first reason wins."""
        self.jobs.update_one(
            {"_id": job_id, "abort": None},
            {"$set": {"abort": {"type": error_type, "message": message, "at": at}}},
        )

    def reopen_job(
        self,
        job_id: str,
        dag_id: str,
        run_id: str,
        at: datetime,
        triggered_by: str | None = None,
        *,
        changes: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """Mark a job running again under a new run (of `dag_id`), clearing any earlier stop.

        The run is recorded with its DAG: a job made by one DAG may be resumed from another,
        and whether its run still works is asked of the DAG that runs it now.

        `changes` (`{param: {"from", "to"}}`) are applied to the job's `params`; the resume is
        added to its `history` with who, when and what changed.
        """
        changes = dict(changes or {})
        self.jobs.update_one(
            {"_id": job_id},
            {
                "$set": {
                    "state": JobState.RUNNING.value,
                    "abort": None,
                    "cancel": None,
                    "dag_id": dag_id,
                    "run_id": run_id,
                    "triggered_by": triggered_by,
                    "timings.started_at": at,
                    "timings.finished_at": None,
                    **{f"params.{name}": change["to"] for name, change in changes.items()},
                },
                "$addToSet": {"runs": run_id},
                "$push": {"history": documents.resumed(run_id, triggered_by, at, changes)},
            },
        )

    def load_batch(self, job_id: str, batch_no: int) -> BatchWork:
        start, stop = batch_bounds(batch_no)
        job = self.jobs.find_one(
            {"_id": job_id},
            {
                "task_ids": {"$slice": [start, stop - start]},
                "params": 1,
                "abort": 1,
                "cancel": 1,
                "spent_usd": 1,
            },
        )
        if job is None:
            raise LookupError(f"job {job_id!r} does not exist in {self.jobs.full_name}")
        params = job.get("params") or {}
        budget = params.get("max_cost_usd")
        # The running total on the job document may lag the audit trail after a failed write;
        # a budget is held against the trail itself.
        spent = self.job_spend(job_id) if budget is not None else job.get("spent_usd")
        return BatchWork(
            job_id=job_id,
            batch_no=batch_no,
            task_ids=list(job.get("task_ids") or []),
            instructions=params.get("instructions"),
            model=params.get("model"),
            llm_params=dict(params.get("llm_params") or {}),
            abort=job.get("abort"),
            use_cache=params.get("use_cache", True) is not False,
            cancel=job.get("cancel"),
            review_below=params.get("review_below"),
            max_cost_usd=budget,
            spent_usd=float(spent or 0.0),
            retry_of=params.get("retry_of"),
            include_needs_review=bool(params.get("include_needs_review")),
            cache_below_review=bool(params.get("cache_below_review")),
        )

    def add_spend(self, job_id: str, cost_usd: float) -> None:
        """Add a billed request's cost to the job's running total, shown while it runs.

        A view only: a failure before it leaves the total short, never the audit trail
        (`job_spend`), which budgets are held against and `reconcile` copies back.
        """
        if cost_usd:
            self.jobs.update_one({"_id": job_id}, {"$inc": {"spent_usd": cost_usd}})

    def request_cancel(self, job_id: str, at: datetime, by: str) -> bool:
        """Ask a job to stop sending; return False if it has already ended or is unknown."""
        final = [state.value for state in FINAL_JOB_STATES]
        updated = self.jobs.update_one(
            {"_id": job_id, "state": {"$nin": final}, "cancel": None},
            {"$set": {"cancel": {"at": at, "by": by}}},
        )
        return updated.modified_count == 1

    # tasks

    def task_payloads(self, task_ids: Sequence[Any]) -> dict[Any, Any]:
        """Return `{_id: payload}` for the tasks that still exist."""
        cursor = self.tasks.find({"_id": {"$in": list(task_ids)}}, {"payload": 1})
        return {doc["_id"]: doc.get("payload") for doc in cursor}

    def count_tasks(self, queries: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
        """Return, per name, how many tasks match its query."""
        return {name: self.tasks.count_documents(dict(query)) for name, query in queries.items()}

    def add_auto_attempt(self, job_id: str, task_ids: Sequence[Any]) -> None:
        """Count a backlog job's attempt on these tasks (once per job, however often re-run)."""
        for chunk in split_into_batches(task_ids, config.LOOKUP_CHUNK):
            self.tasks.update_many({"_id": {"$in": chunk}}, {"$addToSet": {ATTEMPTS_FIELD: job_id}})

    def set_last_results(self, results: Iterable[Document]) -> int:
        """Copy each result onto its source task as `last_result`."""
        ops = [
            UpdateOne(
                {"_id": result["task_id"]},
                {"$set": {"last_result": documents.last_result(result)}},
            )
            for result in results
        ]
        if not ops:
            return 0
        return self.tasks.bulk_write(ops, ordered=False).matched_count

    # batches

    def mark_batch(self, job_id: str, batch_no: int, fields: Mapping[str, Any]) -> None:
        """Record a batch's progress (state, try, worker, last error) for operators."""
        self.batches.update_one(
            {"_id": batch_id(job_id, batch_no)},
            {"$set": {"job_id": job_id, "batch_no": batch_no, **fields}},
            upsert=True,
        )

    def batch_errors(self, job_id: str) -> dict[int, Document]:
        """Return `{batch_no: last_error}` for the job's batches that recorded one."""
        cursor = self.batches.find(
            {"job_id": job_id, "last_error": {"$ne": None}}, {"batch_no": 1, "last_error": 1}
        )
        return {doc["batch_no"]: doc["last_error"] for doc in cursor}

    # results

    def finished_task_ids(
        self, job_id: str, task_ids: Sequence[Any], status: str | None = None
    ) -> set[Any]:
        """Return which of these tasks already have a result in the job (with `status`)."""
        ids = [result_id(job_id, task_id) for task_id in task_ids]
        query: Document = {"_id": {"$in": ids}}
        if status is not None:
            query["status"] = status
        cursor = self.results.find(query, {"task_id": 1})
        return {doc["task_id"] for doc in cursor}

    def save_results(self, results: Sequence[Document]) -> int:
        """Insert results that don't exist yet; an existing result is never overwritten.

        Returns how many were new. Two writers racing on one task (a zombie and its retry)
        leave exactly one result: the first.
        """
        if not results:
            return 0
        ops = [
            UpdateOne({"_id": doc["_id"]}, {"$setOnInsert": doc}, upsert=True) for doc in results
        ]
        try:
            return self.results.bulk_write(ops, ordered=False).upserted_count
        except BulkWriteError as exc:
            # A concurrent upsert of the same _id loses with a duplicate key: the result exists.
            duplicates = [e for e in exc.details.get("writeErrors", []) if e.get("code") == 11000]
            if len(duplicates) != len(exc.details.get("writeErrors", [])):
                raise
            return int(exc.details.get("nUpserted", 0))

    def job_results(
        self, job_id: str, projection: Mapping[str, Any] | None = None
    ) -> list[Document]:
        return list(self.results.find({"job_id": job_id}, projection))

    def delete_results(self, job_id: str, query: Mapping[str, Any]) -> int:
        return self.results.delete_many({"job_id": job_id, **query}).deleted_count

    def count_results(self, job_id: str) -> dict[str, int]:
        """Return `{status: count}` over the job's results."""
        pipeline: list[Document] = [
            {"$match": {"job_id": job_id}},
            {"$group": {"_id": "$status", "n": {"$sum": 1}}},
        ]
        return {doc["_id"]: doc["n"] for doc in self.results.aggregate(pipeline)}

    def top_errors(self, job_id: str, limit: int = 5) -> list[Document]:
        """Return the most frequent error types among the job's failed results, with an example."""
        pipeline: list[Document] = [
            {"$match": {"job_id": job_id, "error": {"$ne": None}}},
            {
                "$group": {
                    "_id": "$error.type",
                    "count": {"$sum": 1},
                    "example": {"$first": "$error.message"},
                }
            },
            {"$sort": {"count": -1, "_id": 1}},
            {"$limit": limit},
        ]
        return [
            {"type": doc["_id"], "count": doc["count"], "example": doc["example"]}
            for doc in self.results.aggregate(pipeline)
        ]

    # llm_calls

    def record_call(self, call: Document) -> Document:
        """Insert one HTTP attempt's record and return it as stored.

        A billed record is keyed by its idempotency key (`documents.billed_call_id`), so the
        record that counts a key's usage, cost included, is written in one insert, once: a
        later record of the same key (a replay, a racing retry, or this very write retried
        after an error that hid its success) is stored unbilled. Whatever fails, before or
        after the write, a retry counts the cost exactly once.
        """
        key = call.get("idempotency_key")
        if call["billed"] and key is not None:
            try:
                self.llm_calls.insert_one({"_id": documents.billed_call_id(key), **call})
                return call
            except DuplicateKeyError:
                call = documents.unbilled(call)
        self.llm_calls.insert_one(dict(call))
        return call

    def job_spend(self, job_id: str) -> float:
        """Return the cost of the job's billed requests, summed from its audit trail."""
        pipeline: list[Document] = [
            {"$match": {"job_id": job_id, "billed": True}},
            {"$group": {"_id": None, "cost_usd": {"$sum": "$cost_usd"}}},
        ]
        totals = next(iter(self.llm_calls.aggregate(pipeline)), None) or {}
        return float(totals.get("cost_usd", 0.0))

    def call_totals(self, job_id: str) -> Document:
        """Sum the job's audit trail: requests, billed usage and cost."""
        pipeline: list[Document] = [
            {"$match": {"job_id": job_id}},
            {
                "$group": {
                    "_id": None,
                    "requests": {"$sum": 1},
                    "input_tokens": {"$sum": "$usage.input_tokens"},
                    "output_tokens": {"$sum": "$usage.output_tokens"},
                    "cost_usd": {"$sum": "$cost_usd"},
                }
            },
        ]
        totals = next(iter(self.llm_calls.aggregate(pipeline)), None) or {}
        return {
            "requests": int(totals.get("requests", 0)),
            "usage": {
                "input_tokens": int(totals.get("input_tokens", 0)),
                "output_tokens": int(totals.get("output_tokens", 0)),
            },
            "cost_usd": round(float(totals.get("cost_usd", 0.0)), 6),
        }
