"""Soak: N demo-sized jobs back to back on one stack; none may lose a task instance's final state.

    python -m llm_batch_dev.benchmark --soak 10 [--tasks 5000] [--pool 32]

Each job is what `make demo` runs (5000 tasks, the simulator at its default 300 ms +- 100 ms),
on a stack of its own (temporary work dir, free ports). A job that ends other than `success`,
or in which an instance stayed `running` after its supervisor exited, fails the soak (exit code
1) and the report names the instances. Not a timed test: the figures are wall times per job.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pymongo

from llm_batch import config
from llm_batch_dev.benchmark.measurements import seed_tasks
from llm_batch_dev.benchmark.proc_sampling import idle_cpu_rate
from llm_batch_dev.benchmark.run import bench_stack, machine, run_dag
from llm_batch_dev.stack.settings import DEFAULT_SIMULATOR_CONFIG

log = logging.getLogger(__name__)


def run_soak(
    jobs: int = 10,
    tasks: int = 5000,
    pool: int = config.DEFAULT_POOL_SLOTS,
    work_dir: Path | None = None,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Run `jobs` jobs of `tasks` tasks one after the other; return each one's figures."""
    batches = math.ceil(tasks / config.BATCH_SIZE)
    owned = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="llm-batch-soak-")) if work_dir is None else work_dir
    figures: dict[str, Any] = {
        "settings": {
            "jobs": jobs,
            "tasks": tasks,
            "batches": batches,
            "pool": pool,
            "simulator": dict(DEFAULT_SIMULATOR_CONFIG),
        },
        "machine": machine(),
        "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "jobs": [],
    }
    try:
        with bench_stack(root, pool, simulator_config=dict(DEFAULT_SIMULATOR_CONFIG)) as stack:
            mongo: pymongo.MongoClient[Any] = pymongo.MongoClient(stack.mongo_uri)
            db = mongo[stack.mongo_db_name]
            stack.wait_for_dag(config.JOB_DAG_ID)
            idle = idle_cpu_rate(stack.work_dir, seconds=5.0)
            for number in range(1, jobs + 1):
                label = f"soak{number}"
                seed_tasks(db, label, tasks)
                progress(f"job {number}/{jobs}: {tasks} tasks")
                conf = {"filter": {"payload.run": label}, "limit": tasks, "use_cache": False}
                run = run_dag(stack, label, config.JOB_DAG_ID, conf, batches, idle)
                figures["jobs"].append(run.to_dict())
                (root / "soak.json").write_text(json.dumps(figures, indent=2))
            mongo.close()
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    figures["summary"] = summarize_soak(figures["jobs"])
    return figures


def summarize_soak(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over the jobs: the soak passes when every job succeeded and none lost a state."""
    walls = [job["wall_s"] for job in jobs]
    lost = sum(len(job["lost_final_states"]) for job in jobs)
    return {
        "jobs": len(jobs),
        "succeeded": sum(1 for job in jobs if job["state"] == "success"),
        "lost_final_states": lost,
        "retried_instances": sum(job["retried_instances"] for job in jobs),
        "execution_api_retries": sum(job["execution_api_retries"] for job in jobs),
        "wall_s_min": min(walls, default=0.0),
        "wall_s_median": round(statistics.median(walls), 1) if walls else 0.0,
        "wall_s_max": max(walls, default=0.0),
        "passed": bool(jobs) and lost == 0 and all(job["state"] == "success" for job in jobs),
    }


def render_soak(figures: dict[str, Any]) -> str:
    """A human report of `run_soak`'s figures."""
    s, m, sm = figures["settings"], figures["machine"], figures["summary"]
    lines = [
        f"soak {figures['started_at']}: {s['jobs']} jobs x {s['tasks']} tasks "
        f"({s['batches']} batches), pool {s['pool']}, simulator {json.dumps(s['simulator'])}",
        f"machine: {m['nproc']} cores, {m['mem_total_gb']} GB, load "
        f"{m['loadavg_at_start'][0]:.2f} at start",
        "",
        "job   state     wall s   lost  retried instances  execution-API retries",
    ]
    for number, job in enumerate(figures["jobs"], start=1):
        lines.append(
            f"{number:3d}   {job['state']:8s} {job['wall_s']:7.1f}  "
            f"{len(job['lost_final_states']):5d}"
            f"  {job['retried_instances']:17d}  {job['execution_api_retries']:21d}"
        )
        lines += [f"        lost: {item}" for item in job["lost_final_states"]]
    lines += [
        "",
        f"{sm['succeeded']}/{sm['jobs']} jobs succeeded; {sm['lost_final_states']} lost final "
        f"states; {sm['retried_instances']} retried instances; "
        f"{sm['execution_api_retries']} execution-API retries; wall {sm['wall_s_min']:.1f} / "
        f"{sm['wall_s_median']:.1f} / {sm['wall_s_max']:.1f} s (min / median / max)",
        "PASSED" if sm["passed"] else "FAILED",
    ]
    return "\n".join(lines)
