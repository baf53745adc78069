"""Run one batch: send its unfinished tasks to the LLM once and store every answer at once."""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from llm_batch import documents
from llm_batch.batching import idempotency_base
from llm_batch.cache import CachedAnswer, ResponseCache, answer_scope, below_review
from llm_batch.models import ErrorType, ResultStatus
from llm_batch.store import BatchWork, JobStore
from llm_hook.types import CallRecord, LLMTask, OutcomeStatus, TaskOutcome

log = logging.getLogger(__name__)


class Completer(Protocol):
    """What a batch needs from the LLM client (`llm_hook.LLMClient` satisfies it)."""

    def complete(
        self,
        tasks: Sequence[LLMTask],
        *,
        instructions: str | None = None,
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        on_call: Callable[[CallRecord], None] | None = None,
        before_send: Callable[[Sequence[str]], str | None] | None = None,
    ) -> list[TaskOutcome]: ...


class BatchIncomplete(RuntimeError):
    """Some tasks got no usable answer; retrying the batch sends only those."""


class JobAborted(RuntimeError):
    """The job was stopped (e.g. the service refused the key); retrying would not help."""


@dataclass(frozen=True)
class BatchReport:
    """What a batch did: small enough for XCom."""

    job_id: str
    batch_no: int
    tasks: int
    already_done: int
    sent: int
    succeeded: int
    failed: int
    cached: int = 0
    """Tasks answered from the response cache (counted in `succeeded`, not in `sent`)."""
    not_sent: int = 0
    """Tasks left unanswered because the budget was spent mid-batch (counted in `sent`)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Pending:
    """The batch's tasks still without a result, sorted by how each gets its answer."""

    payloads: dict[Any, Any]
    """Input of each task whose source document still exists."""
    present: list[Any]
    """Tasks whose source document still exists, in batch order."""
    vanished: list[Any]
    """Tasks whose source document was deleted after the job was created."""
    cached: dict[Any, CachedAnswer] = field(default_factory=dict)
    """Tasks answered from the response cache, with their stored answers."""

    fresh: frozenset[Any] = frozenset()
    """Tasks that must get a new answer, not a cached one (re-driven needs-review tasks)."""

    @property
    def to_send(self) -> list[Any]:
        return [task_id for task_id in self.present if task_id not in self.cached]

    def task_id(self, wire_id: str) -> Any:
        """Return the task id an outcome's (string) id stands for (at most 10 to look through)."""
        return next(task_id for task_id in self.present if str(task_id) == wire_id)


def process_batch(
    store: JobStore,
    completer: Completer,
    job_id: str,
    batch_no: int,
    *,
    try_number: int = 1,
    now: Callable[[], datetime] = utcnow,
    cache: ResponseCache | None = None,
) -> BatchReport:
    """Send the batch's tasks that have no result yet and store the outcomes.

    With a `cache` (and the job's `use_cache` on), tasks whose question has a stored answer
    are answered from it and not sent (under the review rule of `cache`); fresh successes are
    stored for next time. With a budget, every HTTP request is sent only while the job's
    recorded spend is below it; the tasks it stops are left to `reconcile` (`cancelled`,
    `budget_exhausted`).

    Raises `BatchIncomplete` when some tasks are still unanswered after the client's own
    bounded retries (the orchestrator retries the batch later), and `JobAborted` when the
    job must stop. Whatever was answered is stored before either is raised.
    """
    run = BatchRun(store, job_id, batch_no, try_number, now)
    work = run.load_batch()
    stop_reason = _why_not_send(work)
    if stop_reason is not None:
        return run.skip(work, stop_reason)
    done = run.answered(work)
    todo = [task_id for task_id in work.task_ids if task_id not in done]
    if not todo:
        return run.all_done(work, done)

    run.start()
    pending = run.read_inputs(todo)
    scope = answer_scope(completer, work.model) if cache is not None and work.use_cache else None
    if cache is not None and scope is not None:
        pending = answer_from_cache(cache, scope, work, run.set_aside_redriven(work, pending))
    outcomes = run.send(completer, work, pending)
    finished_at = now()
    run.save_results(work, pending, outcomes, finished_at)
    if cache is not None and scope is not None:
        store_in_cache(cache, scope, work, pending, outcomes)
    report = run.report(work, done, pending, outcomes)
    run.mark_ended(outcomes, len(pending.to_send), finished_at)
    return report


