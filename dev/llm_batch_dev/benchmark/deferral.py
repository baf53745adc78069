"""Deferred vs synchronous batches, side by side on one stack: who caps requests in flight.

    python -m llm_batch_dev.benchmark.run --deferral only [--tasks 5000] [--deferral-pool 128]
        [--deferral-parallelism 8] [--deferral-latency-ms 30000] [--sync-tasks 400]

A stack of its own with few worker slots (`parallelism`) and a large pool, the simulator at a
long latency. The same job DAG runs twice, switched by the `llm_default` connection's
`execution_mode`: `deferred` over every task, `sync` over a shortened job (bounded by the worker
slots it takes `batches x latency / parallelism`; its time is scaled to the full job and the
report says so). For each: the wall time against the LLM floor (batches x latency / pool), the
simulator's peak of requests in flight, and the stack's peak RSS divided by that peak.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pymongo
import requests

from llm_batch import config
from llm_batch_dev.benchmark.measurements import seed_tasks
from llm_batch_dev.benchmark.proc_sampling import idle_cpu_rate
from llm_batch_dev.benchmark.run import NOOP_DAG_ID, bench_stack, machine, run_dag
from llm_batch_dev.stack.settings import DEFAULT_LLM_EXTRA

log = logging.getLogger(__name__)

TARGET_DEFERRED_VS_LLM_FLOOR = 1.3
TARGET_MEMORY_PER_REQUEST_RATIO = 0.1
"""Deferred memory per request in flight, at most this fraction of synchronous."""


def run_deferral(
    tasks: int = 5000,
    pool: int = 128,
    parallelism: int = 8,
    latency_ms: float = 30_000.0,
    sync_tasks: int = 400,
    work_dir: Path | None = None,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Run the job DAG in both execution modes on one stack; return the figures."""
    owned = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="llm-batch-deferral-")) if work_dir is None else work_dir
    batches = math.ceil(tasks / config.BATCH_SIZE)
    sync_batches = math.ceil(min(sync_tasks, tasks) / config.BATCH_SIZE)
    figures: dict[str, Any] = {
        "settings": {
            "tasks": tasks,
            "batches": batches,
            "sync_tasks": sync_batches * config.BATCH_SIZE,
            "sync_batches": sync_batches,
            "pool": pool,
            "parallelism": parallelism,
            "latency_ms": latency_ms,
        },
        "machine": machine(),
    }
    try:
        figures.update(_measure(root, figures["settings"], progress))
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    figures["summary"] = summarize(figures)
    return figures


