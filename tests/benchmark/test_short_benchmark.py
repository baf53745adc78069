"""A short benchmark run (500 tasks) under a real stack: the pipeline stays near its floor.

The full benchmark is `make bench` (docs/performance.md); this one keeps the ratio honest in
the test suite: the job DAG at 1 s latency may take at most twice its orchestration floor (the
same DAG against a zero-latency simulator, measured in the same run).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_batch.benchmark import render, run_benchmark

pytestmark = pytest.mark.e2e

MAX_PIPELINE_VS_ORCHESTRATION_FLOOR = 2.0


def test_a_500_task_pipeline_stays_within_twice_its_orchestration_floor(tmp_path: Path) -> None:
    figures = run_benchmark(tasks=500, pool=32, latency_ms=1000.0, work_dir=tmp_path / "bench")
    print(render(figures))
    summary = figures["summary"]
    runs = figures["runs"]
    assert {run["state"] for run in runs.values()} == {"success"}, runs
    assert summary["pipeline_vs_orchestration_floor"] <= MAX_PIPELINE_VS_ORCHESTRATION_FLOOR, (
        render(figures)
    )
    assert summary["pipeline_vs_max_floor"] <= MAX_PIPELINE_VS_ORCHESTRATION_FLOOR, render(figures)
    assert figures["reconcile"]["results"] == 500
