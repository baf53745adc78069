"""A short benchmark run (500 tasks) under a real stack: the pipeline stays near its floor.

The full benchmark is `make bench` (docs/performance.md); this one keeps the ratio honest in
the test suite: the job DAG at 1 s latency may take at most twice its orchestration floor (the
same DAG against a zero-latency simulator, measured in the same run).
"""

from __future__ import annotations

import pytest

from llm_batch_dev.benchmark.report import render
from llm_batch_dev.benchmark.run import run_benchmark

pytestmark = pytest.mark.e2e

MAX_PIPELINE_VS_ORCHESTRATION_FLOOR = 2.0


def test_a_500_task_pipeline_stays_within_twice_its_orchestration_floor() -> None:
    # Its own temporary work dir (removed after): one the stack's PostgreSQL can reach as root.
    figures = run_benchmark(tasks=500, pool=32, latency_ms=1000.0)
    print(render(figures))
    summary = figures["summary"]
    runs = figures["runs"]
    assert {run["state"] for run in runs.values()} == {"success"}, runs
    # A run that lost a final state is never used (the benchmark reruns it); nor may the warm-up.
    assert all(run["lost_final_states"] == [] for run in runs.values()), runs
    assert figures["warmup_lost_final_states"] == [], figures["warmup_lost_final_states"]
    assert summary["pipeline_vs_orchestration_floor"] <= MAX_PIPELINE_VS_ORCHESTRATION_FLOOR, (
        render(figures)
    )
    assert summary["pipeline_vs_max_floor"] <= MAX_PIPELINE_VS_ORCHESTRATION_FLOOR, render(figures)
    assert figures["reconcile"]["results"] == 500
