"""Where a run came from, the job id it gives a new job, and no deadline alert once it is over."""

from __future__ import annotations

import asyncio

import pytest

from llm_batch.orchestration.deadline import job_past_deadline
from llm_batch.orchestration.task_bodies import is_chosen_run_id, run_source


@pytest.mark.parametrize(
    ("run_type", "run_id", "source"),
    [
        ("manual", "manual__2026-12-02T15:44:28.123456+00:00", "ui"),
        ("manual", "cli__job-20261202-154428-ab12cd__20261202T154428000000", "cli"),
        ("manual", "translate-de-1", "api"),
        ("scheduled", "scheduled__2026-12-02T02:00:00+00:00", "scheduled"),
    ],
)
def test_a_jobs_source_tells_the_trigger_form_the_cli_and_the_api_apart(
    run_type: str, run_id: str, source: str
) -> None:
    assert run_source(run_type, run_id) == source


def test_only_a_run_id_a_person_chose_names_the_new_job() -> None:
    assert is_chosen_run_id("translate-de-1")
    assert not is_chosen_run_id("manual__2026-12-02T15:44:28+00:00")
    assert not is_chosen_run_id("cli__job-1__20261202T154428")
    assert not is_chosen_run_id("has spaces and : colons")


@pytest.mark.parametrize("state", ["success", "failed"])
def test_a_run_that_is_over_raises_no_deadline_alert(state: str) -> None:
    context = {
        "dag_run": {"dag_id": "llm_batch_job", "dag_run_id": "r-1", "state": state},
        "deadline": {"deadline_time": "2026-12-02T19:44:28+00:00"},
    }
    # No MongoDB and no webhook here: an alert would have to reach one of them.
    assert asyncio.run(job_past_deadline(context)).startswith("no alert: run r-1 has already ended")
