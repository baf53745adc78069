"""Deliver a job through the provider's batch API: pack, submit or re-attach, read back, reconcile.

A job's unanswered tasks are packed 10 per request exactly as the sync path sends them (the
adapter builds each body), one JSONL line per job batch, `custom_id` = `<job_id>:batch:<n>`.
The file is split when over the connection's limits; each part is one provider batch, tracked
in `provider_batches` under a key made of the job, the delivery round and a fingerprint of
the content. While a job has a provider batch not yet reconciled, every retry and resume
re-attaches to it: the same tasks are never submitted twice.

Reading the answers back is `provider_output.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from llm_batch import config, documents
from llm_batch.cache import ResponseCache
from llm_batch.estimate import Prices, payload_tokens
from llm_batch.models import ErrorType, ResultStatus
from llm_batch.processing import BatchRun, answer_from_cache, utcnow
from llm_batch.store import JobStore
from llm_hook.adapters import Adapter
from llm_hook.exceptions import LLMRequestError
from llm_hook.params import requested_max_tokens
from llm_hook.types import LLMTask

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
STATUS_ORDER = (
    "submitting", "validating", "in_progress", "finalizing", "cancelling",
    "expired", "cancelled", "failed", "completed",
)  # fmt: skip
"""The job shows the least advanced status of its provider batches."""
LIST_SLACK_S = 3600.0
"""How far before a tracking document's creation its batch is looked for (clock skew)."""


class BatchTransport(Protocol):
    """The provider's files and batches API (`llm_hook.batch_api.BatchApiClient` fits)."""

    def upload_file(self, content: bytes, filename: str) -> str: ...
    def create_batch(self, input_file_id: str, metadata: Mapping[str, str]) -> dict[str, Any]: ...
    def get_batch(self, batch_id: str) -> dict[str, Any]: ...
    def cancel_batch(self, batch_id: str) -> dict[str, Any]: ...
    def list_batches(self) -> Iterator[dict[str, Any]]: ...
    def file_content(self, file_id: str) -> bytes: ...


@dataclass(frozen=True)
class Connection:
    """What delivery needs from the LLM connection besides HTTP."""

    adapter: Adapter
    model: str
    endpoint: str
    prices: Prices
    """Batch prices."""
    max_requests_per_file: int
    max_file_bytes: int
    max_tokens_ceiling: int

    def scope(self, model: str | None) -> dict[str, str]:
        """Return the response cache's answer scope, as the sync client's `answer_scope`."""
        return {"adapter": self.adapter.name, "model": model or self.model}


@dataclass(frozen=True)
class RequestLine:
    """One request of the input file: a job batch's tasks still to answer."""

    custom_id: str
    batch_no: int
    task_ids: list[Any]
    data: bytes
    input_tokens: int


def custom_id(job_id: str, batch_no: int) -> str:
    return f"{job_id}:batch:{batch_no}"


def collection(store: JobStore) -> Any:
    return store.db[config.PROVIDER_BATCHES]


