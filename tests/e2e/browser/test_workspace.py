"""The workspace in a real browser on the real stack: log in, charts, a job, review decisions.

Runs a small real job whose low-confidence answers end `needs_review`, then drives Debian's
Chromium through the pages as a reviewer would, and checks MongoDB afterwards. A second
browser context without a login gets no data. Screenshots of each page are written to the
test output dir (`docs/workspace-*.png` are copies of them).
"""

from __future__ import annotations

import re
import time
from typing import Any

import pymongo
import pytest

from tests.e2e.browser.conftest import VIEWPORT, log_in, shoot
from tests.e2e.conftest import AirflowStack
from tests.e2e.test_job_dag import seed_tasks, trigger, wait_for_run

pytestmark = pytest.mark.e2e

JOB_ID = "job-20300101-000000-e2e0ws"
WORKSPACE = "/llm-batch"


@pytest.fixture(scope="module")
def reviewed_job(airflow_stack: AirflowStack) -> dict[str, Any]:
    """A finished 40-task job whose answers below 0.8 confidence wait for review."""
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(airflow_stack.mongo_uri)
    db = client[airflow_stack.mongo_db_name]
    task_ids = seed_tasks(db, "ws-", 40)
    conf = {
        "task_ids": task_ids,
        "limit": 40,
        "instructions": "Summarize in one sentence.",
        "review_below": 0.8,
        "job_id": JOB_ID,
    }
    assert wait_for_run(airflow_stack, trigger(airflow_stack, conf, "manual__ws_e2e")) in (
        "success",
        "failed",
    )
    waiting = db.results.count_documents({"job_id": JOB_ID, "status": "needs_review"})
    assert waiting >= 3, f"the job left only {waiting} answers for review"
    return {"db": db, "client": client, "task_ids": task_ids}


def test_a_reviewer_sees_charts_opens_the_job_and_approves_rejects_corrects(
    airflow_stack: AirflowStack, reviewed_job: dict[str, Any], browser_page: Any
) -> None:
    page, db = browser_page, reviewed_job["db"]
    base = airflow_stack.airflow_url + WORKSPACE
    log_in(page, airflow_stack)

    page.goto(f"{base}/jobs")
    charts = page.locator("svg.chart")
    assert charts.count() == 4
    for i in range(4):
        assert charts.nth(i).locator("rect, circle, polyline").count() > 0, f"chart {i} is empty"
    assert page.get_by_role("link", name=JOB_ID).is_visible()
    assert page.locator("table.jobs th[scope=col]").count() >= 9
    shoot(page, "workspace-jobs")

    # Inside Airflow's own UI: the navigation entry opens the same page in its frame.
    page.goto(f"{airflow_stack.airflow_url}/plugin/llm-batch-jobs")
    frame = page.frame_locator("iframe")
    frame.locator("svg.chart").first.wait_for(state="visible")
    shoot(page, "workspace-in-airflow")

    page.goto(f"{base}/jobs")
    page.get_by_role("link", name=JOB_ID).click()
    page.wait_for_url(re.compile(f"/jobs/{JOB_ID}$"))
    assert page.locator("svg.chart").count() == 2
    assert page.locator("svg.chart text.threshold-label").text_content() == "review below 0.8"
    shoot(page, "workspace-job")

    page.get_by_role("link", name="review them").click()
    page.wait_for_url(re.compile(r"/review\?job_id="))
    shoot(page, "workspace-review")
    first, second, third = (page.locator(".review-item h2").nth(i).inner_text() for i in range(3))

    page.locator(".review-item").nth(0).get_by_role("button", name="Approve").click()
    page.wait_for_url(re.compile("notice="))
    # The keyboard: the first item is the next one waiting; `r` rejects it.
    assert page.locator(".review-item h2").first.inner_text() == second
    page.keyboard.press("r")
    page.wait_for_url(re.compile("notice=.*rejected"))
    item = page.locator(".review-item").first
    assert item.locator("h2").inner_text() == third
    page.keyboard.press("c")
    item.locator("textarea").fill('{"summary": "corrected by a person"}')
    item.get_by_role("button", name="Save correction").click()
    page.wait_for_url(re.compile("notice=.*corrected"))
    shoot(page, "workspace-review-after")

    user = airflow_stack.stack.airflow_username
    results = {
        r["task_id"]: r
        for r in db.results.find({"job_id": JOB_ID, "task_id": {"$in": [first, second, third]}})
    }
    assert results[first]["status"] == "succeeded"
    assert results[second]["status"] == "failed"
    assert results[second]["error"]["type"] == "rejected_in_review"
    assert results[third]["output"] == {"summary": "corrected by a person"}
    assert "original_output" in results[third]
    for result in results.values():
        assert result["review"]["by"] == user
        assert result["review_history"][0]["previous"]["status"] == "needs_review"
    assert db.tasks.find_one({"_id": second})["last_result"]["status"] == "failed"
    job = db.jobs.find_one({"_id": JOB_ID})
    assert job["counts"]["needs_review"] == db.results.count_documents(
        {"job_id": JOB_ID, "status": "needs_review"}
    )


def test_a_browser_without_a_login_gets_no_data(
    airflow_stack: AirflowStack, reviewed_job: dict[str, Any], chromium: Any
) -> None:
    context = chromium.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        page.goto(f"{airflow_stack.airflow_url}{WORKSPACE}/jobs")
        deadline = time.monotonic() + 30
        while "login" not in page.url and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "login" in page.url
        assert JOB_ID not in page.content()
        for path in ("/api/jobs", f"/api/jobs/{JOB_ID}/progress", f"/jobs/{JOB_ID}/results.csv"):
            response = context.request.get(f"{airflow_stack.airflow_url}{WORKSPACE}{path}")
            assert response.status == 401, path
            assert JOB_ID not in response.text()
        refused = context.request.post(
            f"{airflow_stack.airflow_url}{WORKSPACE}/review/decide",
            form={"job_id": JOB_ID, "task_id": "ws-00000", "decision": "approve"},
        )
        assert refused.status == 401
    finally:
        context.close()
