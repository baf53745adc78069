"""Benchmark: how close a job comes to its floors, measured side by side in one run.

    python -m llm_batch_dev.benchmark [--tasks 5000] [--pool 32] [--latency-ms 1000] [--json]
    python -m llm_batch_dev.benchmark --soak 10      # ten demo-sized jobs, none may get stuck

Starts its own stack (a work dir of its own, free ports: a running demo is not disturbed) with
a dags folder holding the job DAG and a bare no-op mapped DAG, then measures:

- the orchestration floor: the job DAG against a zero-latency simulator, and the no-op mapped
  DAG with as many instances as the job has batches;
- the LLM floor: requests x latency / pool slots;
- the pipeline: the job DAG at the given latency;
- a reference: a plain thread pool of `pool` LLMClients sending the same requests, no Airflow;
- CPU seconds per batch instance vs a no-op instance (/proc accounting of the stack's process
  tree), peak RSS of a task process and of the scheduler (sampled from /proc);
- reconciling a finished job, parsing each DAG file, and the hook's overhead per request.

A run in which a task instance stayed `running` after its supervisor exited (a lost final
state, `llm_batch_dev.stack.lost_states`) waited for the heartbeat timeout: its wall time is not
a floor. Such a run is said so and run again (`MAX_ATTEMPTS`); the benchmark stops if it keeps
happening. `--soak N` (`soak.py`) runs N demo-sized jobs back to back and counts them.

See docs/performance.md for figures and what they mean.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pymongo
import requests

from llm_batch import config
from llm_batch.cli.local_stack import REPO_ROOT
from llm_batch_dev.benchmark.measurements import (
    hook_overhead,
    parse_times,
    reconcile_timing,
    reference_run,
    seed_tasks,
)
from llm_batch_dev.benchmark.proc_sampling import Sampler, idle_cpu_rate, stack_cpu
from llm_batch_dev.benchmark.report import render, summarize
from llm_batch_dev.stack.launcher import Stack
from llm_batch_dev.stack.settings import StackSettings

log = logging.getLogger(__name__)

NOOP_DAG_ID = "bench_noop_mapped"
BENCH_DAGS = Path(__file__).resolve().parent / "bench_dags"
RUN_TIMEOUT_S = 3600.0
MAX_ATTEMPTS = 3
"""Runs of one measurement before the benchmark gives up on lost final states."""


class BenchmarkError(RuntimeError):
    """A measurement could not be taken cleanly; the message says why."""


# Runs


@dataclass
class RunFigures:
    name: str
    instances: int
    wall_s: float
    """The DAG run's start to end, as Airflow recorded it."""
    state: str
    cpu_s: dict[str, float]
    """CPU the stack used during the run, by part, minus its idle rate."""
    peak_task_rss_mb: float
    peak_scheduler_rss_mb: float
    peak_api_server_rss_mb: float
    peak_stack_rss_mb: float = 0.0
    """Every process of the stack together, at the worst sample."""
    peak_airflow_rss_mb: float = 0.0
    """The stack without MongoDB and the simulator."""
    lost: list[str] = field(default_factory=list)
    """Instances left `running` after their supervisor exited (see `lost_states`)."""
    retried_instances: int = 0
    """Task instances that needed more than one try."""
    api_retries: int = 0
    """Execution-API calls a task sent again (a timeout or a 5xx), from the task logs."""

    @property
    def cpu_total_s(self) -> float:
        return sum(self.cpu_s.values())

    def cpu_per_instance_s(self) -> float:
        return self.cpu_total_s / max(1, self.instances)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "instances": self.instances,
            "wall_s": round(self.wall_s, 2),
            "state": self.state,
            "cpu_s": {k: round(v, 2) for k, v in sorted(self.cpu_s.items())},
            "cpu_total_s": round(self.cpu_total_s, 2),
            "cpu_per_instance_s": round(self.cpu_per_instance_s(), 4),
            "peak_task_rss_mb": round(self.peak_task_rss_mb, 1),
            "peak_scheduler_rss_mb": round(self.peak_scheduler_rss_mb, 1),
            "peak_api_server_rss_mb": round(self.peak_api_server_rss_mb, 1),
            "peak_stack_rss_mb": round(self.peak_stack_rss_mb, 1),
            "peak_airflow_rss_mb": round(self.peak_airflow_rss_mb, 1),
            "lost_final_states": self.lost,
            "retried_instances": self.retried_instances,
            "execution_api_retries": self.api_retries,
        }


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def run_dag(
    stack: Stack,
    name: str,
    dag_id: str,
    conf: Mapping[str, Any],
    instances: int,
    idle_cpu_per_s: Mapping[str, float],
) -> RunFigures:
    """Trigger `dag_id`, wait for it, and measure it."""
    api = stack.airflow_api
    run_id = f"bench-{name}-{int(time.time())}"
    mark = stack.audit_mark()
    before = stack_cpu(stack.work_dir)
    started = time.monotonic()
    with Sampler(stack.work_dir) as sampler:
        api.trigger_dag_run(dag_id, conf, run_id=run_id)
        while True:
            run = api.get_dag_run(dag_id, run_id)
            if run["state"] in ("success", "failed"):
                break
            if time.monotonic() - started > RUN_TIMEOUT_S:
                raise TimeoutError(f"{dag_id} run {run_id} did not finish in {RUN_TIMEOUT_S} s")
            time.sleep(1.0)
    elapsed = time.monotonic() - started
    after = stack_cpu(stack.work_dir)
    cpu = {
        part: max(0.0, after.get(part, 0.0) - before.get(part, 0.0))
        - idle_cpu_per_s.get(part, 0.0) * elapsed
        for part in set(before) | set(after)
    }
    wall = (_parse_time(run["end_date"]) - _parse_time(run["start_date"])).total_seconds()
    lost = [str(item) for item in stack.lost_final_states(since=mark, run_ids={run_id})]
    tries = [int(ti.get("try_number") or 1) for ti in api.list_task_instances(dag_id, run_id)]
    log.info(
        "%s: %s in %.1f s (%d instances; %d lost final states, %d retried instances)",
        name,
        run["state"],
        wall,
        instances,
        len(lost),
        sum(1 for t in tries if t > 1),
    )
    log.debug("process titles seen: %s", sorted(sampler.titles))
    return RunFigures(
        name=name,
        instances=instances,
        wall_s=wall,
        state=str(run["state"]),
        cpu_s={k: max(0.0, v) for k, v in cpu.items()},
        peak_task_rss_mb=sampler.peak_task_rss_mb,
        peak_scheduler_rss_mb=sampler.peak_scheduler_rss_mb,
        peak_api_server_rss_mb=sampler.peak_api_server_rss_mb,
        peak_stack_rss_mb=sampler.peak_stack_rss_mb,
        peak_airflow_rss_mb=sampler.peak_airflow_rss_mb,
        lost=lost,
        retried_instances=sum(1 for t in tries if t > 1),
        api_retries=execution_api_retries(stack, mark.scheduler_log_offset),
    )


