"""Read a job's ended provider batches back into `results` and `llm_calls`, and say what next.

Reading back reuses the sync path: each output line's chat completion body goes through the
adapter's `parse_response` (unknown, missing, duplicate and malformed ids), its outcomes are
stored by `BatchRun.save_results` (review routing), `store_in_cache`, and one `llm_calls`
record per line through `BatchRun.record_call`, billed once per line at the batch price.
An expired or provider-cancelled batch's answers are kept; what it left unanswered is sent
once more (`next_step`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from llm_batch import documents
from llm_batch.cache import ResponseCache
from llm_batch.processing import BatchRun, store_in_cache, utcnow
from llm_batch.provider_batch import (
    TERMINAL,
    BatchTransport,
    Connection,
    active_batches,
    collection,
    record_progress,
    show_on_job,
)
from llm_batch.store import JobStore
from llm_hook.exceptions import LLMResponseError
from llm_hook.types import CallRecord, OutcomeStatus, TaskOutcome, Usage

log = logging.getLogger(__name__)

MAX_ROUNDS = 2
"""The first delivery, and one re-send of what an expired or cancelled batch left unanswered."""
PERMANENT_LINE_STATUSES = frozenset({400, 413, 422})
"""A line answered with one of these fails its tasks; any other error leaves them to a re-send."""


@dataclass
class Delivered:
    """What reading back a round did (small enough for XCom)."""

    lines: int = 0
    succeeded: int = 0
    failed: int = 0
    unanswered: int = 0
    unknown_lines: int = 0
    cost_usd: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_back(
    store: JobStore,
    api: BatchTransport,
    conn: Connection,
    job_id: str,
    *,
    cache: ResponseCache | None = None,
    now: Callable[[], datetime] = utcnow,
) -> Delivered:
    """Reconcile every ended, unreconciled provider batch of the job into results and calls."""
    delivered = Delivered()
    for doc in active_batches(store, job_id):
        batch = api.get_batch(doc["provider_batch_id"])
        record_progress(store, job_id, [batch])
        status = str(batch.get("status"))
        if status not in TERMINAL:
            raise RuntimeError(f"provider batch {batch['id']} is still {status}")
        delivered.statuses[status] = delivered.statuses.get(status, 0) + 1
        requests = {r["custom_id"]: r for r in doc["requests"]}
        seen: set[str] = set()
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if not file_id:
                continue
            for raw in api.file_content(file_id).splitlines():
                if raw.strip():
                    _read_line(store, conn, job_id, doc, raw, requests, seen, delivered, cache, now)
        if status == "failed":
            _mark_failed_validation(store, job_id, doc, batch, now())
        collection(store).update_one(
            {"_id": doc["_id"]}, {"$set": {"reconciled": True, "reconciled_at": now()}}
        )
    show_on_job(store, job_id)
    return delivered


def _read_line(
    store: JobStore,
    conn: Connection,
    job_id: str,
    doc: Mapping[str, Any],
    raw: bytes,
    requests: Mapping[str, Mapping[str, Any]],
    seen: set[str],
    delivered: Delivered,
    cache: ResponseCache | None,
    now: Callable[[], datetime],
) -> None:
    """Store the outcome of one output or error line as the sync path stores an answer."""
    try:
        line = json.loads(raw)
    except ValueError:
        delivered.unknown_lines += 1
        log.warning("job_id=%s: an output line of %s is not JSON (ignored)", job_id, doc["_id"])
        return
    cid = line.get("custom_id") if isinstance(line, dict) else None
    request = requests.get(cid) if isinstance(cid, str) else None
    if not isinstance(cid, str) or request is None or cid in seen:
        delivered.unknown_lines += 1
        log.warning("job_id=%s: output line for unknown or repeated custom_id %r", job_id, cid)
        return
    seen.add(cid)
    delivered.lines += 1
    batch_no = int(request["batch_no"])
    run = BatchRun(store, job_id, batch_no, 1, now)
    work = run.load_batch()
    sent = [str(t) for t in request["task_ids"]]
    # A task deleted while the provider worked ends `task_missing`, as on the sync path.
    pending = run.read_inputs(list(request["task_ids"]))
    response = line.get("response") or {}
    status_code = response.get("status_code") if isinstance(response, dict) else None
    model = work.model or conn.model
    usage, outcomes, error_type = Usage(), [], None
    if status_code == 200:
        try:
            parsed = conn.adapter.parse_response(response.get("body"), sent)
        except LLMResponseError as exc:
            error_type = "bad_body"
            outcomes = [_unanswered(t, error_type, str(exc), model) for t in sent]
        else:
            usage, model = parsed.usage, parsed.model or model
            outcomes = [_outcome(t, parsed.items[t], model) for t in sent]
    else:
        error = line.get("error") or (response.get("body") or {}).get("error") or {}
        error_type = str(error.get("code") or error.get("type") or f"http_{status_code}")
        message = str(error.get("message") or "the provider did not answer this request")
        permanent = status_code in PERMANENT_LINE_STATUSES
        outcomes = [
            TaskOutcome(
                t, OutcomeStatus.FAILED, error_type=error_type, error_message=message, model=model
            )
            if permanent
            else _unanswered(t, error_type, message, model)
            for t in sent
        ]
    present = {str(t) for t in pending.present}
    outcomes = [o for o in outcomes if o.task_id in present]
    call = CallRecord(
        endpoint=f"{conn.endpoint}/v1/batches/{doc['provider_batch_id']}",
        attempt=1,
        http_status=status_code if isinstance(status_code, int) else None,
        error_type=error_type,
        latency_ms=0,
        usage=usage,
        cost_usd=conn.prices.cost(usage.input_tokens, usage.output_tokens),
        task_ids=tuple(sent),
        model=model,
        idempotency_key=f"provider-batch:{doc['provider_batch_id']}:{cid}",
        at=now(),
    )
    run.record_call(call)
    at = now()
    run.save_results(work, pending, outcomes, at)
    if cache is not None and work.use_cache:
        store_in_cache(cache, conn.scope(work.model), work, pending, outcomes)
    statuses = Counter(o.status for o in outcomes)
    delivered.succeeded += statuses[OutcomeStatus.SUCCEEDED]
    delivered.failed += statuses[OutcomeStatus.FAILED] + len(pending.vanished)
    delivered.unanswered += statuses[OutcomeStatus.RETRYABLE]
    delivered.cost_usd += call.cost_usd
    if statuses[OutcomeStatus.RETRYABLE]:
        kinds = Counter(
            o.error_type or "unknown" for o in outcomes if o.status is OutcomeStatus.RETRYABLE
        )
        left = statuses[OutcomeStatus.RETRYABLE]
        message = f"provider batch left {left} task(s) unanswered: {dict(kinds)}"
        run.mark(documents.batch_ended("incomplete", kinds.most_common(1)[0][0], message, at))
    else:
        run.mark(documents.batch_ended("done", None, None, at))


def _outcome(task_id: str, item: Any, model: str) -> TaskOutcome:
    return TaskOutcome(
        task_id,
        item.status,
        output=item.output,
        confidence=item.confidence,
        usage=item.usage,
        error_type=item.error_type,
        error_message=item.error_message,
        model=model,
    )


def _unanswered(task_id: str, error_type: str, message: str, model: str) -> TaskOutcome:
    return TaskOutcome(
        task_id, OutcomeStatus.RETRYABLE, error_type=error_type, error_message=message, model=model
    )


def _mark_failed_validation(
    store: JobStore, job_id: str, doc: Mapping[str, Any], batch: Mapping[str, Any], at: datetime
) -> None:
    """Record on each job batch why a provider batch failed as a whole (validation)."""
    errors = (batch.get("errors") or {}).get("data") or []
    why = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors[:3]) or "no reason given"
    message = f"the provider batch {batch.get('id')} failed: {why}"
    for request in doc["requests"]:
        store.mark_batch(
            job_id,
            int(request["batch_no"]),
            documents.batch_ended("failed", "provider_batch_failed", message, at),
        )


def unanswered_count(store: JobStore, job_id: str) -> int:
    """Return how many of the job's tasks have no result yet."""
    job = store.get_job(job_id, with_task_ids=True) or {}
    answered = {doc["task_id"] for doc in store.job_results(job_id, {"task_id": 1})}
    return sum(1 for task_id in job.get("task_ids") or [] if task_id not in answered)


def next_step(store: JobStore, job_id: str, delivered: Delivered) -> str:
    """Return what follows a read-back: `done`, `resend` (a new provider batch) or `sync`."""
    job = store.get_job(job_id) or {}
    if job.get("cancel") or job.get("abort"):
        return "done"
    rounds = collection(store).distinct("round", {"job_id": job_id})
    if len(rounds) >= MAX_ROUNDS or set(delivered.statuses) <= {"failed"}:
        return "done"
    if not unanswered_count(store, job_id):
        return "done"
    resend_via = (job.get("params") or {}).get("resend_via") or "provider_batch"
    return "sync" if resend_via == "sync" else "resend"
