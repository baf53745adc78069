"""The run note and the operator-stop check, without Airflow's database."""

from __future__ import annotations

from typing import Any

import pytest

from llm_batch.orchestration.run_events import (
    NOTE_MARKER,
    NOTE_MAX_CHARS,
    dry_run_note,
    is_manual_change,
    merge_note,
    refused_note,
    summary_note,
)


def summary(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": "job-7",
        "state": "partially_failed",
        "task_count": 40,
        "counts": {"succeeded": 30, "failed": 10, "needs_review": 0, "cancelled": 0},
        "requests": 5,
        "usage": {"input_tokens": 1200, "output_tokens": 300},
        "cost_usd": 0.00123,
        "wall_time_s": 12.34,
        "top_errors": [{"type": "invalid_input", "count": 10, "example": "task 3: not JSON"}],
    }
    return {**base, **overrides}


def test_the_note_gives_state_counts_cost_time_errors_and_where_to_look() -> None:
    note = summary_note(summary())
    assert note.startswith(f"{NOTE_MARKER} job-7: partially failed, 10 of 40 tasks failed**")
    assert "40 (30 succeeded, 10 failed, 0 needs_review, 0 cancelled)" in note
    assert "LLM requests: 5; tokens: 1200 in, 300 out; cost: $0.0012" in note
    assert "wall time: 12.3 s" in note
    assert "`invalid_input` x10: task 3: not JSON" in note
    assert "`llm-batch status job-7`" in note


def test_a_nightly_note_says_how_many_backlog_tasks_it_left_for_each_reason() -> None:
    skipped = {"awaiting_review": 4, "failed_permanently": 2, "attempts_cap": 7}
    note = summary_note(summary(backlog_skipped=skipped))
    assert (
        "- backlog tasks not sent again: 4 awaiting review, 2 failed permanently, 7 attempts cap"
        in note
    )
    assert "backlog" not in summary_note(summary(backlog_skipped=None))


def test_the_note_says_when_an_operator_stopped_the_run() -> None:
    note = summary_note(summary(state="cancelled", stopped_in_airflow="failed"))
    assert "the run was marked failed in Airflow" in note


def test_the_note_fits_airflows_note_column_however_long_the_errors() -> None:
    errors = [{"type": f"t{i}", "count": 1, "example": "x" * 600} for i in range(3)]
    note = summary_note(summary(top_errors=errors))
    assert len(note) <= NOTE_MAX_CHARS and note.count("…") == 3


def test_a_persons_note_is_kept_below_ours_and_our_old_note_is_replaced() -> None:
    ours = summary_note(summary())
    assert merge_note(ours, None) == ours
    assert merge_note(ours, summary_note(summary(state="running"))) == ours
    merged = merge_note(ours, "re-run after the provider outage -- ana")
    assert merged.startswith(ours) and merged.endswith("re-run after the provider outage -- ana")
    assert len(merge_note(ours, "y" * 2000)) == NOTE_MAX_CHARS


def test_only_a_persons_state_change_counts_as_a_stop() -> None:
    assert is_manual_change("Dag Run's state was manually set to `failed`.")
    assert not is_manual_change("task_failure")
    assert not is_manual_change("success")


ALL_ANSWERED = {"succeeded": 40, "failed": 0, "needs_review": 0, "cancelled": 0}


@pytest.mark.parametrize(
    ("overrides", "first_line"),
    [
        ({"state": "succeeded", "counts": ALL_ANSWERED, "top_errors": []},
         "succeeded, 40 of 40 answered, $0.0012"),
        ({"state": "succeeded", "top_errors": [],
          "counts": {**ALL_ANSWERED, "succeeded": 8, "needs_review": 32}},
         "needs review, 32 of 40 answers below the confidence threshold"),
        ({}, "partially failed, 10 of 40 tasks failed"),
        ({"state": "failed", "counts": {**ALL_ANSWERED, "succeeded": 0, "failed": 40}},
         "failed, 40 of 40 tasks failed"),
        ({"state": "cancelled", "budget_usd": 0.001,
          "counts": {**ALL_ANSWERED, "succeeded": 28, "cancelled": 12},
          "top_errors": [{"type": "budget_exhausted", "count": 12, "example": "not sent"}]},
         "budget exhausted, $0.0012 of $0.001 spent; 12 of 40 tasks not sent"),
        ({"state": "cancelled", "stopped_in_airflow": "failed",
          "counts": {**ALL_ANSWERED, "succeeded": 15, "cancelled": 25},
          "top_errors": [{"type": "cancelled", "count": 25, "example": "not sent"}]},
         "cancelled, 25 of 40 tasks not sent"),
    ],
)  # fmt: skip
def test_the_notes_first_line_says_the_outcome_and_its_key_figure(
    overrides: dict[str, Any], first_line: str
) -> None:
    note = summary_note(summary(**overrides))
    assert note.splitlines()[0] == f"{NOTE_MARKER} job-7: {first_line}**"


def test_a_note_with_answers_to_review_says_how_to_review_them() -> None:
    counts = {**ALL_ANSWERED, "succeeded": 8, "needs_review": 32}
    note = summary_note(summary(state="succeeded", counts=counts, top_errors=[]))
    assert "`llm-batch review job-7` lists the 32 answers" in note


def test_a_note_with_unsent_tasks_says_how_to_resume_and_with_failures_how_to_redrive() -> None:
    unsent = [{"type": "not_processed", "count": 3, "example": "batch 0 gave up"}]
    assert "Resume job = job-7" in summary_note(summary(top_errors=unsent))
    assert "Re-drive = job-7" in summary_note(summary())


def test_a_dry_runs_note_gives_the_estimate_on_its_first_line() -> None:
    estimate = {"task_count": 30, "requests": 3, "input_tokens": 900, "output_tokens": 300,
                "cost_usd": 0.0123, "basis": "simulator prices"}  # fmt: skip
    note = dry_run_note(estimate)
    assert (
        note.splitlines()[0]
        == f"{NOTE_MARKER} dry run: 30 tasks, about $0.0123; nothing was sent**"
    )
    assert "3 LLM requests, about 900 input + 300 output tokens" in note


def test_a_refusals_note_gives_the_reason_on_its_first_line_and_the_others_below() -> None:
    note = refused_note(["filter operator $where is not allowed", "limit 0 is out of range"])
    lines = note.splitlines()
    assert (
        lines[0]
        == f"{NOTE_MARKER} refused, nothing was sent: filter operator $where is not allowed**"
    )
    assert "- also: limit 0 is out of range" in lines
