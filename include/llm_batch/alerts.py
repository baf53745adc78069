"""Alerts that lead to an action: fire only when someone must do something, and say what.

An alert is always written to the log; it is also POSTed as JSON to a webhook (a generic
endpoint, or a Slack incoming webhook, which takes the same `{"text": ...}` body) when
`LLM_BATCH_ALERT_WEBHOOK` is set, and e-mailed to `LLM_BATCH_ALERT_EMAIL_TO` through the SMTP
server `LLM_BATCH_ALERT_SMTP` (`smtp://[user:password@]host[:port]`, STARTTLS when the server
offers it; `smtps://` for implicit TLS) when both are set.
"""

from __future__ import annotations

import logging
import os
import smtplib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import unquote, urlsplit

import requests

from llm_batch import config
from llm_batch.quoting import ALERT_QUOTE_CHARS, quote_untrusted

log = logging.getLogger(__name__)

WEBHOOK_ENV = "LLM_BATCH_ALERT_WEBHOOK"
SMTP_ENV = "LLM_BATCH_ALERT_SMTP"
EMAIL_TO_ENV = "LLM_BATCH_ALERT_EMAIL_TO"
EMAIL_FROM_ENV = "LLM_BATCH_ALERT_EMAIL_FROM"
DEFAULT_EMAIL_FROM = "llm-batch@localhost"

REDRIVE = "`llm-batch submit --retry-of {job_id}`"
RESUME = "`llm-batch submit --all --job-id {job_id} --wait`"
NEXT_STEPS = {
    "invalid_input": "fix the payloads of the failed tasks, then re-drive them: " + REDRIVE,
    "content_filtered": "the provider's content filter blocked these inputs; review them "
    "(re-driving them unchanged will fail again)",
    "not_processed": "the LLM service kept failing (see llm_calls for status codes); when it is "
    "healthy, resume the job: " + RESUME,
    "job_aborted": "the service refused the connection llm_default (API key, model or URL): "
    "fix it, then resume: " + RESUME,
    "too_large": "these inputs exceed the service's request size: shorten them, then re-drive "
    "them: " + REDRIVE,
    "task_missing": "task documents were deleted while the job ran: recreate them if needed",
}
DEFAULT_NEXT_STEP = "inspect results with error.type {error_type!r} and re-drive: " + REDRIVE


@dataclass(frozen=True)
class Alert:
    """What went wrong with a job, and what to do next."""

    job_id: str
    kind: str
    """`failure_rate` or `deadline_missed`."""
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def failure_rate_alert(summary: Mapping[str, Any], threshold: float) -> Alert | None:
    """Return an alert if more than `threshold` of the job's tasks failed, else None."""
    total = int(summary.get("task_count") or 0)
    failed = int((summary.get("counts") or {}).get("failed", 0))
    if total == 0 or failed / total <= threshold:
        return None
    job_id = summary["job_id"]
    top = list(summary.get("top_errors") or [])
    lines = [
        f"LLM batch job {job_id}: {failed / total:.0%} of {total} tasks failed "
        f"(threshold {threshold:.0%}); counts {dict(summary.get('counts') or {})}.",
    ]
    lines += [_error_line(error) for error in top[:3]]
    if top:
        main = top[0]["type"]
        step = NEXT_STEPS.get(main, DEFAULT_NEXT_STEP)
        lines.append("Next: " + step.format(job_id=job_id, error_type=main))
    return Alert(job_id, "failure_rate", "\n".join(lines))


def deadline_alert(
    job: Mapping[str, Any] | None,
    run_id: str,
    deadline: str,
    progress: Mapping[str, int],
    top_errors: Sequence[Mapping[str, Any]] = (),
) -> Alert:
    """Return the alert for a run still going past its deadline, with the job's progress."""
    if job is None:
        return Alert(
            run_id,
            "deadline_missed",
            f"LLM batch run {run_id} is still running past its deadline of {deadline}, and no "
            "job was created for it yet. Next: look at the run's create_job task in the Airflow "
            "UI (it may be waiting for a worker or retrying a MongoDB error).",
        )
    job_id = job["_id"]
    total = int(job.get("task_count") or 0)
    answered = sum(progress.values())
    lines = [
        f"LLM batch job {job_id} (run {run_id}) is still running past its deadline of "
        f"{deadline}: {answered} of {total} tasks have a result"
        + (
            f" ({', '.join(f'{n} {s}' for s, n in sorted(progress.items()))})." if answered else "."
        ),
    ]
    lines += [_error_line(error) for error in top_errors[:3]]
    lines.append(
        f"Next: `llm-batch status {job_id}` shows progress; if batches wait in the pool "
        f"{config.POOL_NAME}, add slots or let it finish; if it should not finish, "
        f"`llm-batch cancel {job_id}` (or mark the run failed) stops it, and resuming it later "
        f"with job_id={job_id} sends only what is left."
    )
    return Alert(job_id, "deadline_missed", "\n".join(lines))


def _error_line(error: Mapping[str, Any]) -> str:
    """Return one error of a job for an alert: the provider's words one line, capped, escaped."""
    example = quote_untrusted(error["example"], ALERT_QUOTE_CHARS, markdown=False)
    return f"- {error['type']} x{error['count']}, e.g. {example}"


def notify(
    alert: Alert, webhook_url: str | None = None, environ: Mapping[str, str] | None = None
) -> list[str]:
    """Deliver `alert` to the log and every configured channel; return the channels used.

    An alert that cannot be delivered must not fail the job it reports on: a channel that
    fails is logged and skipped.
    """
    env = os.environ if environ is None else environ
    log.warning("ALERT %s for job %s\n%s", alert.kind, alert.job_id, alert.text)
    channels = ["log"]
    url = webhook_url or env.get(WEBHOOK_ENV)
    if url:
        try:
            response = requests.post(url, json={"text": alert.text, **alert.to_dict()}, timeout=10)
            response.raise_for_status()
            channels.append("webhook")
        except requests.RequestException as exc:
            log.error("alert webhook failed (%s); the alert is in this log only", exc)
    smtp_url, recipients = env.get(SMTP_ENV), env.get(EMAIL_TO_ENV)
    if smtp_url and recipients:
        try:
            send_email(alert, smtp_url, recipients, env.get(EMAIL_FROM_ENV) or DEFAULT_EMAIL_FROM)
            channels.append("email")
        except (OSError, smtplib.SMTPException, ValueError) as exc:
            log.error("alert e-mail via %s failed (%s)", _redact(smtp_url), exc)
    return channels


def send_email(alert: Alert, smtp_url: str, recipients: str, sender: str) -> None:
    """E-mail `alert` to the comma-separated `recipients` through `smtp_url`."""
    parts = urlsplit(smtp_url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError(
            f"{SMTP_ENV} must look like smtp://[user:password@]host[:port] (or smtps://), "
            f"got {_redact(smtp_url)!r}"
        )
    message = EmailMessage()
    message["Subject"] = f"[llm-batch] {alert.kind}: job {alert.job_id}"
    message["From"] = sender
    message["To"] = recipients
    message.set_content(alert.text)
    implicit_tls = parts.scheme == "smtps"
    port = parts.port or (465 if implicit_tls else 25)
    smtp_class = smtplib.SMTP_SSL if implicit_tls else smtplib.SMTP
    with smtp_class(parts.hostname, port, timeout=10) as server:
        if not implicit_tls:
            server.ehlo()
            if server.has_extn("starttls"):
                server.starttls()
                server.ehlo()
        if parts.username:
            server.login(unquote(parts.username), unquote(parts.password or ""))
        server.send_message(message)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)
