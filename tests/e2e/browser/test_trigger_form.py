"""The trigger form as an operator uses it: what the form shows is what reaches the run, and
the run's page says how it ended.

Each test types into Airflow's real trigger form in Chromium (keyboard, as a person would),
reads the request the form sent, then checks the run's conf through the REST API and the
run's note on its page. Screenshots: `$LLM_BATCH_TEST_OUTPUT/screenshots/form-*.png`.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pymongo
import pytest
import requests

from llm_batch import config
from llm_batch.orchestration.params import FORM_LIMIT, SECTIONS
from llm_batch.orchestration.run_events import NOTE_MARKER
from llm_batch.request import request_field
from llm_batch_dev.simulator import expected_confidence
from tests.e2e.browser.conftest import log_in, screenshot_dir, shoot
from tests.e2e.conftest import E2E_DEADLINE_S, AirflowStack
from tests.e2e.test_job_dag import wait_for_run

pytestmark = pytest.mark.e2e

DAG = config.JOB_DAG_ID


class TriggerForm:
    """Airflow's trigger dialog of the job DAG, driven through the keyboard and mouse."""

    def __init__(self, page: Any, stack: AirflowStack) -> None:
        self.page = page
        self.stack = stack
        self.sent: list[dict[str, Any]] = []
        self.status = 0
        self.run = ""
        """The id of the run the last Trigger created ("" if refused)."""
        page.on("request", self._record)
        page.goto(f"{stack.airflow_url}/dags/{DAG}")
        page.get_by_role("button", name=re.compile("^trigger", re.I)).first.click()
        self.dialog = page.get_by_role("dialog")
        self.dialog.get_by_role("button", name=SECTIONS[request_field("task_ids").group]).wait_for()

    def _record(self, request: Any) -> None:
        if request.method == "POST" and request.url.endswith(f"/dags/{DAG}/dagRuns"):
            self.sent.append(json.loads(request.post_data or "{}"))

    def open_section(self, title: str) -> None:
        """Open a section of the form (Airflow shows one at a time)."""
        header = self.dialog.get_by_role("button", name=title, exact=True)
        if header.get_attribute("aria-expanded") != "true":
            header.click()

    def box(self, name: str) -> Any:
        self.open_section(SECTIONS[request_field(name).group])
        return self.dialog.locator(f"[name=element_{name}]").first

    def type(self, name: str, text: str) -> Any:
        """Replace what field `name` holds by typing `text`, then leave the field."""
        box = self.box(name)
        box.click()
        box.press("Control+a")
        box.press("Delete")
        self.page.keyboard.type(text)
        self.page.keyboard.press("Tab")
        return box

    def shows(self, name: str) -> str:
        return str(self.box(name).input_value())

    def switch(self, name: str) -> None:
        self.open_section(SECTIONS[request_field(name).group])
        self.dialog.locator(f'[id="switch:element_{name}:control"]').click()

    def run_id(self, run_id: str) -> None:
        self.open_section("Advanced Options")
        self.dialog.locator("input[name=dagRunId]").fill(run_id)

    def trigger(self) -> dict[str, Any]:
        """Press Trigger; return the conf the form sent (the new run's id in `self.run`)."""
        button = self.dialog.get_by_test_id("trigger-dag-submit")
        assert button.is_enabled(), "the form refuses to trigger"
        with self.page.expect_response(
            lambda r: r.request.method == "POST" and r.url.endswith(f"/dags/{DAG}/dagRuns")
        ) as answer:
            button.click()
        self.status = answer.value.status
        self.run = str(answer.value.json().get("dag_run_id", "")) if answer.value.ok else ""
        assert self.sent, "the form sent nothing"
        return dict(self.sent[-1]["conf"])


def pending_deadlines(stack: AirflowStack, run_id: str) -> int:
    """Return how many deadlines of the run the UI lists (its Deadlines panel)."""
    api = stack.airflow_api
    answer = requests.get(
        f"{stack.airflow_url}/ui/dags/{DAG}/dagRuns/{run_id}/deadlines",
        headers={"Authorization": f"Bearer {api._login()}"},
        timeout=30,
    )
    answer.raise_for_status()
    return int(answer.json()["total_entries"])


