"""The run note and the operator-stop check, without Airflow's database."""

from __future__ import annotations

from typing import Any

from llm_batch.run_events import (
    NOTE_MARKER,
    NOTE_MAX_CHARS,
    is_manual_change,
    merge_note,
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
    assert note.startswith(f"{NOTE_MARKER} job-7: partially_failed**")
    assert "40 (30 succeeded, 10 failed, 0 needs_review, 0 cancelled)" in note
    assert "LLM requests: 5; tokens: 1200 in, 300 out; cost: $0.0012" in note
    assert "wall time: 12.3 s" in note
    assert "`invalid_input` x10: task 3: not JSON" in note
    assert "`llm-batch status job-7`" in note


def test_the_note_says_when_an_operator_stopped_the_run() -> None:
    note = summary_note(summary(state="cancelled", stopped_in_airflow="failed"))
    assert "the run was marked failed in Airflow" in note


def test_the_note_fits_airflows_note_column_however_long_the_errors() -> None:
    errors = [{"type": f"t{i}", "count": 1, "example": "x" * 600} for i in range(3)]
    note = summary_note(summary(top_errors=errors))
    assert len(note) == NOTE_MAX_CHARS and note.endswith("…")


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
