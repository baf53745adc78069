"""The HTTP client: sends tasks, retries what is transient, and classifies every task's outcome.

One `complete` call works in rounds. Each round sends the still-unresolved tasks
in one request (split on 413, and on a 200 that failed as a whole). A request is
retried on 5xx, timeouts, resets and unreadable bodies with full-jitter backoff, and
waits out 429s. Items that come back transient or faulty (`overloaded`, a missing or
duplicated id, ...) are asked for again in the next round, and only those.

Each attempt goes to one of the connection's endpoints: a weighted choice among those
not resting, after the rate limiter has reserved a slot on it. An attempt that fails
for a transient reason rests its endpoint (for everyone, through the limiter's store,
when the failure says the endpoint is overloaded or unreachable), so the retry goes
to another endpoint if there is one.

The HTTP exchange itself (one POST under the deadline and the size cap) is
`llm_hook.transport`'s; the wire rules (canonical bodies, idempotency keys,
`Retry-After`, backoff, what each status means) are `llm_hook.wire`'s.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from llm_hook.adapters import ParsedResponse, error_detail, make_adapter
from llm_hook.endpoints import EndpointRouter
from llm_hook.exceptions import LLMRequestError, LLMResponseError
from llm_hook.pacing import EndpointPolicy, EndpointState, Feedback, Grant, RateLimiter
from llm_hook.reading import Cut, read_body
from llm_hook.settings import ClientSettings, EndpointSettings
from llm_hook.transport import Answer, Transport
from llm_hook.types import CallRecord, LLMTask, OutcomeStatus, TaskOutcome, Usage
from llm_hook.wire import (
    ABORT_ERROR_TYPES,
    OUTPUT_TOO_LARGE,
    PERMANENT_ERROR_TYPES,
    BearerAuth,
    derive_idempotency_key,
    encode_body,
    estimate_tokens,
    full_jitter_delay,
    json_or_none,
    parse_retry_after,
)

log = logging.getLogger(__name__)

MAX_TASKS_PER_REQUEST = 10
"""The batch service takes 1 to 10 tasks per request."""
POOL_MAXSIZE = 16
"""Keep-alive connections kept per host by a client's own session."""
POOL_HOSTS = 4
"""Hosts a session keeps connection pools for (more endpoints than this: the least used lose
theirs)."""


def new_session(pool_maxsize: int = POOL_MAXSIZE, hosts: int = POOL_HOSTS) -> requests.Session:
    """Return an HTTP session keeping `pool_maxsize` connections alive per host, never retrying.

    Retries are the client's own (backoff, idempotency keys), so the transport makes none.
    Several clients may share one session from several threads (the triggerer's batches):
    credentials travel per request (`auth=`), never on the session; size `pool_maxsize` to
    the requests in flight at once, or connections past it are opened and dropped each time.
    """
    session = requests.Session()
    pooled = HTTPAdapter(pool_connections=hosts, pool_maxsize=pool_maxsize, max_retries=0)
    session.mount("http://", pooled)
    session.mount("https://", pooled)
    return session


@dataclass
class _TaskState:
    attempts: int = 0
    latency_ms: int = 0
    outcome: TaskOutcome | None = None
    last_error_type: str = "not_sent"
    last_error_message: str = "the task was never sent"


@dataclass
class _Run:
    """The bookkeeping of one `complete` call."""

    model: str
    instructions: str | None
    params: Mapping[str, Any] | None
    base_key: str | None
    on_call: Callable[[CallRecord], None] | None
    before_send: Callable[[Sequence[str]], str | None] | None = None
    states: dict[str, _TaskState] = field(default_factory=dict)
    attempt: int = 0
    aborted: bool = False
    """Nothing more is sent: the service refused the settings, or `before_send` said no."""

    def unresolved(self, tasks: Sequence[LLMTask]) -> list[LLMTask]:
        return [task for task in tasks if self.states[task.id].outcome is None]

    def resolve(
        self,
        task_id: str,
        status: OutcomeStatus,
        error_type: str | None,
        message: str | None,
        *,
        model: str | None = None,
        output: Any = None,
        confidence: float | None = None,
        usage: Usage | None = None,
    ) -> None:
        state = self.states[task_id]
        state.outcome = TaskOutcome(
            task_id=task_id,
            status=status,
            output=output,
            confidence=confidence,
            usage=usage or Usage(),
            error_type=error_type,
            error_message=message,
            attempts=state.attempts,
            latency_ms=state.latency_ms,
            model=model or self.model,
        )


