"""The workspace app over HTTP (in-process ASGI) on the real Mongo-wire server.

Airflow's login is stood in for by `FixedAccess` / a logged-out access here; the real login
is exercised by the browser test (`tests/e2e/browser/test_workspace.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

from llm_batch.store import JobStore
from llm_batch.workspace.app import FixedAccess, Viewer, create_app
from tests.integration.workspace_data import CREATED, write_job

pytestmark = pytest.mark.integration


class LoggedOut(FixedAccess):
    async def viewer(self, request: Request) -> Viewer | None:
        return None

    def login_url(self, request: Request) -> str:
        return "/auth/login?next=here"


@pytest.fixture
def access(store: JobStore) -> FixedAccess:
    return FixedAccess(store, "rita")


@pytest.fixture
def client(access: FixedAccess) -> Iterator[TestClient]:
    with TestClient(create_app(access), follow_redirects=False) as client:
        yield client


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page)
    assert found, "the page carries no form token"
    return found.group(1)


def decide_form(
    job: dict[str, Any], task: str, decision: str, token: str, **extra: str
) -> dict[str, str]:
    return {
        "csrf_token": token,
        "job_id": job["_id"],
        "task_id": task,
        "decision": decision,
        "seen_status": "needs_review",
        "seen_decisions": "0",
        **extra,
    }


def test_the_jobs_page_draws_four_charts_and_a_table_of_jobs(
    store: JobStore, client: TestClient
) -> None:
    job = write_job(store)
    later = CREATED + timedelta(days=1)
    write_job(store, "job-20300302-100000-bbbbbb", ("succeeded",), state="succeeded", created=later)

    page = client.get("/jobs")
    assert page.status_code == 200
    assert page.text.count('<svg class="chart"') == 4
    assert page.text.count('<rect class="bar"') >= 2 and "<polyline" in page.text
    assert f'href="/jobs/{job["_id"]}"' in page.text
    assert "<table" in page.text and '<th scope="col">State</th>' in page.text
    only = client.get("/jobs", params={"state": "succeeded"}).text
    assert "job-20300302-100000-bbbbbb" in only and job["_id"] not in only
    data = client.get("/api/jobs").json()
    assert data["total"] == 2 and data["jobs"][0]["job_id"] == "job-20300302-100000-bbbbbb"


@pytest.mark.parametrize("source", ["ui", "cli", "api", "scheduled"])
def test_the_source_filter_offers_and_finds_the_sources_jobs_are_stored_with(
    store: JobStore, client: TestClient, source: str
) -> None:
    job = write_job(store, source=source)
    other = "cli" if source != "cli" else "ui"
    write_job(store, "job-20300302-100000-bbbbbb", ("succeeded",), source=other)

    page = client.get("/jobs").text
    assert f'<option value="{source}"' in page
    listed = client.get("/api/jobs", params={"source": source}).json()
    assert [row["job_id"] for row in listed["jobs"]] == [job["_id"]]
    assert listed["jobs"][0]["source"] == source


def test_a_job_page_shows_its_request_histogram_with_threshold_and_errors(
    store: JobStore, client: TestClient
) -> None:
    job = write_job(store)
    page = client.get(f"/jobs/{job['_id']}")
    assert page.status_code == 200
    assert "review below 0.5" in page.text
    assert "&#34;instructions&#34;: &#34;Summarize.&#34;" in page.text
    assert "invalid_input" in page.text and "read timed out" in page.text
    assert client.get("/jobs/no-such-job").status_code == 404
    progress = client.get(f"/api/jobs/{job['_id']}/progress").json()
    assert progress == {
        "job_id": job["_id"],
        "state": "partially_failed",
        "answered": 5,
        "total": 5,
        "final": True,
    }


def test_results_download_as_streamed_csv_and_jsonl(store: JobStore, client: TestClient) -> None:
    job = write_job(store)
    with client.stream("GET", f"/jobs/{job['_id']}/results.csv") as response:
        assert response.headers["content-type"].startswith("text/csv")
        lines = list(response.iter_lines())
    assert lines[0].startswith("job_id,task_id,batch_no,status")
    assert len(lines) == 1 + 5
    jsonl = client.get(f"/jobs/{job['_id']}/results.jsonl").text.splitlines()
    assert len(jsonl) == 5 and '"status": "failed"' in jsonl[-1]


def test_approve_reject_correct_from_the_queue_and_the_second_reviewer_is_refused(
    store: JobStore, client: TestClient
) -> None:
    job = write_job(store)
    queue = client.get("/review")
    token = csrf_of(queue.text)
    assert queue.text.count('class="review-item"') == 3
    t1, t2, t3 = job["task_ids"][1:4]

    approved = client.post("/review/decide", data=decide_form(job, t1, "approve", token))
    assert approved.status_code == 303 and "notice=" in approved.headers["location"]
    client.post("/review/decide", data=decide_form(job, t2, "reject", token, note="wrong"))
    client.post(
        "/review/decide", data=decide_form(job, t3, "correct", token, output='{"summary": "ok"}')
    )
    statuses = {r["task_id"]: r for r in store.results.find({"job_id": job["_id"]})}
    assert statuses[t1]["status"] == "succeeded" and statuses[t1]["review"]["by"] == "rita"
    assert statuses[t2]["error"]["type"] == "rejected_in_review"
    assert statuses[t3]["output"] == {"summary": "ok"}
    assert statuses[t3]["original_output"] == {"summary": "answer 3"}

    late = client.post(
        "/review/decide",
        data=decide_form(job, t1, "reject", token),
        headers={"Accept": "application/json"},
    )
    assert late.status_code == 409
    assert late.json()["detail"].startswith("already reviewed by rita at ")
    assert 'class="review-item"' not in client.get("/review").text
    assert client.get("/review", params={"show": "reviewed"}).text.count('class="review-item"') == 3


def test_changes_need_a_post_with_the_pages_token_from_the_same_site(
    store: JobStore, client: TestClient
) -> None:
    job = write_job(store)
    token = csrf_of(client.get("/review").text)
    form = decide_form(job, job["task_ids"][1], "approve", token)

    assert client.get("/review/decide", params=form).status_code == 405
    assert client.post("/review/decide", data={**form, "csrf_token": "0" * 64}).status_code == 403
    cross = client.post("/review/decide", data=form, headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status_code == 403
    assert client.post(f"/jobs/{job['_id']}/cancel", data={}).status_code == 403
    assert store.results.find_one({"task_id": job["task_ids"][1]})["status"] == "needs_review"


def test_without_a_login_pages_redirect_to_it_and_json_gets_401(store: JobStore) -> None:
    job = write_job(store)
    with TestClient(create_app(LoggedOut(store)), follow_redirects=False) as client:
        for path in ("/jobs", f"/jobs/{job['_id']}", "/review"):
            response = client.get(path)
            assert response.status_code == 302, path
            assert response.headers["location"].startswith("/auth/login")
        for path in (
            "/api/jobs",
            f"/api/jobs/{job['_id']}/progress",
            f"/jobs/{job['_id']}/results.csv",
        ):
            assert client.get(path).status_code == 401, path
        assert client.post("/review/decide", data={}).status_code == 401


def test_a_reader_without_trigger_permission_sees_pages_but_cannot_decide(
    store: JobStore,
) -> None:
    job = write_job(store)
    reader = FixedAccess(store, "viewer", may_operate=False)
    with TestClient(create_app(reader), follow_redirects=False) as client:
        page = client.get("/review")
        assert page.status_code == 200 and "(read only)" in page.text
        assert "Approve" not in page.text
        refused = client.post(
            "/review/decide", data=decide_form(job, job["task_ids"][1], "approve", "")
        )
        assert refused.status_code == 403


def test_redrive_and_cancel_from_the_job_page_after_confirmation(
    store: JobStore, client: TestClient, access: FixedAccess
) -> None:
    job = write_job(store)
    confirm = client.get(f"/jobs/{job['_id']}/confirm", params={"action": "redrive-needs-review"})
    assert confirm.status_code == 200 and "Yes, redrive needs review" in confirm.text
    token = csrf_of(confirm.text)

    done = client.post(f"/jobs/{job['_id']}/redrive-needs-review", data={"csrf_token": token})
    assert done.status_code == 303 and "re-drive+triggered" in done.headers["location"]
    [triggered] = access.triggered
    assert triggered["user"] == "rita"
    assert triggered["conf"]["retry_of"] == job["_id"]
    assert triggered["conf"]["include_needs_review"] is True

    refused = client.post(f"/jobs/{job['_id']}/cancel", data={"csrf_token": token})
    assert "cannot+be+cancelled" in refused.headers["location"]
    running = write_job(store, "job-20300301-110000-cccccc", ("succeeded",), state="running")
    client.post(f"/jobs/{running['_id']}/cancel", data={"csrf_token": token})
    assert (store.get_job(running["_id"]) or {})["cancel"]["by"] == "rita"
