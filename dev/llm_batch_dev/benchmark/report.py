"""The benchmark's verdict: the ratios its targets are about, and a human report."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Targets (issue 5); the benchmark prints each figure against its target.
TARGET_PIPELINE_VS_FLOOR = 1.25
TARGET_CPU_VS_NOOP = 1.15
TARGET_PARSE_MS = 50.0
TARGET_RECONCILE_S = 2.0
TARGET_HOOK_OVERHEAD_MS = 5.0


def summarize(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The ratios the targets are about."""
    s = figures["settings"]
    runs = figures["runs"]
    llm_floor = s["batches"] * s["latency_ms"] / 1000.0 / s["pool"]
    orchestration_floor = runs["zero"]["wall_s"]
    floor = max(orchestration_floor, llm_floor)
    pipe = runs["pipe"]
    noop_cpu = runs["noop"]["cpu_per_instance_s"]
    summary: dict[str, Any] = {
        "llm_floor_s": round(llm_floor, 2),
        "orchestration_floor_s": orchestration_floor,
        "noop_dag_s": runs["noop"]["wall_s"],
        "pipeline_s": pipe["wall_s"],
        "reference_s": figures["reference_s"],
        "pipeline_vs_max_floor": round(pipe["wall_s"] / floor, 3),
        "pipeline_sync_s": runs["pipe_sync"]["wall_s"],
        "pipeline_sync_vs_max_floor": round(runs["pipe_sync"]["wall_s"] / floor, 3),
        "pipeline_vs_orchestration_floor": round(pipe["wall_s"] / orchestration_floor, 3),
        "pipeline_vs_reference": round(pipe["wall_s"] / figures["reference_s"], 2),
        "cpu_per_batch_instance_s": pipe["cpu_per_instance_s"],
        "cpu_per_noop_instance_s": noop_cpu,
        "cpu_batch_vs_noop": round(pipe["cpu_per_instance_s"] / noop_cpu, 3) if noop_cpu else None,
        "peak_task_rss_mb": max(pipe["peak_task_rss_mb"], runs["zero"]["peak_task_rss_mb"]),
        "peak_scheduler_rss_mb": max(
            pipe["peak_scheduler_rss_mb"], runs["zero"]["peak_scheduler_rss_mb"]
        ),
        "hook_overhead_ms": figures["hook"]["overhead_ms"],
    }
    if "reconcile" in figures:
        summary["reconcile_s"] = figures["reconcile"]["reconcile_s"]
    summary["slowest_parse_ms"] = max(
        (v["best_ms"] for v in figures["parse_ms"].values()), default=math.inf
    )
    summary["targets"] = {
        "pipeline <= 1.25 x max(floors)": summary["pipeline_vs_max_floor"]
        <= TARGET_PIPELINE_VS_FLOOR,
        "cpu per batch instance <= 1.15 x no-op": summary["cpu_batch_vs_noop"] is not None
        and summary["cpu_batch_vs_noop"] <= TARGET_CPU_VS_NOOP,
        "each DAG file parses in <= 50 ms": summary["slowest_parse_ms"] <= TARGET_PARSE_MS,
        "reconcile <= 2 s": summary.get("reconcile_s", math.inf) <= TARGET_RECONCILE_S,
        "hook overhead <= 5 ms": summary["hook_overhead_ms"] <= TARGET_HOOK_OVERHEAD_MS,
    }
    return summary


def render(figures: Mapping[str, Any]) -> str:
    """A human report of `run_benchmark`'s figures."""
    s, m, sm = figures["settings"], figures["machine"], figures["summary"]
    runs = figures["runs"]
    lines = [
        f"benchmark {figures['started_at']}: {s['tasks']} tasks = {s['batches']} batches, "
        f"pool {s['pool']}, latency {s['latency_ms']:.0f} ms",
        f"machine: {m['nproc']} cores, {m['mem_total_gb']} GB, Python {m['python']}, "
        f"{m['platform']}, load {m['loadavg_at_start'][0]:.2f} at start",
        "",
        "wall time",
        f"  LLM floor ({s['batches']} x {s['latency_ms'] / 1000:.2f} s / {s['pool']})"
        f"        {sm['llm_floor_s']:8.1f} s",
        f"  orchestration floor (job DAG, 0 ms)  {sm['orchestration_floor_s']:8.1f} s",
        f"  no-op mapped DAG ({s['batches']} instances)   {sm['noop_dag_s']:8.1f} s",
        f"  pipeline (job DAG, {s['latency_ms']:.0f} ms)        {sm['pipeline_s']:8.1f} s",
        f"  reference (thread pool, no Airflow)  {sm['reference_s']:8.1f} s",
        f"  pipeline, execution_mode sync        {sm['pipeline_sync_s']:8.1f} s",
        f"  pipeline / max(floors)               {sm['pipeline_vs_max_floor']:8.2f}"
        f"   (target <= {TARGET_PIPELINE_VS_FLOOR}; sync {sm['pipeline_sync_vs_max_floor']:.2f})",
        f"  pipeline / reference                 {sm['pipeline_vs_reference']:8.2f}",
        "",
        "CPU (whole stack, idle rate subtracted), per mapped instance",
    ]
    for name in ("noop", "zero", "pipe", "pipe_sync"):
        run = runs[name]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in run["cpu_s"].items() if v >= 0.05)
        lines.append(
            f"  {name:9s} {run['cpu_per_instance_s']:6.3f} CPU-s/instance  "
            f"({run['cpu_total_s']:.1f} CPU-s: {parts})"
        )
    lines += [
        f"  batch / no-op                        {sm['cpu_batch_vs_noop']:8.2f}"
        f"   (target <= {TARGET_CPU_VS_NOOP})",
        "",
        "memory (peak RSS, sampled every 0.5 s)",
        f"  task process                         {sm['peak_task_rss_mb']:8.1f} MB",
        f"  scheduler                            {sm['peak_scheduler_rss_mb']:8.1f} MB",
        f"  api-server (largest process)         {runs['pipe']['peak_api_server_rss_mb']:8.1f} MB",
        "",
    ]
    if "reconcile" in figures:
        rec = figures["reconcile"]
        lines.append(
            f"reconcile {rec['results']} results: {rec['reconcile_s']:.3f} s "
            f"(set_last_results alone {rec['set_last_results_s']:.3f} s; target <= "
            f"{TARGET_RECONCILE_S} s)"
        )
    lines.append("DAG file parse (DagBag per file; first / best of 10):")
    for name, value in figures["parse_ms"].items():
        lines.append(f"  {name:28s} {value['first_ms']:7.1f} / {value['best_ms']:6.1f} ms")
    hook = figures["hook"]
    lines += [
        f"hook overhead: LLMClient.complete {hook['hook_median_ms']:.2f} ms vs raw POST "
        f"{hook['raw_median_ms']:.2f} ms (median of {hook['iterations']}): "
        f"{hook['overhead_ms']:+.2f} ms/request (target <= {TARGET_HOOK_OVERHEAD_MS} ms)",
        "",
        "lost final states (instances left running after their supervisor exited): "
        f"{len(figures.get('warmup_lost_final_states', []))} in the warm-up; none in the runs "
        "above (a run with any is reported and run again, never used)",
        "execution-API retries by tasks (client timeout or 5xx): "
        + ", ".join(f"{name} {runs[name].get('execution_api_retries', 0)}" for name in runs),
        "",
        "targets:",
    ]
    for target, met in sm["targets"].items():
        lines.append(f"  [{'met' if met else 'MISSED'}] {target}")
    return "\n".join(lines)