@dataclass(frozen=True)
class BatchRun:
    """One try of one batch: the store it reads and writes, and the clock it reads."""

    store: JobStore
    job_id: str
    batch_no: int
    try_number: int
    now: Callable[[], datetime]

    def load_batch(self) -> BatchWork:
        """Return the batch's work; raise `JobAborted` if the job was stopped."""
        work = self.store.load_batch(self.job_id, self.batch_no)
        if work.abort:
            log.warning(
                "job_id=%s batch_no=%d skipped: job stopped (%s)",
                self.job_id,
                self.batch_no,
                work.abort.get("type"),
            )
            self.mark(documents.batch_state("skipped", self.now()))
            raise JobAborted(f"job {self.job_id} was stopped: {work.abort.get('message')}")
        return work

    def skip(self, work: BatchWork, reason: str) -> BatchReport:
        """Send nothing (the job was cancelled or spent its budget) and say why."""
        log.warning("job_id=%s batch_no=%d not sent: %s", self.job_id, self.batch_no, reason)
        self.mark(documents.batch_ended("skipped", reason, f"not sent: {reason}", self.now()))
        return BatchReport(self.job_id, self.batch_no, len(work.task_ids), 0, 0, 0, 0)

    def answered(self, work: BatchWork) -> set[Any]:
        """Return the batch's tasks that already have a result (from an earlier try)."""
        return self.store.finished_task_ids(self.job_id, work.task_ids)

    def all_done(self, work: BatchWork, done: set[Any]) -> BatchReport:
        """Close a batch whose tasks all have results already (a retry after a crash)."""
        log.info(
            "job_id=%s batch_no=%d: all %d tasks already done",
            self.job_id,
            self.batch_no,
            len(done),
        )
        self.mark(documents.batch_state("done", self.now()))
        return BatchReport(self.job_id, self.batch_no, len(work.task_ids), len(done), 0, 0, 0)

    def start(self) -> None:
        """Record that this try starts sending, and on which worker."""
        worker = {"host": socket.gethostname(), "pid": os.getpid()}
        self.mark(documents.batch_running(self.try_number, worker, self.now()))

    def read_inputs(self, todo: list[Any]) -> Pending:
        """Read the inputs of the tasks to answer; a deleted task has none."""
        payloads = self.store.task_payloads(todo)
        return Pending(
            payloads=payloads,
            present=[task_id for task_id in todo if task_id in payloads],
            vanished=[task_id for task_id in todo if task_id not in payloads],
        )

    def set_aside_redriven(self, work: BatchWork, pending: Pending) -> Pending:
        """Mark the tasks a re-drive takes because they needed review: they get a new answer."""
        if work.retry_of is None or not work.include_needs_review:
            return pending
        earlier = self.store.finished_task_ids(
            work.retry_of, pending.present, status=ResultStatus.NEEDS_REVIEW.value
        )
        return replace(pending, fresh=frozenset(earlier))

    def send(self, completer: Completer, work: BatchWork, pending: Pending) -> list[TaskOutcome]:
        """Send the tasks not answered from the cache in one request (the client retries)."""
        to_send = pending.to_send
        if not to_send:
            return []
        return completer.complete(
            [LLMTask(str(task_id), pending.payloads[task_id]) for task_id in to_send],
            instructions=work.instructions,
            model=work.model,
            params=work.llm_params or None,
            idempotency_key=idempotency_base(self.job_id, self.batch_no),
            on_call=self.record_call,
            before_send=self.budget_check(work),
        )

    def budget_check(self, work: BatchWork) -> Callable[[Sequence[str]], str | None] | None:
        """Return the check the client makes before every request, or None without a budget.

        The spend it reads is the audit trail, which every answered request is in before the
        next one is asked for: only the requests in flight when it reaches the budget (one
        per pool slot at most) can spend past it.
        """
        budget = work.max_cost_usd
        if budget is None:
            return None

        def may_send(task_ids: Sequence[str]) -> str | None:
            spent = self.store.job_spend(self.job_id)
            if spent < budget:
                return None
            log.warning(
                "job_id=%s batch_no=%d: budget $%g spent ($%.6f); %d task(s) not sent",
                self.job_id,
                self.batch_no,
                budget,
                spent,
                len(task_ids),
            )
            return ErrorType.BUDGET_EXHAUSTED.value

        return may_send

    def record_call(self, call: CallRecord) -> None:
        """Record one HTTP attempt (its cost with it, once per key) and update the job's spend."""
        document = documents.call_document(self.job_id, self.batch_no, self.try_number, call)
        stored = self.store.record_call(document)
        self.store.add_spend(self.job_id, stored["cost_usd"])

    def save_results(
        self, work: BatchWork, pending: Pending, outcomes: list[TaskOutcome], at: datetime
    ) -> None:
        """Store a result for every answered, vanished and cached task in one write."""
        job_id, batch_no = self.job_id, self.batch_no
        results = [
            documents.answered_result(
                job_id, batch_no, pending.task_id(o.task_id), o, at, review_below=work.review_below
            )
            for o in outcomes
            if o.status in (OutcomeStatus.SUCCEEDED, OutcomeStatus.FAILED)
        ]
        results += [
            documents.missing_task_result(job_id, batch_no, task_id, at)
            for task_id in pending.vanished
        ]
        results += [
            documents.cached_result(
                job_id, batch_no, task_id, answer, at, review_below=work.review_below
            )
            for task_id, answer in pending.cached.items()
        ]
        self.store.save_results(results)

    def report(
        self, work: BatchWork, done: set[Any], pending: Pending, outcomes: list[TaskOutcome]
    ) -> BatchReport:
        """Return (and log) what this try did."""
        statuses = Counter(o.status for o in outcomes)
        report = BatchReport(
            self.job_id,
            self.batch_no,
            len(work.task_ids),
            len(done),
            len(pending.to_send),
            statuses[OutcomeStatus.SUCCEEDED] + len(pending.cached),
            statuses[OutcomeStatus.FAILED] + len(pending.vanished),
            len(pending.cached),
            statuses[OutcomeStatus.REFUSED],
        )
        log.info(
            "job_id=%s batch_no=%d try=%d sent=%d cached=%d succeeded=%d failed=%d "
            "retryable=%d aborted=%d not_sent=%d",
            self.job_id,
            self.batch_no,
            self.try_number,
            report.sent,
            report.cached,
            report.succeeded,
            report.failed,
            statuses[OutcomeStatus.RETRYABLE],
            statuses[OutcomeStatus.ABORTED],
            report.not_sent,
        )
        return report

    def mark_ended(self, outcomes: list[TaskOutcome], sent: int, at: datetime) -> None:
        """Mark the batch done, or stop the job, or leave the unanswered tasks to a retry.

        Raises `JobAborted` when the service refused to go on, `BatchIncomplete` when some
        tasks got no usable answer.
        """
        aborted = [o for o in outcomes if o.status is OutcomeStatus.ABORTED]
        if aborted:
            reason = aborted[0]
            message = f"{reason.error_message} (job stopped early; nothing more is sent)"
            self.store.abort_job(self.job_id, reason.error_type or "aborted", message, at)
            self.mark(documents.batch_ended("aborted", reason.error_type, message, at))
            raise JobAborted(f"job {self.job_id} stopped: {message}")

        unanswered = [o for o in outcomes if o.status is OutcomeStatus.RETRYABLE]
        if unanswered:
            kinds = Counter(o.error_type or "unknown" for o in unanswered)
            example = unanswered[0]
            message = (
                f"{len(unanswered)} of {sent} tasks got no usable answer "
                f"({', '.join(f'{k}: {n}' for k, n in kinds.most_common())}; e.g. "
                f"{example.error_message}); the retry sends only those tasks"
            )
            self.mark(documents.batch_ended("incomplete", kinds.most_common(1)[0][0], message, at))
            raise BatchIncomplete(f"job {self.job_id} batch {self.batch_no}: {message}")

        refused = [o for o in outcomes if o.status is OutcomeStatus.REFUSED]
        if refused:
            # Like a batch skipped at its start: `reconcile` gives these tasks their result.
            why = refused[0].error_type or ErrorType.BUDGET_EXHAUSTED.value
            message = f"{len(refused)} of {sent} tasks not sent: {why}"
            self.mark(documents.batch_ended("skipped", why, message, at))
            return

        self.mark(documents.batch_ended("done", None, None, at))

    def mark(self, fields: Mapping[str, Any]) -> None:
        self.store.mark_batch(self.job_id, self.batch_no, fields)


