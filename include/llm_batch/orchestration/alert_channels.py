"""Deliver alerts: to the log always, and through Airflow's notifiers on Airflow connections.

The settings say which channels are on and hold no secret; the secrets (an SMTP password, a
webhook URL) live in Airflow connections, so they sit in the metadata DB or a secrets backend,
and Airflow masks them in task and triggerer logs:

- e-mail, when `LLM_BATCH_ALERT_EMAIL_TO` names recipients (comma-separated): the SMTP
  provider's `SmtpNotifier` through the connection `LLM_BATCH_ALERT_SMTP_CONN_ID` (default
  `smtp_default`, type `smtp`); sent from `LLM_BATCH_ALERT_EMAIL_FROM`, else the connection's
  extra `from_email`, else `llm-batch@localhost`;
- Slack, when `LLM_BATCH_ALERT_SLACK_CONN_ID` names a connection (type `slackwebhook`, the
  webhook URL as its password): the Slack provider's `SlackWebhookNotifier` POSTs
  `{"text": ...}`, which Slack and any endpoint that takes Slack's body accept.

It runs where an alert is raised: the `report` task on a worker, and the deadline callback in
a thread of the triggerer; Airflow's task SDK looks the connections up in both.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from llm_batch import config

if TYPE_CHECKING:
    from airflow.sdk import Connection
    from airflow.sdk.bases.notifier import BaseNotifier

    from llm_batch.alerts import Alert

log = logging.getLogger(__name__)

TIMEOUT_S = 10

RETIRED_SETTINGS = {
    "LLM_BATCH_ALERT_WEBHOOK": (
        f"create a connection of type slackwebhook with the webhook URL as its password "
        f"(`airflow connections add {config.ALERT_SLACK_CONN_ID} --conn-type slackwebhook "
        f"--conn-password '<URL>'`, or AIRFLOW_CONN_{config.ALERT_SLACK_CONN_ID.upper()}, or "
        f"a secrets backend; docker-compose: ALERT_SLACK_WEBHOOK_URL in .env), set "
        f"{config.ALERT_SLACK_CONN_ID_ENV}={config.ALERT_SLACK_CONN_ID}"
    ),
    "LLM_BATCH_ALERT_SMTP": (
        f"create the SMTP connection {config.DEFAULT_ALERT_SMTP_CONN_ID} (`airflow connections "
        f"add {config.DEFAULT_ALERT_SMTP_CONN_ID} --conn-type smtp --conn-host <host> "
        "--conn-port <port> --conn-login <user> --conn-password '<password>' --conn-extra "
        "'{\"disable_ssl\": true}'`, or a secrets backend; docker-compose: ALERT_SMTP_* in "
        f".env; another id: {config.ALERT_SMTP_CONN_ID_ENV})"
    ),
}
"""Settings that carried secrets in the environment, and what to set instead."""


class ChannelError(Exception):
    """A channel is configured but cannot send; the message says what to fix."""


@dataclass(frozen=True)
class EmailChannel:
    """E-mail through the SMTP provider's notifier, on an `smtp` connection."""

    conn_id: str
    recipients: str
    sender: str | None
    name: str = "email"
    conn_type: str = "smtp"
    named_by: str = (
        f"{config.ALERT_SMTP_CONN_ID_ENV}, default {config.DEFAULT_ALERT_SMTP_CONN_ID}; "
        f"unset {config.ALERT_EMAIL_TO_ENV} to send no e-mail"
    )
    check: str = (
        "check its host, port, login and password, and its extra for the server's TLS "
        '(`{"disable_ssl": true}`: STARTTLS, as on port 587; `"disable_tls": true` too: none)'
    )

    def send(self, alert: Alert, connection: Connection) -> None:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        sender = (
            self.sender
            or connection.extra_dejson.get("from_email")
            or config.DEFAULT_ALERT_EMAIL_FROM
        )
        notifier = SmtpNotifier(
            to=self.recipients,
            from_email=sender,
            subject=f"[llm-batch] {alert.kind}: job {alert.job_id}",
            # The provider sends HTML: <pre> keeps the lines, escaping keeps the provider's
            # quoted text from becoming markup.
            html_content=f"<pre>{html.escape(alert.text)}</pre>",
            smtp_conn_id=self.conn_id,
        )
        _send(notifier)

    def how_to_create(self) -> str:
        return (
            f"`airflow connections add {self.conn_id} --conn-type smtp --conn-host <host> "
            "--conn-port <port> --conn-login <user> --conn-password '<password>'`"
        )


