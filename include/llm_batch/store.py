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

from llm_batch import config
from llm_batch.batching import batch_bounds, batch_id, result_id
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
    """Cost of the job's billed requests so far (kept on the job document as they happen)."""

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
        self.billed_keys = db[config.BILLED_KEYS]

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
        self, job_id: str, run_id: str, at: datetime, triggered_by: str | None = None
    ) -> None:
        """Mark a job running again under a new run, clearing any earlier stop."""
        self.jobs.update_one(
            {"_id": job_id},
            {
                "$set": {
                    "state": JobState.RUNNING.value,
                    "abort": None,
                    "cancel": None,
                    "run_id": run_id,
                    "triggered_by": triggered_by,
                    "timings.started_at": at,
                    "timings.finished_at": None,
                },
                "$addToSet": {"runs": run_id},
            },
        )

    def load_batch(self, job_id: str, batch_no: int) -> BatchWork:
        start, _ = batch_bounds(batch_no)
        job = self.jobs.find_one(
            {"_id": job_id},
            {
                "task_ids": {"$slice": [start, config.BATCH_SIZE]},
                "params": 1,
                "abort": 1,
                "cancel": 1,
                "spent_usd": 1,
            },
        )
        if job is None:
            raise LookupError(f"job {job_id!r} does not exist in {self.jobs.full_name}")
        params = job.get("params") or {}
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
            max_cost_usd=params.get("max_cost_usd"),
            spent_usd=float(job.get("spent_usd") or 0.0),
        )

    def add_spend(self, job_id: str, cost_usd: float) -> None:
        """Add a billed request's cost to the job's running total (atomic across workers)."""
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

    def set_last_results(self, results: Iterable[Document]) -> int:
        """Copy each result onto its source task as `last_result`."""
        ops = [
            UpdateOne(
                {"_id": result["task_id"]},
                {
                    "$set": {
                        "last_result": {
                            "job_id": result["job_id"],
                            "status": result["status"],
                            "output": result.get("output"),
                            "error": result.get("error"),
                            "finished_at": result["updated_at"],
                        }
                    }
                },
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

    def finished_task_ids(self, job_id: str, task_ids: Sequence[Any]) -> set[Any]:
        """Return which of these tasks already have a result in the job."""
        ids = [result_id(job_id, task_id) for task_id in task_ids]
        cursor = self.results.find({"_id": {"$in": ids}}, {"task_id": 1})
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

    def record_call(self, call: Document) -> None:
        self.llm_calls.insert_one(call)

    def claim_billing(self, idempotency_key: str | None) -> bool:
        """Claim the one record that counts an idempotency key's usage; False if taken.

        Atomic across workers: the first insert of the key wins, any later one (a replay, or a
        racing retry of the same request) gets a duplicate-key error.
        """
        if idempotency_key is None:
            return True
        try:
            self.billed_keys.insert_one({"_id": idempotency_key})
        except DuplicateKeyError:
            return False
        return True

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