def run_count(stack: AirflowStack) -> int:
    return int(stack.airflow_api._call("GET", f"/dags/{DAG}/dagRuns")["total_entries"])


def note_of(stack: AirflowStack, run_id: str, timeout_s: float = 60) -> str:
    """Return the run's note once the listener wrote it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        note = stack.airflow_api.get_dag_run(DAG, run_id).get("note") or ""
        if note.startswith(NOTE_MARKER):
            return str(note)
        time.sleep(1)
    raise AssertionError(f"run {run_id} has no job note after {timeout_s:.0f} s")


def first_line_on_run_page(page: Any, stack: AirflowStack, run_id: str, name: str) -> str:
    """Open the run's page, screenshot it, and return the note's first line as shown there."""
    note = note_of(stack, run_id)
    first = note.splitlines()[0].strip("*")
    page.goto(f"{stack.airflow_url}/dags/{DAG}/runs/{run_id}")
    page.get_by_text(first, exact=False).first.wait_for()
    shoot(page, f"form-{name}-run-page")
    return first


def db_of(stack: AirflowStack) -> Any:
    return pymongo.MongoClient(stack.mongo_uri)[stack.mongo_db_name]


def seed(stack: AirflowStack, prefix: str, count: int, **payload: Any) -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(count)]
    db_of(stack).tasks.insert_many(
        [{"_id": i, "payload": {"text": f"text of {i}", "group": prefix, **payload}} for i in ids]
    )
    return ids


@pytest.fixture
def form(browser_page: Any, airflow_stack: AirflowStack) -> TriggerForm:
    log_in(browser_page, airflow_stack)
    return TriggerForm(browser_page, airflow_stack)


# Defect 1 (filter) and 8 (layout, defaults)


def test_an_untouched_form_sends_what_it_shows_and_the_run_says_nothing_was_selected(
    form: TriggerForm, airflow_stack: AirflowStack
) -> None:
    form.open_section(SECTIONS[request_field("task_ids").group])
    shoot(form.page, "form-which-tasks")
    form.dialog.screenshot(path=str(screenshot_dir() / "form-dialog-which-tasks.png"))
    shown = {name: form.shows(name) for name in ("filter", "llm_params", "limit")}
    conf = form.trigger()

    assert shown["filter"] == "" and conf["filter"] is None
    assert json.loads(shown["llm_params"]) == conf["llm_params"] == {}
    assert int(shown["limit"]) == conf["limit"] == FORM_LIMIT
    run_id = form.run
    assert wait_for_run(airflow_stack, run_id, timeout_s=300) == "failed"
    first = first_line_on_run_page(form.page, airflow_stack, run_id, "untouched")
    assert first.startswith("LLM batch job refused, nothing was sent: no tasks selected")


def test_the_form_groups_its_fields_and_tells_resume_from_redrive(form: TriggerForm) -> None:
    headers = [
        form.dialog.get_by_role("button", name=title, exact=True) for title in SECTIONS.values()
    ]
    assert all(header.is_visible() for header in headers)
    boxes = [header.bounding_box()["y"] for header in headers]
    assert boxes == sorted(boxes), "sections out of order"

    form.open_section(SECTIONS[request_field("retry_of").group])
    redrive = form.dialog.get_by_text(request_field("retry_of").title, exact=True)
    assert "new job" in redrive.inner_text()
    form.open_section(SECTIONS[request_field("job_id").group])
    resume = form.dialog.get_by_text(request_field("job_id").title, exact=True)
    assert "Resume" in resume.inner_text() and "same job" in resume.inner_text()

    # A switch has a default: no "required" star next to its title (the limit has one).
    def row(name: str) -> Any:
        field = form.page.locator(f"[name=element_{name}]")
        return form.dialog.locator("[role=group]").filter(has=field).last

    assert "*" not in row("use_cache").inner_text()
    form.open_section(SECTIONS[request_field("limit").group])
    assert "*" in row("limit").inner_text()
    assert "*" not in row("dry_run").inner_text()
    form.open_section(SECTIONS[request_field("job_id").group])
    shoot(form.page, "form-resume-and-cache")
    form.open_section(SECTIONS[request_field("limit").group])
    assert form.shows("limit") == str(FORM_LIMIT)
    shoot(form.page, "form-limits")


def test_a_filter_broken_by_an_edit_is_sent_as_typed_and_refused_with_the_reason(
    form: TriggerForm, airflow_stack: AirflowStack
) -> None:
    seed(airflow_stack, "brk-", 3, lang="de")
    form.type("filter", '{"payload.lang": "de"}')
    box = form.box("filter")
    box.click()
    box.press("Control+End")
    box.press("Backspace")  # the closing brace: no longer JSON
    shown = form.shows("filter")
    shoot(form.page, "form-broken-filter")
    conf = form.trigger()

    assert conf["filter"] == shown, "the form sent something other than the broken text"
    run_id = form.run
    assert wait_for_run(airflow_stack, run_id, timeout_s=300) == "failed"
    first = first_line_on_run_page(form.page, airflow_stack, run_id, "broken-filter")
    assert "filter is not valid JSON" in first
    assert db_of(airflow_stack).jobs.count_documents({"run_id": run_id}) == 0


# Defect 2 (numbers)


def test_a_negative_budget_is_sent_as_typed_and_refused_not_dropped(
    form: TriggerForm, airflow_stack: AirflowStack
) -> None:
    seed(airflow_stack, "neg-", 3)
    form.type("filter", '{"payload.group": "neg-"}')
    form.type("max_cost_usd", "-1")
    assert form.shows("max_cost_usd") == "-1"
    shoot(form.page, "form-negative-budget")
    conf = form.trigger()

    assert conf["max_cost_usd"] == "-1"
    run_id = form.run
    assert wait_for_run(airflow_stack, run_id, timeout_s=300) == "failed"
    first = first_line_on_run_page(form.page, airflow_stack, run_id, "negative-budget")
    assert "max_cost_usd -1 is out of range" in first
    assert db_of(airflow_stack).jobs.count_documents({"run_id": run_id}) == 0


@pytest.mark.parametrize(("typed", "bound"), [("0", "minimum of 1"), ("6000", "maximum of 5000")])
def test_a_limit_out_of_range_stays_as_typed_and_the_form_refuses_it(
    form: TriggerForm, airflow_stack: AirflowStack, typed: str, bound: str
) -> None:
    runs_before = run_count(airflow_stack)
    form.type("filter", "{}")
    form.type("limit", typed)
    assert form.shows("limit") == typed, "the form changed the limit the operator typed"
    conf = form.trigger()

    assert conf["limit"] == int(typed)
    form.dialog.get_by_text(re.compile(f"Invalid input for param limit: {typed}")).wait_for()
    assert bound in form.dialog.inner_text()
    shoot(form.page, f"form-limit-{typed}-refused")
    assert form.status == 400 and run_count(airflow_stack) == runs_before


# Defects 3 and 5 (refusals on the run; deadlines of runs that are over)


def test_a_refused_request_says_why_on_its_run_and_leaves_no_deadline_behind(
    form: TriggerForm, airflow_stack: AirflowStack
) -> None:
    form.type("filter", '{"$where": "sleep(1000)"}')
    assert form.trigger()["filter"] == {"$where": "sleep(1000)"}
    queued = time.monotonic()
    run_id = form.run
    assert wait_for_run(airflow_stack, run_id, timeout_s=300) == "failed"

    first = first_line_on_run_page(form.page, airflow_stack, run_id, "refused")
    assert first.startswith(
        "LLM batch job refused, nothing was sent: filter operator $where is not allowed"
    )
    assert pending_deadlines(airflow_stack, run_id) == 0, "the run that is over has a deadline"
    # Past the stack's deadline: a run that is over raises no deadline_missed alert.
    time.sleep(max(0.0, E2E_DEADLINE_S + 15 - (time.monotonic() - queued)))
    late = [
        alert
        for alert in airflow_stack.alerts.alerts
        if "past its deadline" in alert.get("text", "") and run_id in alert.get("text", "")
    ]
    assert not late, late


# Defect 4 (outcomes) and 6 (job id from the run and back)


def test_a_job_with_answers_to_review_says_so_on_the_first_line_of_its_note(
    form: TriggerForm, airflow_stack: AirflowStack
) -> None:
    ids = seed(airflow_stack, "rev-", 40)
    db = db_of(airflow_stack)
    payloads = {t["_id"]: t["payload"] for t in db.tasks.find({"_id": {"$in": ids}})}
    below = sum(1 for i in ids if expected_confidence(payloads[i]) < 0.9)
    form.type("task_ids", "\n".join(ids))
    form.type("review_below", "0.9")
    form.run_id("e2e-form-review")
    shoot(form.page, "form-review-run-id")
    conf = form.trigger()

    assert conf["task_ids"] == ids and conf["review_below"] == "0.9"
    assert wait_for_run(airflow_stack, "e2e-form-review") == "success"
    job = db.jobs.find_one({"run_id": "e2e-form-review"})
    assert job is not None and job["_id"] == "e2e-form-review", "the run id names the job"
    assert job["source"] == "api"  # a run id the caller chose
    first = first_line_on_run_page(form.page, airflow_stack, "e2e-form-review", "review")
    assert first == (
        f"LLM batch job e2e-form-review: needs review, {below} of 40 answers below the "
        "confidence threshold"
    )
    assert "llm-batch review e2e-form-review" in note_of(airflow_stack, "e2e-form-review")


def test_a_dry_run_puts_its_estimate_in_the_note(
    form: TriggerForm, airflow_stack: AirflowStack
) -> None:
    seed(airflow_stack, "dry-", 20)
    form.type("filter", '{"payload.group": "dry-"}')
    form.switch("dry_run")
    conf = form.trigger()

    assert conf["dry_run"] is True and conf["filter"] == {"payload.group": "dry-"}
    run_id = form.run
    assert wait_for_run(airflow_stack, run_id, timeout_s=300) == "success"
    first = first_line_on_run_page(form.page, airflow_stack, run_id, "dry-run")
    assert re.fullmatch(
        r"LLM batch job dry run: 20 tasks, about \$\d+\.\d{4}; nothing was sent", first
    )


def test_a_partially_failed_job_and_a_spent_budget_say_so_and_name_their_job(
    browser_page: Any, airflow_stack: AirflowStack
) -> None:
    log_in(browser_page, airflow_stack)
    ids = seed(airflow_stack, "part-", 18) + seed(
        airflow_stack, "part-x", 2, simulate="invalid_input"
    )
    form = TriggerForm(browser_page, airflow_stack)
    form.type("task_ids", "\n".join(ids))
    form.trigger()
    run_id = form.run
    assert run_id.startswith("manual__")
    try:
        assert wait_for_run(airflow_stack, run_id) == "failed"
    finally:
        # Tasks that always fail would fail the nightly run of a later test (its backlog).
        db_of(airflow_stack).tasks.delete_many({"payload.simulate": {"$exists": True}})
    job = db_of(airflow_stack).jobs.find_one({"run_id": run_id})
    assert job is not None and job["source"] == "ui"
    first = first_line_on_run_page(browser_page, airflow_stack, run_id, "partial")
    assert first == f"LLM batch job {job['_id']}: partially failed, 2 of 20 tasks failed"

    seed(airflow_stack, "budget-", 150)
    form = TriggerForm(browser_page, airflow_stack)
    form.type("filter", '{"payload.group": "budget-"}')
    form.type("max_cost_usd", "0.000001")
    conf = form.trigger()
    assert conf["max_cost_usd"] == "0.000001"
    run_id = form.run
    wait_for_run(airflow_stack, run_id)
    first = first_line_on_run_page(browser_page, airflow_stack, run_id, "budget")
    assert re.fullmatch(
        r"LLM batch job \S+: budget exhausted, \$\d+\.\d{4} of \$0.000001 spent; \d+ of "
        rf"{FORM_LIMIT} tasks not sent",
        first,
    ), first