def execution_api_retries(stack: Stack, since_offset: int) -> int:
    """Execution-API calls the stack's tasks sent again since `since_offset` of its log, e.g.
    because the api-server did not answer within the client's timeout.

    The supervisors of the LocalExecutor's tasks log to the scheduler's output in
    `logs/airflow.log` (not to the task logs): `Starting call to '...Client.request', this is
    the Nth time calling it.` before each new attempt (tenacity's `before_log`).
    """
    try:
        with (stack.settings.logs_dir / "airflow.log").open("rb") as log:
            log.seek(since_offset)
            return sum(1 for line in log if b"time calling it" in line)
    except FileNotFoundError:
        return 0


def clean_run(name: str, attempt: Callable[[int], RunFigures]) -> RunFigures:
    """`attempt(n)` until a run loses no final state; a run that did is reported, not used."""
    for number in range(1, MAX_ATTEMPTS + 1):
        figures = attempt(number)
        if figures.state != "success":
            raise BenchmarkError(f"the {name} run ended {figures.state}; see the stack's logs")
        if not figures.lost:
            return figures
        log.warning(
            "%s: %d instance(s) stayed running after their supervisor exited, so the run waited "
            "for the heartbeat timeout and its %.1f s are not a floor; %s. Lost: %s",
            name,
            len(figures.lost),
            figures.wall_s,
            "running it again" if number < MAX_ATTEMPTS else "giving up",
            "; ".join(figures.lost[:5]),
        )
    raise BenchmarkError(
        f"every one of {MAX_ATTEMPTS} {name} runs lost a task instance's final state: no figure "
        "is reported from such runs (docs/performance.md, 'Lost final states')."
    )