@dataclass(frozen=True)
class SlackChannel:
    """A Slack incoming webhook (or an endpoint that takes its body), on a `slackwebhook` conn."""

    conn_id: str
    name: str = "slack"
    conn_type: str = "slackwebhook"
    named_by: str = f"{config.ALERT_SLACK_CONN_ID_ENV}; unset it to post no Slack alerts"
    check: str = "check the webhook URL in its password, and that the endpoint answers 200"

    def send(self, alert: Alert, connection: Connection) -> None:
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        notifier = SlackWebhookNotifier(
            slack_webhook_conn_id=self.conn_id, text=alert.text, timeout=TIMEOUT_S
        )
        _send(notifier)

    def how_to_create(self) -> str:
        return (
            f"`airflow connections add {self.conn_id} --conn-type slackwebhook "
            "--conn-password '<webhook URL>'`"
        )


def _send(notifier: BaseNotifier) -> None:
    # notify(), not notifier(context): calling the notifier renders its fields as Jinja
    # templates, and the alert quotes text the LLM provider wrote.
    notifier.notify({})


def configured_channels(environ: Mapping[str, str]) -> list[EmailChannel | SlackChannel]:
    """Return the channels the settings turn on, besides the log."""
    channels: list[EmailChannel | SlackChannel] = []
    recipients = environ.get(config.ALERT_EMAIL_TO_ENV, "").strip()
    if recipients:
        conn_id = environ.get(config.ALERT_SMTP_CONN_ID_ENV) or config.DEFAULT_ALERT_SMTP_CONN_ID
        sender = environ.get(config.ALERT_EMAIL_FROM_ENV) or None
        channels.append(EmailChannel(conn_id, recipients, sender))
    slack_conn_id = environ.get(config.ALERT_SLACK_CONN_ID_ENV, "").strip()
    if slack_conn_id:
        channels.append(SlackChannel(slack_conn_id))
    return channels


def notify(alert: Alert, environ: Mapping[str, str] | None = None) -> list[str]:
    """Deliver `alert` to the log and every configured channel; return the channels used.

    An alert that cannot be delivered must not fail the job it reports on: a channel that
    fails is logged, with what to fix, and skipped.
    """
    env = os.environ if environ is None else environ
    log.warning("ALERT %s for job %s\n%s", alert.kind, alert.job_id, alert.text)
    warn_about_retired_settings(env)
    used = ["log"]
    for channel in configured_channels(env):
        try:
            deliver(channel, alert)
        except ChannelError as exc:
            log.error("alert %s not sent: %s; the alert is in this log only", channel.name, exc)
        else:
            used.append(channel.name)
    return used


def deliver(channel: EmailChannel | SlackChannel, alert: Alert) -> None:
    """Send `alert` through `channel`, or raise ChannelError saying what to fix."""
    try:
        connection = BaseHook.get_connection(channel.conn_id)
    except AirflowNotFoundException:
        raise ChannelError(
            f"no Airflow connection {channel.conn_id!r}: create it, e.g. "
            f"{channel.how_to_create()}, or as AIRFLOW_CONN_{channel.conn_id.upper()} or in a "
            f"secrets backend (named by {channel.named_by})"
        ) from None
    try:
        channel.send(alert, connection)
    except Exception as exc:
        # Anything a provider raises: the job is reported on, whatever the channel does.
        reason = _without_secret(f"{type(exc).__name__}: {exc}", connection)
        raise ChannelError(
            f"connection {channel.conn_id!r} (type {channel.conn_type}) failed with {reason}: "
            f"{channel.check}"
        ) from None


def _without_secret(text: str, connection: Connection) -> str:
    """Return `text` with the connection's password masked (Airflow's log masker may be off)."""
    password = connection.password
    return text.replace(password, "***") if password else text


def warn_about_retired_settings(environ: Mapping[str, str]) -> None:
    """Log, for each retired setting still set, that it is ignored and what to set instead."""
    for name, instead in RETIRED_SETTINGS.items():
        if environ.get(name):
            log.error(
                "%s is set but no longer read (secrets belong in Airflow connections): "
                "%s; then unset %s",
                name,
                instead,
                name,
            )
