"""Review decisions against the real Mongo-wire server: what each does, history, races, the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from llm_batch.cli import commands as cli
from llm_batch.jobs import redrive_selection
from llm_batch.request import parse_job_request
from llm_batch.review import REJECTED_IN_REVIEW, Decision, ReviewConflict, ReviewError, Seen, decide
from llm_batch.store import JobStore
from tests.integration.workspace_data import write_job

pytestmark = pytest.mark.integration

AT = datetime(2030, 3, 2, 10, 0, tzinfo=UTC)


def result(store: JobStore, job_id: str, task_id: str) -> dict:
    found = store.results.find_one({"_id": f"{job_id}:{task_id}"})
    assert found is not None
    return found


def test_approve_keeps_the_output_records_who_and_moves_task_and_job_counts(
    store: JobStore,
) -> None:
    job = write_job(store)
    task = job["task_ids"][1]
    decided = decide(store, job["_id"], task, Decision.APPROVE, by="rita", now=lambda: AT)

    assert decided["status"] == "succeeded"
    assert decided["output"] == {"summary": "answer 1"}
    assert decided["review"]["by"] == "rita" and decided["review"]["count"] == 1
    [entry] = decided["review_history"]
    assert entry["decision"] == "approved" and entry["by"] == "rita"
    assert entry["previous"]["status"] == "needs_review"
    task_doc = store.tasks.find_one({"_id": task})
    assert task_doc is not None and task_doc["last_result"]["status"] == "succeeded"
    counts = (store.get_job(job["_id"]) or {})["counts"]
    assert counts["succeeded"] == 2 and counts["needs_review"] == 2


def test_reject_fails_the_result_so_a_redrive_selects_it(store: JobStore) -> None:
    job = write_job(store)
    task = job["task_ids"][2]
    decided = decide(store, job["_id"], task, Decision.REJECT, by="rita", note="made up facts")

    assert decided["status"] == "failed"
    assert decided["error"]["type"] == REJECTED_IN_REVIEW
    assert "made up facts" in decided["error"]["message"]
    request = parse_job_request({"retry_of": job["_id"]})
    assert task in redrive_selection(store, request)
    job_doc = store.get_job(job["_id"]) or {}
    assert {e["type"] for e in job_doc["top_errors"]} == {"invalid_input", REJECTED_IN_REVIEW}


def test_correct_replaces_the_output_and_keeps_the_models_original_once(store: JobStore) -> None:
    job = write_job(store)
    task = job["task_ids"][3]
    decide(store, job["_id"], task, Decision.CORRECT, by="rita", output={"summary": "fixed"})
    again = decide(
        store, job["_id"], task, Decision.CORRECT, by="omar", output={"summary": "fixed twice"}
    )

    assert again["status"] == "succeeded" and again["output"] == {"summary": "fixed twice"}
    assert again["original_output"] == {"summary": "answer 3"}
    assert [h["by"] for h in again["review_history"]] == ["rita", "omar"]
    assert again["review_history"][1]["previous"]["output"] == {"summary": "fixed"}


def test_the_second_of_two_reviewers_is_told_who_decided_and_changes_nothing(
    store: JobStore,
) -> None:
    job = write_job(store)
    task = job["task_ids"][1]
    seen = Seen.of(result(store, job["_id"], task))
    decide(store, job["_id"], task, Decision.APPROVE, by="rita", seen=seen, now=lambda: AT)

    with pytest.raises(ReviewConflict, match="already reviewed by rita at 2030-03-02 10:00:00"):
        decide(store, job["_id"], task, Decision.REJECT, by="omar", seen=seen)
    after = result(store, job["_id"], task)
    assert after["status"] == "succeeded" and len(after["review_history"]) == 1


def test_a_decision_is_undone_by_a_new_decision_and_the_history_keeps_both(
    store: JobStore,
) -> None:
    job = write_job(store)
    task = job["task_ids"][1]
    decide(store, job["_id"], task, Decision.REJECT, by="rita")
    undone = decide(store, job["_id"], task, Decision.APPROVE, by="rita", note="misclick")

    assert undone["status"] == "succeeded" and undone["error"] is None
    assert undone["output"] == {"summary": "answer 1"}
    assert [h["decision"] for h in undone["review_history"]] == ["rejected", "approved"]


def test_an_answer_that_never_needed_review_cannot_be_decided(store: JobStore) -> None:
    job = write_job(store)
    with pytest.raises(ReviewError, match="not waiting for review"):
        decide(store, job["_id"], job["task_ids"][0], Decision.REJECT, by="rita")
    with pytest.raises(ReviewError, match="has no result"):
        decide(store, job["_id"], "no-such-task", Decision.APPROVE, by="rita")


def test_the_review_cli_approves_rejects_corrects_and_still_lists(
    store: JobStore,
    mongo_uri: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LLM_BATCH_MONGO_URI", f"{mongo_uri}/{store.db.name}")
    monkeypatch.setenv("USER", "cli-reviewer")
    job = write_job(store)
    job_id, tasks = job["_id"], job["task_ids"]

    assert cli.main(["review", job_id, "--json"]) == cli.EXIT_OK
    assert len(json.loads(capsys.readouterr().out)) == 3
    assert cli.main(["review", job_id, "approve", tasks[1]]) == cli.EXIT_OK
    assert cli.main(["review", job_id, "reject", tasks[2], "--note", "wrong"]) == cli.EXIT_OK
    assert cli.main(["review", job_id, "correct", tasks[3], "--output", '{"s": 1}']) == cli.EXIT_OK
    assert result(store, job_id, tasks[1])["review"]["by"] == "cli-reviewer"
    assert result(store, job_id, tasks[2])["status"] == "failed"
    assert result(store, job_id, tasks[3])["output"] == {"s": 1}

    capsys.readouterr()
    assert cli.main(["review", job_id, "reject", tasks[1]]) == cli.EXIT_REFUSED
    assert "already reviewed by cli-reviewer" in capsys.readouterr().err
    assert cli.main(["review", job_id, "reject", tasks[1], "--again"]) == cli.EXIT_OK
    assert cli.main(["review", job_id, "correct", tasks[1], "--output", "{bad"]) == cli.EXIT_REFUSED