# The whole benchmark


def prepare_dags(folder: Path) -> list[Path]:
    """A dags folder with the shipped job DAG and the benchmark's no-op mapped DAG."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [REPO_ROOT / "dags" / f"{config.JOB_DAG_ID}.py", BENCH_DAGS / "noop_mapped.py"]
    for source in files:
        shutil.copy2(source, folder / source.name)
    return [folder / source.name for source in files]


def machine() -> dict[str, Any]:
    try:
        meminfo = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        mem_gb = round(int(meminfo[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        mem_gb = None
    return {
        "nproc": os.cpu_count(),
        "mem_total_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }


@contextmanager
def bench_stack(work_dir: Path, pool: int, **overrides: Any) -> Iterator[Stack]:
    dags = work_dir / "dags"
    prepare_dags(dags)
    settings = StackSettings.on_free_ports(
        work_dir,
        pool_slots=pool,
        dags_folder=dags,
        **{"simulator_config": {"latency_ms": 0, "latency_jitter_ms": 0}, **overrides},
    )
    stack = Stack(settings)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def run_benchmark(
    tasks: int = 5000,
    pool: int = 32,
    latency_ms: float = 1000.0,
    work_dir: Path | None = None,
    progress: Callable[[str], None] = log.info,
) -> dict[str, Any]:
    """Run every measurement on a fresh stack; return the figures (see `render`)."""
    batches = math.ceil(tasks / config.BATCH_SIZE)
    owned = work_dir is None
    root = Path(tempfile.mkdtemp(prefix="llm-batch-bench-")) if work_dir is None else work_dir
    figures: dict[str, Any] = {
        "settings": {"tasks": tasks, "batches": batches, "pool": pool, "latency_ms": latency_ms},
        "machine": machine(),
        "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        with bench_stack(root, pool) as stack:
            mongo: pymongo.MongoClient[Any] = pymongo.MongoClient(stack.mongo_uri)
            db = mongo[stack.mongo_db_name]
            sim_url, api_key = stack.llm_url, stack.llm_api_key

            def simulator(**settings: Any) -> None:
                requests.post(f"{sim_url}/admin/config", json=settings, timeout=10)
                requests.post(f"{sim_url}/admin/reset", timeout=10)

            progress("waiting for the DAGs")
            for dag_id in (config.JOB_DAG_ID, NOOP_DAG_ID):
                stack.wait_for_dag(dag_id)

            progress("hook overhead (zero-latency simulator)")
            figures["hook"] = hook_overhead(sim_url, api_key, iterations=300)
            progress("idle CPU of the stack")
            idle = idle_cpu_rate(stack.work_dir)
            figures["idle_cpu_per_s"] = {k: round(v, 3) for k, v in idle.items()}

            labels: dict[str, str] = {}

            def job(name: str) -> Callable[[int], RunFigures]:
                def attempt(number: int) -> RunFigures:
                    label = labels[name] = name if number == 1 else f"{name}{number}"
                    seed_tasks(db, label, tasks)  # fresh tasks: a job answers each task once
                    conf = {"filter": {"payload.run": label}, "limit": tasks, "use_cache": False}
                    return run_dag(stack, name, config.JOB_DAG_ID, conf, batches, idle)

                return attempt

            progress("warm-up: a small no-op run (first-use costs of the api-server workers)")
            warmup = min(batches, pool)
            warm = run_dag(stack, "warmup", NOOP_DAG_ID, {"count": warmup}, warmup, idle)
            figures["warmup_lost_final_states"] = warm.lost
            progress(f"no-op mapped DAG, {batches} instances")
            noop = clean_run(
                "noop",
                lambda _n: run_dag(stack, "noop", NOOP_DAG_ID, {"count": batches}, batches, idle),
            )
            progress("job DAG against a zero-latency simulator (orchestration floor)")
            zero = clean_run("zero", job("zero"))
            progress(f"job DAG at {latency_ms:.0f} ms latency (the pipeline)")
            simulator(latency_ms=latency_ms, latency_jitter_ms=0)
            pipe = clean_run("pipe", job("pipe"))
            progress(f"job DAG at {latency_ms:.0f} ms latency, execution_mode sync")
            stack.set_llm_extra(execution_mode="sync")
            pipe_sync = clean_run("pipe_sync", job("pipe_sync"))
            stack.set_llm_extra()
            progress("reference: a thread pool of plain clients, no Airflow")
            reference = reference_run(sim_url, api_key, batches, pool)
            figures["runs"] = {r.name: r.to_dict() for r in (noop, zero, pipe, pipe_sync)}
            figures["reference_s"] = round(reference, 2)
            (root / "figures.json").write_text(json.dumps(figures, indent=2))

            progress("reconcile a finished job again")
            finished = db.jobs.find_one(
                {"params.filter": {"payload.run": labels["pipe"]}}, {"_id": 1}
            )
            mongo.close()
            if finished is not None:
                figures["reconcile"] = reconcile_timing(
                    stack.mongo_uri, stack.mongo_db_name, str(finished["_id"])
                )
            progress("DAG file parse times")
            try:
                figures["parse_ms"] = parse_times(
                    sorted((root / "dags").glob("*.py")), stack.settings.airflow_home
                )
            except subprocess.CalledProcessError as exc:
                log.error("parsing the DAG files failed: %s", exc.stderr)
                figures["parse_ms"] = {}
            progress("done; stopping the stack")
    finally:
        if owned:
            shutil.rmtree(root, ignore_errors=True)
    figures["summary"] = summarize(figures)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_batch_dev.benchmark", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--pool", type=int, default=config.DEFAULT_POOL_SLOTS)
    parser.add_argument("--latency-ms", type=float, default=1000.0)
    parser.add_argument(
        "--soak",
        type=int,
        metavar="JOBS",
        help="instead: run JOBS demo-sized jobs back to back; fail if one loses a final state",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the stack's files here")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--deferral",
        choices=("on", "off", "only"),
        default="on",
        help="also (or only) compare deferred and sync batches on a stack of their own",
    )
    parser.add_argument("--deferral-pool", type=int, default=128)
    parser.add_argument("--deferral-parallelism", type=int, default=8)
    parser.add_argument("--deferral-latency-ms", type=float, default=30_000.0)
    parser.add_argument(
        "--sync-tasks", type=int, default=400, help="the shortened sync job of the comparison"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    # The client logs every request at INFO: keep the records (their cost is part of the hook's
    # overhead, as in a task), not the screenful.
    hook_log = logging.getLogger("llm_hook")
    hook_log.propagate = False
    hook_log.addHandler(logging.NullHandler())
    if args.soak:
        from llm_batch_dev.benchmark.soak import render_soak, run_soak

        soak = run_soak(args.soak, args.tasks, args.pool, work_dir=args.work_dir)
        print(json.dumps(soak, indent=2) if args.json else render_soak(soak))
        return 0 if soak["summary"]["passed"] else 1
    figures: dict[str, Any] = {}
    reports: list[str] = []
    try:
        if args.deferral != "only":
            work_dir = args.work_dir / "floors" if args.work_dir else None
            figures = run_benchmark(args.tasks, args.pool, args.latency_ms, work_dir=work_dir)
            reports.append(render(figures))
        if args.deferral != "off":
            from llm_batch_dev.benchmark import deferral

            figures["deferral"] = deferral.run_deferral(
                args.tasks,
                args.deferral_pool,
                args.deferral_parallelism,
                args.deferral_latency_ms,
                args.sync_tasks,
                work_dir=args.work_dir / "deferral" if args.work_dir else None,
            )
            reports.append(deferral.render(figures["deferral"]))
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures, indent=2) if args.json else "\n\n".join(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