def active_batches(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    """Return the job's provider batches not yet reconciled, in part order."""
    query = {"job_id": job_id, "reconciled": False}
    return list(collection(store).find(query).sort([("round", 1), ("part", 1)]))


def pack(
    store: JobStore,
    conn: Connection,
    job_id: str,
    *,
    cache: ResponseCache | None = None,
    now: Callable[[], datetime] = utcnow,
) -> list[RequestLine]:
    """Return one request line per job batch with tasks to send.

    Tasks answered by the cache, or whose document vanished, get their result now, as the
    sync path gives it; a cancelled job packs nothing.
    """
    job = store.get_job(job_id) or {}
    lines: list[RequestLine] = []
    for batch_no in range(int(job.get("batch_count") or 0)):
        run = BatchRun(store, job_id, batch_no, 1, now)
        work = run.load_batch()
        if work.cancel:
            return []
        done = run.answered(work)
        todo = [task_id for task_id in work.task_ids if task_id not in done]
        if not todo:
            continue
        pending = run.read_inputs(todo)
        if cache is not None and work.use_cache:
            pending = answer_from_cache(cache, conn.scope(work.model), work, pending)
        if pending.vanished or pending.cached:
            run.save_results(work, pending, [], now())
        if not pending.to_send:
            run.mark(documents.batch_state("done", now()))
            continue
        tasks = [LLMTask(str(t), pending.payloads[t]) for t in pending.to_send]
        path, body = conn.adapter.build_request(
            tasks, work.model or conn.model, work.instructions, work.llm_params or None
        )
        cid = custom_id(job_id, batch_no)
        line = {"custom_id": cid, "method": "POST", "url": path, "body": body}
        data = json.dumps(line, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        # An upper bound: the service may bill the whole system prompt with every task.
        prompt = _system_text(body) or work.instructions
        tokens = sum(payload_tokens(t.input, prompt) for t in tasks)
        lines.append(RequestLine(cid, batch_no, list(pending.to_send), data.encode(), tokens))
    return lines


def _system_text(body: Mapping[str, Any]) -> str | None:
    """Return the system message of a chat body: what the service reads with every task."""
    for message in body.get("messages") or []:
        if isinstance(message, dict) and message.get("role") == "system":
            content = message.get("content")
            return content if isinstance(content, str) else None
    return None


def upper_bound_usd(lines: Sequence[RequestLine], conn: Connection, llm_params: Any) -> float:
    """Return the most the lines can cost: estimated input, every request at its output cap."""
    cap = requested_max_tokens(llm_params) or conn.max_tokens_ceiling
    return conn.prices.cost(sum(line.input_tokens for line in lines), cap * len(lines))


def within_budget(
    store: JobStore, job_id: str, lines: list[RequestLine], conn: Connection, now: datetime
) -> list[RequestLine]:
    """Return the lines whose upper-bound cost fits the job's budget; mark the others skipped."""
    job = store.get_job(job_id) or {}
    params = job.get("params") or {}
    budget = params.get("max_cost_usd")
    if budget is None:
        return lines
    # The audit trail, not `spent_usd` (a view that a failure may leave short).
    left = budget - store.job_spend(job_id)
    kept: list[RequestLine] = []
    for line in lines:
        if upper_bound_usd([*kept, line], conn, params.get("llm_params")) <= left:
            kept.append(line)
            continue
        message = (
            f"not sent: its upper-bound cost does not fit the budget of ${budget:g}; raise "
            f"max_cost_usd and resume (job_id={job_id})"
        )
        budget_spent = ErrorType.BUDGET_EXHAUSTED.value
        store.mark_batch(
            job_id, line.batch_no, documents.batch_ended("skipped", budget_spent, message, now)
        )
        store.save_results(
            [
                documents.placeholder_result(
                    job_id,
                    line.batch_no,
                    task_id,
                    ResultStatus.CANCELLED,
                    budget_spent,
                    message,
                    now,
                )
                for task_id in line.task_ids
            ]
        )
    if len(kept) < len(lines):
        log.warning(
            "job_id=%s: %d of %d requests fit the budget of $%g at their upper bound",
            job_id, len(kept), len(lines), budget,
        )  # fmt: skip
    return kept


def fingerprint(lines: Iterable[RequestLine]) -> str:
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.data + b"\n")
    return digest.hexdigest()


def split(
    lines: Sequence[RequestLine], max_requests: int, max_bytes: int
) -> list[list[RequestLine]]:
    """Split the lines into files within the provider's limits, in order."""
    parts: list[list[RequestLine]] = []
    size = 0
    for line in lines:
        grow = len(line.data) + 1
        if not parts or len(parts[-1]) >= max_requests or size + grow > max_bytes:
            parts.append([])
            size = 0
        parts[-1].append(line)
        size += grow
    return parts


def submit(
    store: JobStore,
    api: BatchTransport,
    conn: Connection,
    job_id: str,
    lines: list[RequestLine],
    *,
    now: Callable[[], datetime] = utcnow,
) -> list[dict[str, Any]]:
    """Submit the lines as one or more provider batches; return their tracking documents.

    Each part's tracking document is written before its upload, keyed by job, round and
    content: a try that dies between the provider's answer and the write finds the batch
    again by its metadata instead of creating a second one.
    """
    tracked = collection(store)
    done_rounds = tracked.distinct("round", {"job_id": job_id, "reconciled": True})
    round_no = max(done_rounds, default=-1) + 1
    content_fp = fingerprint(lines)
    parts = split(lines, conn.max_requests_per_file, conn.max_file_bytes)
    docs = []
    for part_no, part in enumerate(parts):
        key = f"{job_id}:r{round_no}:{content_fp[:16]}:{part_no}"
        at = now()
        written = tracked.update_one(
            {"_id": key},
            {
                "$setOnInsert": {
                    "job_id": job_id,
                    "round": round_no,
                    "fingerprint": content_fp,
                    "part": part_no,
                    "parts": len(parts),
                    "endpoint": conn.endpoint,
                    "provider_batch_id": None,
                    "status": "submitting",
                    "reconciled": False,
                    "requests": [
                        {"custom_id": x.custom_id, "batch_no": x.batch_no, "task_ids": x.task_ids}
                        for x in part
                    ],
                    "created_at": at,
                    "updated_at": at,
                }
            },
            upsert=True,
        )
        fresh = written.upserted_id is not None
        docs.append(_create_once(store, api, key, job_id, part, fresh=fresh))
    return docs


def attach_or_submit(
    store: JobStore,
    api: BatchTransport,
    conn: Connection,
    job_id: str,
    *,
    cache: ResponseCache | None = None,
    now: Callable[[], datetime] = utcnow,
) -> list[dict[str, Any]]:
    """Return the job's provider batches to wait for: those already submitted, else new ones."""
    active = [doc for doc in active_batches(store, job_id) if _submitted(store, api, doc)]
    if active:
        log.info(
            "job_id=%s: re-attaching to %d provider batch(es) already submitted: %s",
            job_id, len(active), [doc.get("provider_batch_id") for doc in active],
        )  # fmt: skip
        return active
    lines = pack(store, conn, job_id, cache=cache, now=now)
    job = store.get_job(job_id) or {}
    lines = within_budget(store, job_id, lines, conn, now())
    if not lines:
        log.info("job_id=%s: nothing to send through the provider's batch API", job_id)
        return []
    bound = upper_bound_usd(lines, conn, (job.get("params") or {}).get("llm_params"))
    log.info(
        "job_id=%s: submitting %d requests (%d tasks), at most $%.4f at batch prices",
        job_id, len(lines), sum(len(x.task_ids) for x in lines), bound,
    )  # fmt: skip
    return submit(store, api, conn, job_id, lines, now=now)


def _submitted(store: JobStore, api: BatchTransport, doc: dict[str, Any]) -> bool:
    """Return whether the provider has the batch of `doc`, recording its id if found late.

    A document without a batch id is the trace of a try that died around `create_batch`: if
    the provider has a batch carrying its key, that batch is the job's; if not, the document
    is dropped and the tasks are packed again.
    """
    if doc.get("provider_batch_id"):
        return True
    found = _find_by_key(api, doc["_id"], _aware(doc.get("created_at")))
    if found is None:
        collection(store).delete_one({"_id": doc["_id"], "provider_batch_id": None})
        return False
    doc.update(_record_created(store, doc["_id"], found))
    return True


def _find_by_key(api: BatchTransport, key: str, since: datetime | None) -> dict[str, Any] | None:
    """Return the provider's batch carrying `key` in its metadata, looking back to `since`."""
    oldest = since.timestamp() - LIST_SLACK_S if since is not None else 0.0
    for batch in api.list_batches():  # newest first
        if (batch.get("metadata") or {}).get("llm_batch_key") == key:
            return batch
        if float(batch.get("created_at") or 0) < oldest:
            return None
    return None


def _record_created(store: JobStore, key: str, batch: Mapping[str, Any]) -> dict[str, Any]:
    fields = {
        **_progress(batch),
        "provider_batch_id": batch["id"],
        "input_file_id": batch.get("input_file_id"),
    }
    collection(store).update_one({"_id": key}, {"$set": fields})
    return fields


def _create_once(
    store: JobStore,
    api: BatchTransport,
    key: str,
    job_id: str,
    part: list[RequestLine],
    *,
    fresh: bool,
) -> dict[str, Any]:
    """Create the provider batch of tracking document `key` unless the provider has it.

    A `fresh` document was written by this very try: no earlier try can have created its
    batch, so the provider's list is not searched.
    """
    doc = collection(store).find_one({"_id": key}) or {}
    if doc.get("provider_batch_id"):
        return doc
    found = None if fresh else _find_by_key(api, key, _aware(doc.get("created_at")))
    if found is None:
        content = b"".join(line.data + b"\n" for line in part)
        file_id = api.upload_file(content, f"{key.replace(':', '_')}.jsonl")
        try:
            found = api.create_batch(file_id, {"llm_batch_job": job_id, "llm_batch_key": key})
        except LLMRequestError:
            # A timeout or 5xx may come after the provider made the batch: never make a second.
            found = _find_by_key(api, key, _aware(doc.get("created_at")))
            if found is None:
                raise
            log.warning("job_id=%s: create of %s failed, but the provider has it", job_id, key)
        log.info("job_id=%s: provider batch %s created (%s)", job_id, found.get("id"), key)
    else:
        log.info("job_id=%s: provider batch %s found by its metadata", job_id, found.get("id"))
    return {**doc, **_record_created(store, key, found)}


def _progress(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "status": batch.get("status"),
        "request_counts": batch.get("request_counts"),
        "output_file_id": batch.get("output_file_id"),
        "error_file_id": batch.get("error_file_id"),
        "errors": batch.get("errors"),
        "updated_at": utcnow(),
    }


def record_progress(store: JobStore, job_id: str, batches: Sequence[Mapping[str, Any]]) -> str:
    """Store what the provider says of each batch; set and return the job's provider status."""
    tracked = collection(store)
    for batch in batches:
        tracked.update_one({"provider_batch_id": batch["id"]}, {"$set": _progress(batch)})
    return show_on_job(store, job_id)


def show_on_job(store: JobStore, job_id: str) -> str:
    """Set the job's `provider_batch` view (status, batches, counts) and return its status."""
    docs = list(collection(store).find({"job_id": job_id}).sort([("round", 1), ("part", 1)]))
    current = [doc for doc in docs if not doc["reconciled"]] or docs[-1:]
    statuses = [doc.get("status") or "submitting" for doc in current]
    status = min(statuses, key=STATUS_ORDER.index) if statuses else "none"
    view = {
        "status": status,
        "batches": [
            {
                "id": doc.get("provider_batch_id"),
                "round": doc["round"],
                "status": doc.get("status"),
                "request_counts": doc.get("request_counts"),
            }
            for doc in docs
        ],
    }
    store.update_job(job_id, {"provider_batch": view})
    return status


def cancel(store: JobStore, api: BatchTransport, job_id: str) -> int:
    """Ask the provider to cancel the job's pending batches; return how many were asked."""
    asked = 0
    for doc in active_batches(store, job_id):
        # One ask per batch: a batch already `cancelling` is on its way.
        if doc.get("provider_batch_id") and doc.get("status") not in {*TERMINAL, "cancelling"}:
            record_progress(store, job_id, [api.cancel_batch(doc["provider_batch_id"])])
            asked += 1
    if asked:
        log.warning("job_id=%s: cancel sent to %d provider batch(es)", job_id, asked)
    return asked


def _aware(value: Any) -> datetime | None:
    """Return a stored time as UTC-aware (pymongo reads naive UTC), or None."""
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def wants_sync_batches(job: Mapping[str, Any]) -> bool:
    """Return whether the job's mapped sync batches should run (see `plan_batches`)."""
    params = job.get("params") or {}
    if params.get("delivery", "sync") != "provider_batch":
        return True
    return (job.get("provider_batch") or {}).get("then") == "sync"