class LLMClient:
    """A client for an LLM service, configured by `ClientSettings`; reuse it across calls.

    :param rate_limiter: paces requests and shares endpoint health; give every worker one
        over the same store (e.g. `llm_batch.limiter_store.MongoLimiterStore`) to share them
        across processes. Default: a limiter private to this client.
    :param session: an HTTP session shared with other clients (see `new_session`); its owner
        closes it, `close` does not. Default: a session of this client's own.
    """

    def __init__(
        self,
        settings: ClientSettings,
        *,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.settings = settings
        self._adapter = make_adapter(settings.adapter)
        self._owns_session = session is None
        self._session = new_session() if session is None else session
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self.rate_limiter = rate_limiter if rate_limiter is not None else RateLimiter()
        self.endpoints = settings.endpoint_list()
        self._auths = {e.id: BearerAuth(e.api_key) for e in self.endpoints}
        self._policies = {
            e.id: EndpointPolicy(
                e.id,
                rpm=e.rpm or 0,
                tpm=e.tpm or 0,
                window_s=settings.rate_window_s,
                cooldown_base_s=settings.cooldown_base_s,
                cooldown_max_s=settings.cooldown_max_s,
            )
            for e in self.endpoints
        }
        self._router = EndpointRouter(self.endpoints, rng=self._rng, clock=clock)
        self._transport = Transport(settings, clock=clock)
        self._secrets = sorted({e.api_key for e in self.endpoints}, key=len, reverse=True)

    def __repr__(self) -> str:
        urls = ", ".join(e.url for e in self.endpoints)
        return f"LLMClient(endpoints=[{urls}], model={self.settings.model!r})"

    def answer_scope(self, model: str | None = None) -> dict[str, str]:
        """Return what, besides instructions, params and input, decides an answer.

        A response cache keys on it: the same input under another protocol (whose prompt
        differs) or another model is another question.
        """
        return {"adapter": self.settings.adapter, "model": model or self.settings.model}

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool if this client created it."""
        if self._owns_session:
            self._session.close()

    def list_models(self, endpoint_id: str | None = None) -> list[str]:
        """Return the model names an endpoint offers (`GET /v1/models`); spends no tokens.

        Asks the first endpoint unless `endpoint_id` names another.
        """
        endpoint = self._endpoint(endpoint_id)
        url = endpoint.url + self._adapter.models_path
        deadline = self._clock() + self.settings.deadline_s
        try:
            response = self._session.get(
                url,
                auth=self._auths[endpoint.id],
                headers={"Accept": "application/json"},
                timeout=(self.settings.connect_timeout_s, self.settings.timeout_s),
                stream=True,
            )
            read = read_body(
                response,
                deadline=deadline,
                max_bytes=self.settings.max_response_bytes,
                clock=self._clock,
            )
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError) as exc:
            raise LLMRequestError(
                f"{url} did not answer within the connection's timeouts "
                f"(connect {self.settings.connect_timeout_s}s, read {self.settings.timeout_s}s).",
                error_type="timeout",
            ) from exc
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise LLMRequestError(
                f"Could not reach {url} ({type(exc).__name__}): check the host (Base URL) of "
                f"{self._conn()} and that the service is running.",
                error_type="connection_error",
            ) from exc
        if read.cut is Cut.DEADLINE:
            raise LLMRequestError(
                f"{url} did not finish its answer within {self.settings.deadline_s}s "
                f"(`request_deadline_s` of {self._conn()}).",
                error_type="timeout",
            )
        if read.cut is Cut.TOO_LARGE:
            raise LLMResponseError(
                f"{url} answered with more than {self.settings.max_response_bytes} bytes "
                f"(`max_response_bytes` of {self._conn()}).",
            )
        if response.status_code != 200:
            error_type = ABORT_ERROR_TYPES.get(response.status_code, f"http_{response.status_code}")
            raise LLMRequestError(
                self._status_message(
                    response.status_code, json_or_none(read.data), self.settings.model, endpoint
                ),
                error_type=error_type,
                http_status=response.status_code,
            )
        body = json_or_none(read.data)
        if body is None:
            raise LLMResponseError(f"{url} answered 200 with a body that is not JSON.")
        return self._adapter.parse_models(body)

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
    ) -> list[TaskOutcome]:
        """Send 1 to 10 tasks and return exactly one outcome per task, in input order.

        Service trouble never raises: it becomes RETRYABLE, FAILED or ABORTED
        outcomes. `on_call` sees every HTTP attempt as it happens; whatever it
        raises propagates. `before_send` is asked before every HTTP attempt (rounds,
        halves and retries included) with the ids it would carry: None sends it; a reason
        (e.g. `budget_exhausted`) sends nothing more, and every task still without an
        answer ends REFUSED with that reason as its error type.
        """
        _check_tasks(tasks)
        started = self._clock()
        run = _Run(
            model=model or self.settings.model,
            instructions=instructions,
            params=params,
            base_key=idempotency_key,
            on_call=on_call,
            before_send=before_send,
            states={task.id: _TaskState() for task in tasks},
        )
        pending = list(tasks)
        for round_no in range(1, self.settings.max_rounds + 1):
            if round_no > 1:
                # Transient item errors mean "overloaded": give the service a moment too.
                delay = self._backoff(round_no - 1)
                log.info(
                    "LLM round %d: re-requesting %d task(s) %s in %.2fs",
                    round_no,
                    len(pending),
                    [task.id for task in pending],
                    delay,
                )
                self._sleep(delay)
            self._send(run, pending, round_no)
            pending = run.unresolved(pending)
            if not pending:  # an abort resolves everything, so it ends here too
                break
        outcomes = [self._final(run, task.id) for task in tasks]
        counts = Counter(outcome.status.value for outcome in outcomes)
        log.info(
            "LLM complete: %d task(s) -> %d succeeded, %d failed, %d retryable, %d aborted, "
            "%d refused; %d request(s) in %d ms",
            len(tasks),
            counts["succeeded"],
            counts["failed"],
            counts["retryable"],
            counts["aborted"],
            counts["refused"],
            run.attempt,
            int((self._clock() - started) * 1000),
        )
        return outcomes

    def _send(self, run: _Run, tasks: Sequence[LLMTask], round_no: int) -> None:
        """Send one request for `tasks` until it gets an answer or its retries run out."""
        # Sorted, the same set of tasks always makes the same body, and so the same key,
        # whatever order a retried caller passes them in.
        tasks = sorted(tasks, key=lambda task: task.id)
        path, body = self._adapter.build_request(tasks, run.model, run.instructions, run.params)
        data = encode_body(body)
        ids = [task.id for task in tasks]
        key = derive_idempotency_key(run.base_key, data, round_no) if run.base_key else None
        tokens = estimate_tokens(data, run.params)
        failures = 0
        rate_limit_waits = 0
        while True:
            if self._refused(run, ids):
                return
            endpoint, grant = self._route(tokens)
            answer = self._post(run, endpoint, path, data, ids, key)
            status = answer.http_status
            if answer.too_large:
                # The service answered (and billed); the same request, whatever its key,
                # would only bring the same oversized answer again.
                self._learn(endpoint, grant, Feedback.REJECTED, answer, tokens)
                self._answer_too_large(run, tasks, round_no)
                return
            if answer.parsed is not None:
                self._learn(endpoint, grant, Feedback.SUCCEEDED, answer, tokens)
                whole = answer.parsed.whole_request
                if whole and len(tasks) > 1:
                    self._split(run, tasks, round_no, whole)
                    return
                self._apply(run, answer.parsed)
                return
            if status == 429:
                rate_limit_waits += 1
                delay = self._rate_limit_delay(answer.retry_after, rate_limit_waits)
                self._learn(endpoint, grant, Feedback.RATE_LIMITED, answer, tokens, delay)
                if rate_limit_waits > self.settings.max_rate_limit_waits:
                    self._give_up(
                        run,
                        ids,
                        "http_429",
                        f"still rate limited (HTTP 429) after "
                        f"{self.settings.max_rate_limit_waits} waits",
                    )
                    return
                log.warning(
                    "LLM request for %d task(s) rate limited (429) by %s; resting it %.2fs "
                    "(wait %d of %d)",
                    len(ids),
                    endpoint.id,
                    delay,
                    rate_limit_waits,
                    self.settings.max_rate_limit_waits,
                )
                continue
            if status is None or answer.transient:
                failures += 1
                error_type = answer.error_type or "bad_response"
                delay = self._backoff(failures)
                if answer.connect_failed:
                    feedback = Feedback.UNREACHABLE
                elif status == 503:
                    feedback = Feedback.OVERLOADED
                    told = parse_retry_after(answer.retry_after, datetime.now(UTC))
                    if told is not None:
                        delay = min(told, self.settings.max_retry_after_s)
                else:
                    feedback = Feedback.FAILED
                self._learn(endpoint, grant, feedback, answer, tokens, delay)
                if failures >= self.settings.max_attempts:
                    self._give_up(
                        run,
                        ids,
                        error_type,
                        f"{answer.message}; gave up after {failures} attempt(s)",
                    )
                    return
                log.warning(
                    "LLM request for %d task(s) failed on %s (%s); retrying (attempt %d of %d)",
                    len(ids),
                    endpoint.id,
                    error_type,
                    failures,
                    self.settings.max_attempts,
                )
                continue
            self._learn(endpoint, grant, Feedback.REJECTED, answer, tokens)
            self._reject(run, tasks, round_no, status, answer.body, endpoint)
            return

    def _route(self, tokens: int) -> tuple[EndpointSettings, Grant]:
        """Pick the endpoint for the next attempt and wait for its slot.

        Weighted among the endpoints that are not resting; when all are, wait for the
        first to recover and send to it (a probe, if it was unreachable).
        """
        for _ in range(len(self.endpoints)):
            endpoint = self._router.choose()
            if endpoint is None:
                break
            grant = self.rate_limiter.acquire(self._policies[endpoint.id], tokens)
            if grant.usable:
                if grant.probe:
                    log.info("LLM endpoint %s: probing whether it is back", endpoint.id)
                self._pause(grant.wait_s)
                return endpoint, grant
            # Another worker found it overloaded or unreachable: no need to find out again.
            rest = grant.until - self.rate_limiter.now()
            self._router.rest(endpoint, grant.state, rest, "reported by another worker")
        endpoint, delay = self._router.first_to_recover()
        if delay > 0:
            log.info("LLM endpoints all resting; waiting %.2fs for %s", delay, endpoint.id)
            self._sleep(delay)
        grant = self.rate_limiter.acquire(self._policies[endpoint.id], tokens, force=True)
        self._pause(grant.wait_s)
        return endpoint, grant

    def _pause(self, wait_s: float) -> None:
        """Wait for a reserved slot (the rate limit's pacing)."""
        if wait_s > 0:
            if wait_s >= 1.0:
                log.info("LLM rate limit: waiting %.2fs for a request slot", wait_s)
            self._sleep(wait_s)

    def _learn(
        self,
        endpoint: EndpointSettings,
        grant: Grant,
        feedback: Feedback,
        answer: Answer,
        tokens: int,
        rest_s: float = 0.0,
    ) -> None:
        """Tell the limiter what the attempt showed, and rest the endpoint here if it failed."""
        used = answer.parsed.usage if answer.parsed is not None else None
        record = self.rate_limiter.record(
            self._policies[endpoint.id],
            feedback,
            grant=grant,
            headers=answer.headers,
            cooldown_s=rest_s,
            tokens_estimate=tokens,
            tokens_used=used.input_tokens + used.output_tokens if used is not None else None,
        )
        if feedback in (Feedback.SUCCEEDED, Feedback.REJECTED):
            self._router.restore(endpoint)
            if record is not None and record.state is EndpointState.OVERLOADED:
                # The service says no requests remain until its reset.
                rest = record.until - self.rate_limiter.now()
                self._router.rest(endpoint, record.state, rest, "no requests remaining")
            return
        state = EndpointState.ACTIVE if feedback is Feedback.FAILED else EndpointState.OVERLOADED
        if feedback is Feedback.UNREACHABLE:
            state = EndpointState.UNREACHABLE
        if record is not None and record.state is not EndpointState.ACTIVE:
            state = record.state
            rest_s = max(rest_s, record.until - self.rate_limiter.now())
        self._router.rest(
            endpoint, state, rest_s, answer.error_type or f"http_{answer.http_status}"
        )

    def _split(self, run: _Run, tasks: Sequence[LLMTask], round_no: int, reason: str) -> None:
        """Send the two halves of a request as requests of their own, in the same round."""
        half = len(tasks) // 2
        log.warning(
            "LLM request for %d task(s) failed as a whole (%s); splitting into %d + %d",
            len(tasks),
            reason,
            half,
            len(tasks) - half,
        )
        self._send(run, tasks[:half], round_no)
        if not run.aborted:
            self._send(run, tasks[half:], round_no)

    def _refused(self, run: _Run, ids: Sequence[str]) -> bool:
        """Ask the caller whether the next attempt may go; if not, stop the whole call."""
        if run.before_send is None:
            return False
        reason = run.before_send(ids)
        if reason is None:
            return False
        run.aborted = True
        unresolved = [task_id for task_id, s in run.states.items() if s.outcome is None]
        log.warning(
            "LLM request for %d task(s) not sent: the caller refused (%s); %d task(s) left "
            "unanswered",
            len(ids),
            reason,
            len(unresolved),
        )
        for task_id in unresolved:
            run.resolve(
                task_id,
                OutcomeStatus.REFUSED,
                reason,
                f"not sent: the caller refused further requests ({reason})",
            )
        return True

    def _answer_too_large(self, run: _Run, tasks: Sequence[LLMTask], round_no: int) -> None:
        """Split a request whose answer was over `max_response_bytes`; fail a single task."""
        limit = self.settings.max_response_bytes
        if len(tasks) > 1:
            self._split(run, tasks, round_no, f"answer over max_response_bytes={limit}")
            return
        (task,) = tasks
        run.resolve(
            task.id,
            OutcomeStatus.FAILED,
            OUTPUT_TOO_LARGE,
            f"the answer to this task alone was over {limit} bytes and was not read; ask for "
            "a shorter output (e.g. a lower max_tokens), or raise `max_response_bytes` in "
            f"the extra of {self._conn()}",
        )

    def _reject(
        self,
        run: _Run,
        tasks: Sequence[LLMTask],
        round_no: int,
        status: int,
        body: Any,
        endpoint: EndpointSettings,
    ) -> None:
        """Settle a request the service refused for good: abort, split, or fail its tasks."""
        ids = [task.id for task in tasks]
        server_type, message = error_detail(body)
        if status in ABORT_ERROR_TYPES:
            self._abort(run, status, body, endpoint)
        elif status == 413 and len(tasks) > 1:
            self._split(run, tasks, round_no, "too large (413)")
        elif status == 413:
            for task_id in ids:
                run.resolve(
                    task_id,
                    OutcomeStatus.FAILED,
                    "too_large",
                    self._redact(
                        f"the service rejected this single task as too large (HTTP 413"
                        f"{': ' + message if message else ''}); shorten its input"
                    ),
                )
        else:
            error_type = server_type or PERMANENT_ERROR_TYPES.get(status, f"http_{status}")
            log.warning(
                "LLM request for %d task(s) rejected with HTTP %d (%s); not retrying",
                len(ids),
                status,
                error_type,
            )
            for task_id in ids:
                run.resolve(
                    task_id,
                    OutcomeStatus.FAILED,
                    error_type,
                    self._redact(
                        f"the service rejected the request (HTTP {status}"
                        f"{': ' + message if message else ''})"
                    ),
                )

    def _post(
        self,
        run: _Run,
        endpoint: EndpointSettings,
        path: str,
        data: bytes,
        ids: Sequence[str],
        key: str | None,
    ) -> Answer:
        """Make one HTTP attempt, account for it and report it to `on_call`."""
        run.attempt += 1
        for task_id in ids:
            run.states[task_id].attempts += 1
        url = endpoint.url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        at = datetime.now(UTC)
        started = self._clock()
        answer = self._transport.exchange(
            self._session, url, data, headers, self._auths[endpoint.id]
        )
        answer.latency_ms = max(0, int((self._clock() - started) * 1000))
        if answer.parsed is None and answer.http_status == 200 and answer.body is not None:
            try:
                answer.parsed = self._adapter.parse_response(answer.body, ids)
            except LLMResponseError as exc:
                answer.error_type, answer.message = "bad_response", str(exc)
        for task_id in ids:
            state = run.states[task_id]
            state.latency_ms = answer.latency_ms
            if answer.parsed is None:
                state.last_error_type = answer.error_type or f"http_{answer.http_status}"
                state.last_error_message = answer.message
        usage = answer.parsed.usage if answer.parsed is not None else Usage()
        log.debug(
            "LLM attempt %d: %d task(s) -> status %s, error %s, %d ms",
            run.attempt,
            len(ids),
            answer.http_status,
            answer.error_type,
            answer.latency_ms,
        )
        if run.on_call is not None:
            run.on_call(
                CallRecord(
                    endpoint=url,
                    attempt=run.attempt,
                    http_status=answer.http_status,
                    error_type=None if answer.parsed is not None else answer.error_type,
                    latency_ms=answer.latency_ms,
                    usage=usage,
                    cost_usd=self._cost(usage),
                    task_ids=tuple(ids),
                    model=(answer.parsed.model if answer.parsed else None) or run.model,
                    idempotency_key=key,
                    at=at,
                    replayed=answer.replayed,
                )
            )
        return answer

    def _apply(self, run: _Run, parsed: ParsedResponse) -> None:
        """Resolve the tasks a 200 settled; remember why the others must be asked again."""
        if parsed.unknown_ids:
            log.warning(
                "LLM response had %d result(s) for ids that were not sent (ignored): %s",
                len(parsed.unknown_ids),
                list(parsed.unknown_ids)[:10],
            )
        if parsed.unattributed:
            log.warning(
                "LLM response had %d result(s) without an id (ignored)", parsed.unattributed
            )
        model = parsed.model or run.model
        faults: Counter[str] = Counter()
        for task_id, item in parsed.items.items():
            size = _output_size(item.output) if item.status is OutcomeStatus.SUCCEEDED else 0
            if size > self.settings.max_output_bytes:
                # Permanent: the same question gets an answer as large again.
                log.warning(
                    "LLM output of one task is %d bytes, over max_output_bytes=%d: failed",
                    size,
                    self.settings.max_output_bytes,
                )
                run.resolve(
                    task_id,
                    OutcomeStatus.FAILED,
                    OUTPUT_TOO_LARGE,
                    f"the output is {size} bytes, over the {self.settings.max_output_bytes} "
                    "allowed; ask for a shorter output (e.g. a lower max_tokens), or raise "
                    f"`max_output_bytes` in the extra of {self._conn()}",
                    usage=item.usage,
                    model=model,
                )
                continue
            if item.status is OutcomeStatus.RETRYABLE:
                state = run.states[task_id]
                state.last_error_type = item.error_type or "malformed_item"
                state.last_error_message = self._redact(item.error_message or "no usable result")
                faults[state.last_error_type] += 1
                continue
            run.resolve(
                task_id,
                item.status,
                item.error_type,
                self._redact(item.error_message) if item.error_message else None,
                output=item.output,
                confidence=item.confidence,
                usage=item.usage,
                model=model,
            )
        if faults:
            log.warning("LLM response left task(s) unresolved: %s", dict(faults))

    def _abort(self, run: _Run, status: int, body: Any, endpoint: EndpointSettings) -> None:
        """Mark every unresolved task ABORTED: the settings are wrong, more requests won't help."""
        run.aborted = True
        message = self._status_message(status, body, run.model, endpoint)
        error_type = ABORT_ERROR_TYPES[status]
        unresolved = [task_id for task_id, s in run.states.items() if s.outcome is None]
        log.error(
            "LLM service answered HTTP %d (%s): aborting %d task(s), sending nothing more",
            status,
            error_type,
            len(unresolved),
        )
        for task_id in unresolved:
            run.resolve(task_id, OutcomeStatus.ABORTED, error_type, message)

    def _give_up(self, run: _Run, ids: Sequence[str], error_type: str, message: str) -> None:
        log.warning("LLM request for %d task(s) gave up (%s)", len(ids), error_type)
        for task_id in ids:
            run.resolve(
                task_id,
                OutcomeStatus.RETRYABLE,
                error_type,
                self._redact(f"{message}; safe to send again later"),
            )

    def _final(self, run: _Run, task_id: str) -> TaskOutcome:
        state = run.states[task_id]
        if state.outcome is not None:
            return state.outcome
        return TaskOutcome(
            task_id=task_id,
            status=OutcomeStatus.RETRYABLE,
            error_type=state.last_error_type,
            error_message=(
                f"{state.last_error_message}; still unresolved after "
                f"{self.settings.max_rounds} round(s), safe to send again later"
            ),
            attempts=state.attempts,
            latency_ms=state.latency_ms,
            model=run.model,
        )

    def _status_message(
        self, status: int, body: Any, model: str, endpoint: EndpointSettings
    ) -> str:
        """Say what a non-retryable status means and which connection setting to check."""
        _, detail = error_detail(body)
        said = f"HTTP {status}" + (f": {detail}" if detail else "")
        conn = self._conn()
        key_field = "the password (API key)" if not self.settings.endpoints else "the `api_key`"
        where = "" if not self.settings.endpoints else f" (endpoint {endpoint.id})"
        if status == 401:
            text = f"The service rejected the API key{where} ({said}). Check {key_field} of {conn}."
        elif status == 403:
            text = (
                f"The API key may not use this service or model{where} ({said}). Check the API "
                f"key of {conn} and its access to model {model!r}."
            )
        elif status == 404:
            text = (
                f"The service has no such model or endpoint ({said}). Check the model name "
                f"{model!r} (extra `model`) and the base URL {endpoint.url} of {conn}."
            )
        else:
            text = f"The service answered {said}."
        return self._redact(text)

    def _rate_limit_delay(self, retry_after: str | None, waits: int) -> float:
        seconds = parse_retry_after(retry_after, datetime.now(UTC))
        if seconds is None:
            seconds = self._backoff(waits)
        return min(seconds, self.settings.max_retry_after_s)

    def _backoff(self, failures: int) -> float:
        return full_jitter_delay(
            self._rng, failures, self.settings.backoff_base_s, self.settings.backoff_max_s
        )

    def _cost(self, usage: Usage) -> float:
        return (
            usage.input_tokens * self.settings.price_input_per_1k
            + usage.output_tokens * self.settings.price_output_per_1k
        ) / 1000

    def _redact(self, text: str) -> str:
        """Keep the API keys out of messages, even if a server echoes one back."""
        for key in self._secrets:
            # Like Airflow's secrets masker, leave keys too short to be secrets alone.
            if len(key) >= 5:
                text = text.replace(key, "***")
        return text

    def _endpoint(self, endpoint_id: str | None) -> EndpointSettings:
        if endpoint_id is None:
            return self.endpoints[0]
        for endpoint in self.endpoints:
            if endpoint.id == endpoint_id:
                return endpoint
        raise ValueError(
            f"no endpoint {endpoint_id!r}; known: {', '.join(e.id for e in self.endpoints)}"
        )

    def _conn(self) -> str:
        conn_id = self.settings.conn_id
        return f"connection {conn_id!r}" if conn_id else "the LLM connection"


def _check_tasks(tasks: Sequence[LLMTask]) -> None:
    if not 1 <= len(tasks) <= MAX_TASKS_PER_REQUEST:
        raise ValueError(
            f"complete() takes 1 to {MAX_TASKS_PER_REQUEST} tasks per call, got {len(tasks)}"
        )
    ids = [task.id for task in tasks]
    bad = [task_id for task_id in ids if not isinstance(task_id, str) or not task_id]
    if bad:
        raise ValueError(f"Task ids must be non-empty strings, got {bad!r}")
    duplicates = sorted(task_id for task_id, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"Task ids must be unique within a call; repeated: {duplicates}")


def _output_size(output: Any) -> int:
    """Return the bytes one task's output takes as compact UTF-8 JSON, as it will be stored."""
    text = json.dumps(output, ensure_ascii=False, separators=(",", ":"))
    return len(text.encode("utf-8", "surrogatepass"))
