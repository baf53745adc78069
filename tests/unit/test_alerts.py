"""Alerts fire only past the threshold and name the top error and the next step; they reach
the log, and e-mail and Slack through Airflow's notifiers on Airflow connections."""

from __future__ import annotations

import email
import html
import http.server
import json
import logging
import socketserver
import threading
from email import policy
from typing import Any

import pytest

from llm_batch import config
from llm_batch.alerts import deadline_alert, failure_rate_alert
from llm_batch.orchestration.alert_channels import notify
from llm_batch.request import default_of

DEFAULT_RATE = default_of("alert_failure_rate")


def summary(failed: int, total: int = 100, error_type: str = "invalid_input") -> dict[str, Any]:
    return {
        "job_id": "job-1",
        "task_count": total,
        "counts": {"succeeded": total - failed, "failed": failed},
        "top_errors": [{"type": error_type, "count": failed, "example": "payload has no text"}]
        if failed
        else [],
    }


def test_no_alert_at_five_percent_failures() -> None:
    assert failure_rate_alert(summary(5), DEFAULT_RATE) is None


def test_no_alert_exactly_at_the_threshold() -> None:
    assert failure_rate_alert(summary(30), 0.30) is None


def test_alert_at_forty_percent_names_the_top_error_and_what_to_do() -> None:
    alert = failure_rate_alert(summary(40), DEFAULT_RATE)
    assert alert is not None
    assert "40% of 100 tasks failed" in alert.text
    assert "invalid_input x40, e.g. payload has no text" in alert.text
    assert "Next: fix the payloads" in alert.text
    assert "`llm-batch submit --retry-of job-1`" in alert.text


def test_an_unknown_error_type_still_gets_a_next_step() -> None:
    alert = failure_rate_alert(summary(50, error_type="weird"), 0.3)
    assert alert is not None and "error.type 'weird'" in alert.text


def test_deadline_alert_gives_the_jobs_progress_and_how_to_check_and_cancel() -> None:
    job = {"_id": "job-9", "task_count": 100}
    errors = [{"type": "not_processed", "count": 3, "example": "batch 4 gave up: 503"}]
    alert = deadline_alert(
        job, "run-9", "2026-11-22T03:00:00Z", {"succeeded": 40, "failed": 3}, errors
    )
    assert alert.kind == "deadline_missed" and alert.job_id == "job-9"
    assert "past its deadline of 2026-11-22T03:00:00Z" in alert.text
    assert "43 of 100 tasks have a result (3 failed, 40 succeeded)." in alert.text
    assert "not_processed x3, e.g. batch 4 gave up: 503" in alert.text
    assert "llm-batch status job-9" in alert.text and "llm-batch cancel job-9" in alert.text


def test_deadline_alert_for_a_run_that_has_no_job_yet_points_at_create_job() -> None:
    alert = deadline_alert(None, "run-3", "soon", {})
    assert alert.job_id == "run-3" and "create_job" in alert.text


class _Capture(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Capture.received.append(json.loads(body))
        # Slack answers 200 "ok"; the provider's hook takes anything else as a failure.
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Any:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Capture.received = []
    yield f"http://127.0.0.1:{server.server_address[1]}/services/T0/B0/hook-token-s3cret"
    server.shutdown()
    server.server_close()


def add_connection(monkeypatch: pytest.MonkeyPatch, conn_id: str, **fields: Any) -> None:
    """Define an Airflow connection the way a deployment can: an AIRFLOW_CONN_<ID> variable."""
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(fields))


def slack_settings(conn_id: str) -> dict[str, str]:
    return {config.ALERT_SLACK_CONN_ID_ENV: conn_id}


def test_without_settings_an_alert_goes_to_the_log_only(caplog: pytest.LogCaptureFixture) -> None:
    alert = deadline_alert(None, "run-1", "soon", {})
    assert notify(alert, environ={}) == ["log"]
    assert "ALERT deadline_missed for job run-1" in caplog.text


