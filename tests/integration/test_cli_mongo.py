"""The CLI's MongoDB commands against the real Mongo-wire server."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from llm_batch.cli import commands as cli
from llm_batch.jobs import create_job
from llm_batch.store import JobStore
from tests.integration.test_pipeline import seed

pytestmark = pytest.mark.integration


@pytest.fixture
def cli_env(store: JobStore, mongo_uri: str, monkeypatch: pytest.MonkeyPatch) -> JobStore:
    monkeypatch.setenv("LLM_BATCH_MONGO_URI", f"{mongo_uri}/{store.db.name}")
    return store


def test_cancel_flags_a_running_job_once_and_refuses_an_unknown_one(
    cli_env: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(cli_env, 12)
    job_id = create_job(cli_env, {"filter": {}}, dag_id="d", run_id="r", source="ui").job_id

    assert cli.main(["cancel", job_id]) == cli.EXIT_OK
    job = cli_env.get_job(job_id)
    assert job is not None and job["cancel"]["by"]
    assert cli.main(["cancel", "no-such-job"]) == cli.EXIT_JOB_NOT_OK
    assert "cannot be cancelled" in capsys.readouterr().err


def test_history_lists_recent_jobs_newest_first(
    cli_env: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    seed(cli_env, 5)
    first = create_job(
        cli_env, {"filter": {}}, dag_id="d", run_id="r1", source="ui", triggered_by="ana"
    ).job_id
    second = create_job(
        cli_env, {"filter": {}}, dag_id="d", run_id="r2", source="scheduled",
        now=lambda: datetime(2030, 1, 1, tzinfo=UTC),
    ).job_id  # fmt: skip
    capsys.readouterr()
    assert cli.main(["history", "--json"]) == cli.EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [r["job_id"] for r in rows] == [second, first]
    assert rows[0]["source"] == "scheduled"
    assert [r["triggered_by"] for r in rows] == ["scheduled", "ana"]
    assert cli.main(["history"]) == cli.EXIT_OK
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["created", "(UTC)", "job", "state"]
    assert "review" in table[0].split()
    assert table[1].startswith("2030-01-01 00:00") and second in table[1]
    assert "ana" in table[2]


def test_review_of_an_unknown_job_is_an_error_not_an_empty_list(
    cli_env: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["review", "NO_SUCH_JOB"]) == cli.EXIT_JOB_NOT_OK
    assert "no job 'NO_SUCH_JOB'" in capsys.readouterr().err


def test_review_lists_the_needs_review_answers(
    cli_env: JobStore, capsys: pytest.CaptureFixture[str]
) -> None:
    cli_env.jobs.insert_one({"_id": "j", "state": "succeeded"})
    cli_env.results.insert_many(
        [
            {
                "_id": "j:a",
                "job_id": "j",
                "task_id": "a",
                "status": "needs_review",
                "confidence": 0.6,
            },
            {"_id": "j:b", "job_id": "j", "task_id": "b", "status": "succeeded", "confidence": 0.9},
        ]
    )
    assert cli.main(["review", "j"]) == cli.EXIT_OK
    captured = capsys.readouterr()
    assert "a\tconfidence 0.6" in captured.out and "b\t" not in captured.out
    assert "1 answers of job j need review" in captured.err