def answer_from_cache(
    cache: ResponseCache, scope: Mapping[str, str], work: BatchWork, pending: Pending
) -> Pending:
    """Return `pending` with the tasks a stored answer may answer set aside.

    Re-driven needs-review tasks are not looked up: the re-drive asks for a new answer. A
    stored answer that needs review answers only a job that asked for such answers.
    """
    hits = cache.lookup(
        scope,
        work.instructions,
        work.llm_params,
        {t: pending.payloads[t] for t in pending.present if t not in pending.fresh},
    )
    if not work.cache_below_review:
        hits = {t: answer for t, answer in hits.items() if not answer.doubtful(work.review_below)}
    return replace(pending, cached=hits)


def store_in_cache(
    cache: ResponseCache,
    scope: Mapping[str, str],
    work: BatchWork,
    pending: Pending,
    outcomes: list[TaskOutcome],
) -> None:
    """Store the fresh successful answers for the next time the same question is asked."""
    cache.store(
        scope,
        work.instructions,
        work.llm_params,
        (
            (
                pending.payloads[pending.task_id(o.task_id)],
                CachedAnswer(
                    o.output, o.confidence, o.model, below_review(o.confidence, work.review_below)
                ),
            )
            for o in outcomes
            if o.status is OutcomeStatus.SUCCEEDED
        ),
    )


def _why_not_send(work: BatchWork) -> str | None:
    """Return why this batch must not send anything (cancel, spent budget), or None."""
    if work.cancel:
        return ErrorType.CANCELLED.value
    if work.budget_spent:
        return ErrorType.BUDGET_EXHAUSTED.value
    return None