def test_an_alert_is_posted_through_the_slack_webhook_connection(
    webhook: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    add_connection(monkeypatch, "alert_slack_test", conn_type="slackwebhook", password=webhook)
    alert = failure_rate_alert(summary(40), 0.3)
    assert alert is not None
    assert notify(alert, environ=slack_settings("alert_slack_test")) == ["log", "slack"]
    assert "ALERT failure_rate for job job-1" in caplog.text
    [posted] = _Capture.received
    assert posted["text"] == alert.text


def test_an_unreachable_webhook_is_logged_without_its_url_and_does_not_raise(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = "http://127.0.0.1:9/services/T0/B0/hook-token-s3cret"
    add_connection(monkeypatch, "alert_slack_test", conn_type="slackwebhook", password=url)
    alert = deadline_alert(None, "run-1", "soon", {})
    assert notify(alert, environ=slack_settings("alert_slack_test")) == ["log"]
    assert "alert slack not sent: connection 'alert_slack_test' (type slackwebhook)" in caplog.text
    assert "s3cret" not in caplog.text


def test_a_missing_connection_is_logged_with_how_to_create_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    alert = deadline_alert(None, "run-1", "soon", {})
    env = {**slack_settings("no_such_alert_conn"), config.ALERT_EMAIL_TO_ENV: "ops@example.com",
           config.ALERT_SMTP_CONN_ID_ENV: "no_such_smtp_conn"}  # fmt: skip
    assert notify(alert, environ=env) == ["log"]
    assert "no Airflow connection 'no_such_alert_conn'" in caplog.text
    assert "airflow connections add no_such_alert_conn --conn-type slackwebhook" in caplog.text
    assert "no Airflow connection 'no_such_smtp_conn'" in caplog.text
    assert "airflow connections add no_such_smtp_conn --conn-type smtp" in caplog.text


def test_retired_settings_are_not_used_and_the_log_says_what_to_set_instead(
    webhook: str, caplog: pytest.LogCaptureFixture
) -> None:
    alert = deadline_alert(None, "run-1", "soon", {})
    env = {
        "LLM_BATCH_ALERT_WEBHOOK": webhook,
        "LLM_BATCH_ALERT_SMTP": "smtp://bob:pa55word@127.0.0.1:9",
    }
    assert notify(alert, environ=env) == ["log"]
    assert _Capture.received == []
    assert "LLM_BATCH_ALERT_WEBHOOK is set but no longer read" in caplog.text
    assert "--conn-type slackwebhook" in caplog.text
    assert f"{config.ALERT_SLACK_CONN_ID_ENV}={config.ALERT_SLACK_CONN_ID}" in caplog.text
    assert "LLM_BATCH_ALERT_SMTP is set but no longer read" in caplog.text
    assert f"airflow connections add {config.DEFAULT_ALERT_SMTP_CONN_ID} --conn-type smtp" in (
        caplog.text
    )
    assert "s3cret" not in caplog.text and "pa55word" not in caplog.text


class _SMTPSink(socketserver.StreamRequestHandler):
    """Just enough SMTP (RFC 5321) to take one message: EHLO, AUTH, MAIL, RCPT, DATA, QUIT.

    It offers AUTH PLAIN and refuses every login, as a server does on a wrong password.
    """

    messages: list[dict[str, Any]] = []
    logins: list[str] = []

    def reply(self, line: str) -> None:
        self.wfile.write(f"{line}\r\n".encode())

    def handle(self) -> None:
        envelope: dict[str, Any] = {"to": []}
        self.reply("220 sink ready")
        while line := self.rfile.readline().decode().rstrip("\r\n"):
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250-sink")
                self.reply("250 AUTH PLAIN")
            elif verb == "AUTH":
                _SMTPSink.logins.append(line)
                self.reply("535 5.7.8 authentication credentials invalid")
            elif verb == "MAIL":
                envelope["from"] = line.split(":", 1)[1].strip(" <>")
                self.reply("250 OK")
            elif verb == "RCPT":
                envelope["to"].append(line.split(":", 1)[1].strip(" <>"))
                self.reply("250 OK")
            elif verb == "DATA":
                self.reply("354 go on")
                body = []
                while (data := self.rfile.readline().decode()) not in (".\r\n", ""):
                    body.append(data)
                envelope["message"] = email.message_from_string(
                    "".join(body), policy=policy.default
                )
                _SMTPSink.messages.append(envelope)
                self.reply("250 queued")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("502 not here")


@pytest.fixture
def smtp_port() -> Any:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SMTPSink)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _SMTPSink.messages = []
    _SMTPSink.logins = []
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


PLAIN_SMTP = {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 5}
"""The sink speaks plain SMTP: no implicit TLS, no STARTTLS."""


def email_settings(conn_id: str, to: str = "ops@example.com") -> dict[str, str]:
    return {config.ALERT_EMAIL_TO_ENV: to, config.ALERT_SMTP_CONN_ID_ENV: conn_id}


def test_an_alert_is_emailed_through_the_smtp_connection(
    smtp_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra = {**PLAIN_SMTP, "from_email": "alerts@example.com"}
    add_connection(monkeypatch, "alert_smtp_test", conn_type="smtp", host="127.0.0.1",
                   port=smtp_port, extra=extra)  # fmt: skip
    steered = "<b>bold</b> & more"
    alert = failure_rate_alert(
        {**summary(40), "top_errors": [{"type": "http_400", "count": 40, "example": steered}]},
        0.3,
    )
    assert alert is not None
    env = email_settings("alert_smtp_test", "ops@example.com, lead@example.com")
    assert notify(alert, environ=env) == ["log", "email"]
    [sent] = _SMTPSink.messages
    assert sent["to"] == ["ops@example.com", "lead@example.com"]
    assert sent["from"] == "alerts@example.com"
    assert sent["message"]["Subject"] == "[llm-batch] failure_rate: job job-1"
    [part] = [p for p in sent["message"].walk() if p.get_content_type() == "text/html"]
    body = part.get_content()
    # The alert's text, every line of it, and the provider's words as text, not markup.
    assert "<b>" not in body
    assert body.startswith("<pre>") and body.endswith("</pre>")
    assert html.unescape(body.removeprefix("<pre>").removesuffix("</pre>")) == alert.text


def test_the_sender_setting_wins_over_the_connections_and_a_default_stands_in_for_none(
    smtp_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_connection(monkeypatch, "alert_smtp_test", conn_type="smtp", host="127.0.0.1",
                   port=smtp_port, extra=PLAIN_SMTP)  # fmt: skip
    alert = deadline_alert(None, "run-1", "soon", {})
    assert notify(alert, environ=email_settings("alert_smtp_test")) == ["log", "email"]
    env = {**email_settings("alert_smtp_test"), config.ALERT_EMAIL_FROM_ENV: "me@example.com"}
    assert notify(alert, environ=env) == ["log", "email"]
    assert [m["from"] for m in _SMTPSink.messages] == ["llm-batch@localhost", "me@example.com"]


def test_a_refused_smtp_login_is_logged_without_the_password_and_does_not_raise(
    smtp_port: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    add_connection(monkeypatch, "alert_smtp_test", conn_type="smtp", host="127.0.0.1",
                   port=smtp_port, login="bob", password="pa55word-s3cret",
                   extra=PLAIN_SMTP)  # fmt: skip
    alert = deadline_alert(None, "run-1", "soon", {})
    assert notify(alert, environ=email_settings("alert_smtp_test")) == ["log"]
    assert len(_SMTPSink.logins) == 1, "the password was offered to the server"
    assert _SMTPSink.messages == []
    assert "alert email not sent: connection 'alert_smtp_test' (type smtp) failed with " in (
        caplog.text
    )
    assert "SMTPAuthenticationError" in caplog.text and "535" in caplog.text
    assert "pa55word" not in caplog.text


def test_provider_text_in_an_alert_is_one_capped_line_that_cannot_mention_or_link() -> None:
    from llm_batch.quoting import ALERT_QUOTE_CHARS

    steered = "bad input\nNext: ignore this <!channel> <https://evil.example|click> " + "x" * 900
    alert = failure_rate_alert(
        {
            "job_id": "job-1",
            "task_count": 10,
            "counts": {"failed": 10},
            "top_errors": [{"type": "http_400", "count": 10, "example": steered}],
        },
        DEFAULT_RATE,
    )
    assert alert is not None
    quoted = next(line for line in alert.text.splitlines() if line.startswith("- http_400"))
    assert "<!channel>" not in alert.text and "<https://" not in alert.text
    assert "&lt;!channel&gt;" in quoted
    assert not any(line.startswith("Next: ignore") for line in alert.text.splitlines())
    example = quoted.split("e.g. ", 1)[1]
    assert example.endswith("…") and len(example.replace("&lt;", "<").replace("&gt;", ">")) <= (
        ALERT_QUOTE_CHARS
    )


def test_a_deadline_alert_caps_the_provider_text_it_quotes() -> None:
    alert = deadline_alert(
        {"_id": "job-1", "task_count": 10},
        "run-1",
        "4h",
        {"failed": 1},
        [{"type": "timeout", "count": 1, "example": "y" * 5000}],
    )
    assert len(alert.text) < 1000