def _measure(root: Path, s: Mapping[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    """Run both modes on a fresh stack in `root`; return each run's figures."""
    pool, parallelism, latency_ms = s["pool"], s["parallelism"], s["latency_ms"]
    batches, sync_batches = s["batches"], s["sync_batches"]
    figures: dict[str, Any] = {}
    # The read timeout must outlast the simulated latency, or every request times out.
    extra = {**DEFAULT_LLM_EXTRA, "timeout_s": max(60.0, 3 * latency_ms / 1000.0)}
    with bench_stack(
        root,
        pool,
        simulator_config={"latency_ms": latency_ms, "latency_jitter_ms": 0},
        llm_extra=extra,
        # Fewer worker slots than pool slots: the point of the comparison.
        airflow_env={"AIRFLOW__CORE__PARALLELISM": str(parallelism)},
    ) as stack:
        mongo: pymongo.MongoClient[Any] = pymongo.MongoClient(stack.mongo_uri)
        db = mongo[stack.mongo_db_name]
        sim_url = stack.llm_url
        progress("waiting for the DAGs")
        for dag_id in (config.JOB_DAG_ID, NOOP_DAG_ID):
            stack.wait_for_dag(dag_id)
        seed_tasks(db, "deferred", batches * config.BATCH_SIZE)
        seed_tasks(db, "sync", sync_batches * config.BATCH_SIZE)
        idle = idle_cpu_rate(stack.work_dir)
        run_dag(stack, "warmup", NOOP_DAG_ID, {"count": parallelism}, parallelism, idle)

        def job(mode: str, label: str, count: int) -> dict[str, Any]:
            stack.set_llm_extra(execution_mode=mode)
            requests.post(f"{sim_url}/admin/reset", timeout=10).raise_for_status()
            conf = {"filter": {"payload.run": label}, "limit": count, "use_cache": False}
            run = run_dag(stack, mode, config.JOB_DAG_ID, conf, math.ceil(count / 10), idle)
            stats = requests.get(f"{sim_url}/stats", timeout=10).json()
            counts = (db.jobs.find_one({"params.filter": {"payload.run": label}}) or {}).get(
                "counts", {}
            )
            return {
                **run.to_dict(),
                "peak_in_flight": stats["peak_in_flight"],
                "tasks_billed": stats["tasks_billed"],
                "job_counts": {k: v for k, v in counts.items() if v},
            }

        progress(f"deferred: {batches} batches, pool {pool}, {parallelism} worker slots")
        figures["deferred"] = job("deferred", "deferred", batches * config.BATCH_SIZE)
        progress(f"sync: {sync_batches} batches (shortened), same stack")
        figures["sync"] = job("sync", "sync", sync_batches * config.BATCH_SIZE)
        stack.set_llm_extra()
        mongo.close()
    return figures


def summarize(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The ratios the deferral targets are about."""
    s, deferred, sync = figures["settings"], figures["deferred"], figures["sync"]
    latency_s = s["latency_ms"] / 1000.0
    llm_floor = s["batches"] * latency_s / s["pool"]
    scale = s["batches"] / s["sync_batches"]

    def per_request(run: Mapping[str, Any], key: str) -> float:
        return round(run[key] / max(1, run["peak_in_flight"]), 1)

    summary: dict[str, Any] = {
        "llm_floor_s": round(llm_floor, 1),
        "worker_slot_floor_s": round(s["batches"] * latency_s / s["parallelism"], 1),
        "deferred_s": deferred["wall_s"],
        "deferred_vs_llm_floor": round(deferred["wall_s"] / llm_floor, 3),
        "sync_measured_s": sync["wall_s"],
        "sync_scaled_s": round(sync["wall_s"] * scale, 1),
        "sync_scale": round(scale, 2),
        "sync_scaled_vs_llm_floor": round(sync["wall_s"] * scale / llm_floor, 2),
    }
    for mode, run in (("deferred", deferred), ("sync", sync)):
        summary[f"{mode}_peak_in_flight"] = run["peak_in_flight"]
        summary[f"{mode}_stack_mb_per_request"] = per_request(run, "peak_stack_rss_mb")
        summary[f"{mode}_airflow_mb_per_request"] = per_request(run, "peak_airflow_rss_mb")
    ratio = summary["deferred_stack_mb_per_request"] / max(
        0.1, summary["sync_stack_mb_per_request"]
    )
    summary["memory_per_request_ratio"] = round(ratio, 3)
    summary["targets"] = {
        f"deferred <= {TARGET_DEFERRED_VS_LLM_FLOOR} x LLM floor": summary["deferred_vs_llm_floor"]
        <= TARGET_DEFERRED_VS_LLM_FLOOR,
        "deferred memory per request in flight <= 1/10 of sync": ratio
        <= TARGET_MEMORY_PER_REQUEST_RATIO,
        "deferred requests in flight <= pool": 0 < deferred["peak_in_flight"] <= s["pool"],
    }
    return summary


def render(figures: Mapping[str, Any]) -> str:
    """A human report of `run_deferral`'s figures."""
    s, sm = figures["settings"], figures["summary"]
    deferred, sync = figures["deferred"], figures["sync"]
    latency_s = s["latency_ms"] / 1000.0
    lines = [
        f"deferral: {s['tasks']} tasks = {s['batches']} batches, pool {s['pool']}, "
        f"{s['parallelism']} worker slots (parallelism), latency {latency_s:.0f} s",
        "",
        f"  LLM floor ({s['batches']} x {latency_s:.0f} s / {s['pool']})"
        f"          {sm['llm_floor_s']:8.1f} s",
        f"  worker-slot floor ({s['batches']} x {latency_s:.0f} s / {s['parallelism']})"
        f"    {sm['worker_slot_floor_s']:8.1f} s",
        f"  deferred ({s['batches']} batches)               {sm['deferred_s']:8.1f} s"
        f"   {sm['deferred_vs_llm_floor']:.2f} x LLM floor (target <= "
        f"{TARGET_DEFERRED_VS_LLM_FLOOR})",
        f"  sync, shortened ({s['sync_batches']} batches)       {sm['sync_measured_s']:8.1f} s"
        f"   measured",
        f"  sync, scaled x {sm['sync_scale']:.2f} to {s['batches']} batches"
        f"  {sm['sync_scaled_s']:8.1f} s   {sm['sync_scaled_vs_llm_floor']:.2f} x LLM floor",
        "",
        "memory per request in flight (peak RSS summed over the stack's processes / the "
        "simulator's peak of requests in flight)",
    ]
    for mode, run in (("deferred", deferred), ("sync", sync)):
        stack_mb, airflow_mb = run["peak_stack_rss_mb"], run["peak_airflow_rss_mb"]
        lines.append(
            f"  {mode:8s} {stack_mb:8.0f} MB stack ({airflow_mb:.0f} MB Airflow) / "
            f"{run['peak_in_flight']:3d} in flight = "
            f"{sm[f'{mode}_stack_mb_per_request']:7.1f} MB "
            f"({sm[f'{mode}_airflow_mb_per_request']:.1f} MB Airflow) per request; "
            f"job {run['job_counts']}, {run['tasks_billed']} tasks billed"
        )
    lines += [
        f"  deferred / sync                      {sm['memory_per_request_ratio']:8.3f}"
        f"   (target <= {TARGET_MEMORY_PER_REQUEST_RATIO})",
        "",
        "targets:",
    ]
    for target, met in sm["targets"].items():
        lines.append(f"  [{'met' if met else 'MISSED'}] {target}")
    return "\n".join(lines)
