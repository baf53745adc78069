"""Alerts fire only past the threshold and name the top error and the next step."""

from __future__ import annotations

import email
import http.server
import json
import socketserver
import threading
from email import policy
from typing import Any

import pytest

from llm_batch.alerts import deadline_alert, failure_rate_alert, notify
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
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Any:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Capture.received = []
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_notify_logs_always_and_posts_to_a_configured_webhook(
    webhook: str, caplog: pytest.LogCaptureFixture
) -> None:
    alert = failure_rate_alert(summary(40), 0.3)
    assert alert is not None
    assert notify(alert, webhook_url=webhook) == ["log", "webhook"]
    assert "ALERT failure_rate for job job-1" in caplog.text
    assert _Capture.received[0]["text"] == alert.text
    assert _Capture.received[0]["job_id"] == "job-1"


def test_an_unreachable_webhook_does_not_raise(caplog: pytest.LogCaptureFixture) -> None:
    alert = deadline_alert(None, "run-1", "soon", {})
    assert notify(alert, webhook_url="http://127.0.0.1:9/nothing") == ["log"]
    assert "alert webhook failed" in caplog.text


class _SMTPSink(socketserver.StreamRequestHandler):
    """Just enough SMTP (RFC 5321) to take one message: EHLO, MAIL, RCPT, DATA, QUIT."""

    messages: list[dict[str, Any]] = []

    def reply(self, line: str) -> None:
        self.wfile.write(f"{line}\r\n".encode())

    def handle(self) -> None:
        envelope: dict[str, Any] = {"to": []}
        self.reply("220 sink ready")
        while line := self.rfile.readline().decode().rstrip("\r\n"):
            verb = line.split(" ", 1)[0].upper()
            if verb in ("EHLO", "HELO"):
                self.reply("250 sink")
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
def smtp_server() -> Any:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _SMTPSink)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _SMTPSink.messages = []
    yield f"smtp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_alert_is_emailed_when_smtp_and_recipients_are_configured(smtp_server: str) -> None:
    alert = failure_rate_alert(summary(40), 0.3)
    assert alert is not None
    env = {"LLM_BATCH_ALERT_SMTP": smtp_server, "LLM_BATCH_ALERT_EMAIL_TO": "ops@example.com"}
    assert notify(alert, environ=env) == ["log", "email"]
    [sent] = _SMTPSink.messages
    assert sent["to"] == ["ops@example.com"] and sent["from"] == "llm-batch@localhost"
    assert sent["message"]["Subject"] == "[llm-batch] failure_rate: job job-1"
    assert sent["message"].get_content().replace("\r\n", "\n").strip() == alert.text


def test_a_bad_smtp_setting_is_logged_with_what_to_fix_and_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    alert = deadline_alert(None, "run-1", "soon", {})
    env = {"LLM_BATCH_ALERT_SMTP": "mail.example.com:25", "LLM_BATCH_ALERT_EMAIL_TO": "a@b.c"}
    assert notify(alert, environ=env) == ["log"]
    assert "LLM_BATCH_ALERT_SMTP must look like smtp://" in caplog.text
    env["LLM_BATCH_ALERT_SMTP"] = "smtp://bob:s3cret@127.0.0.1:9"
    assert notify(alert, environ=env) == ["log"]
    assert "alert e-mail via smtp://bob:***@127.0.0.1:9 failed" in caplog.text
    assert "s3cret" not in caplog.text


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
