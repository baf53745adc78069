"""The deferral comparison's verdict: floors, the scaled sync time, memory per request."""

from __future__ import annotations

from typing import Any

from llm_batch_dev.benchmark.deferral import render, summarize


def run(wall_s: float, peak_in_flight: int, stack_mb: float) -> dict[str, Any]:
    return {
        "wall_s": wall_s,
        "peak_in_flight": peak_in_flight,
        "peak_stack_rss_mb": stack_mb,
        "peak_airflow_rss_mb": stack_mb - 200,
        "tasks_billed": 10,
        "job_counts": {"succeeded": 10},
    }


FIGURES: dict[str, Any] = {
    "settings": {
        "tasks": 5000,
        "batches": 500,
        "sync_tasks": 400,
        "sync_batches": 40,
        "pool": 128,
        "parallelism": 8,
        "latency_ms": 30000.0,
    },
    "deferred": run(140.0, 128, 2560.0),
    "sync": run(160.0, 8, 3200.0),
}


def test_the_sync_time_is_scaled_to_the_full_job_and_memory_is_per_request_in_flight() -> None:
    summary = summarize(FIGURES)
    assert summary["llm_floor_s"] == 117.2
    assert summary["worker_slot_floor_s"] == 1875.0
    assert summary["deferred_vs_llm_floor"] == round(140 / 117.1875, 3)
    assert summary["sync_scaled_s"] == 2000.0
    assert summary["deferred_stack_mb_per_request"] == 20.0
    assert summary["sync_stack_mb_per_request"] == 400.0
    assert summary["memory_per_request_ratio"] == 0.05
    assert all(summary["targets"].values())
    report = render({**FIGURES, "summary": summary})
    assert "scaled x 12.50" in report and "[MISSED]" not in report


def test_a_deferred_run_slower_than_the_target_is_reported_missed() -> None:
    slow = {**FIGURES, "deferred": run(400.0, 128, 2560.0)}
    summary = summarize(slow)
    assert not summary["targets"]["deferred <= 1.3 x LLM floor"]
    assert "[MISSED] deferred <= 1.3 x LLM floor" in render({**slow, "summary": summary})
