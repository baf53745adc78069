"""Benchmark: how close a job comes to its floors, measured side by side in one run.

    python -m llm_batch.benchmark [--tasks 5000] [--pool 32] [--latency-ms 1000] [--json]

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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pymongo
import requests

from llm_batch import config, processes
from llm_batch.stack import MARKER, REPO_ROOT, Stack, StackSettings

log = logging.getLogger(__name__)

NOOP_DAG_ID = "bench_noop_mapped"
BENCH_DAGS = Path(__file__).resolve().parent / "bench_dags"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
RUN_TIMEOUT_S = 3600.0
SAMPLE_INTERVAL_S = 0.5

# Targets (issue 5); the benchmark prints each figure against its target.
TARGET_PIPELINE_VS_FLOOR = 1.25
TARGET_CPU_VS_NOOP = 1.15
TARGET_PARSE_MS = 50.0
TARGET_RECONCILE_S = 2.0
TARGET_HOOK_OVERHEAD_MS = 5.0


# /proc accounting of the stack's process tree


def _category(cmdline: str) -> str:
    """Which part of the stack a process is, from its (rewritten) command line."""
    text = cmdline.lower()
    for needle, name in (
        ("llm_batch.simulator", "simulator"),
        ("secantus", "mongo"),
        ("mongo", "mongo"),
        ("api-server", "api-server"),
        ("api_server", "api-server"),
        ("uvicorn", "api-server"),
        ("gunicorn", "api-server"),
        ("dag-processor", "dag-processor"),
        ("dag_processor", "dag-processor"),
        ("triggerer", "triggerer"),
        ("task", "tasks"),
        ("worker", "tasks"),
        ("executor", "tasks"),
        ("scheduler", "scheduler"),
    ):
        if needle in text:
            return name
    return "other"


@dataclass
class ProcSample:
    pid: int
    ppid: int
    cmdline: str
    cpu_s: float
    """Own CPU plus that of reaped children (utime + stime + cutime + cstime)."""
    rss_mb: float


def _read_proc(pid: int) -> ProcSample | None:
    base = Path(f"/proc/{pid}")
    try:
        fields = (base / "stat").read_text().rsplit(")", 1)[1].split()
        rss_pages = int((base / "statm").read_text().split()[1])
        cmdline = (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError, ValueError):
        return None
    ticks = sum(int(value) for value in fields[11:15])
    return ProcSample(
        pid, int(fields[1]), cmdline.strip(), ticks / CLK_TCK, rss_pages * PAGE_SIZE / 2**20
    )


def stack_pids(work_dir: Path) -> list[int]:
    """Every live process in a session of the stack in `work_dir` (not this process)."""
    everything = processes.snapshot()
    marker = f"{MARKER}={work_dir}".encode()
    sessions = {p.sid for p in everything if marker in p.environ or p.cwd == str(work_dir)}
    sessions.discard(os.getsid(0))
    return [p.pid for p in everything if p.sid in sessions and not p.zombie]


def stack_samples(work_dir: Path) -> list[tuple[str, ProcSample]]:
    """Each live process of the stack with its part; a helper process untitled by Airflow (the
    api-server's spawned workers) counts to its parent's part."""
    samples = {s.pid: s for s in map(_read_proc, stack_pids(work_dir)) if s is not None}
    parts = {pid: _category(s.cmdline) for pid, s in samples.items()}
    return [
        (parts.get(s.ppid, "other") if part == "other" else part, s)
        for part, s in ((parts[pid], s) for pid, s in samples.items())
    ]


def stack_cpu(work_dir: Path) -> dict[str, float]:
    """CPU seconds the stack has used so far, by part (reaped children count to their parent)."""
    totals: dict[str, float] = {}
    for part, sample in stack_samples(work_dir):
        totals[part] = totals.get(part, 0.0) + sample.cpu_s
    return totals


@dataclass
class Sampler:
    """Samples the stack's processes in a thread: peak RSS by kind of process."""

    work_dir: Path
    peak_task_rss_mb: float = 0.0
    peak_scheduler_rss_mb: float = 0.0
    peak_api_server_rss_mb: float = 0.0
    """The largest api-server process (the server or one of its workers)."""
    titles: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            samples = stack_samples(self.work_dir)
            parents = {s.ppid for _, s in samples}
            for part, sample in samples:
                self.titles.add(f"{part}: {sample.cmdline[:60]}")
                if part == "tasks" and sample.pid not in parents:
                    # A leaf of the executor's tree: the task process itself.
                    self.peak_task_rss_mb = max(self.peak_task_rss_mb, sample.rss_mb)
                elif part == "scheduler":
                    self.peak_scheduler_rss_mb = max(self.peak_scheduler_rss_mb, sample.rss_mb)
                elif part == "api-server":
                    self.peak_api_server_rss_mb = max(self.peak_api_server_rss_mb, sample.rss_mb)


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
    log.info("%s: %s in %.1f s (%d instances)", name, run["state"], wall, instances)
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
    )


def idle_cpu_rate(work_dir: Path, seconds: float = 10.0) -> dict[str, float]:
    """CPU seconds per second the stack spends with nothing to run, by part."""
    before = stack_cpu(work_dir)
    time.sleep(seconds)
    after = stack_cpu(work_dir)
    return {
        part: max(0.0, after.get(part, 0.0) - before.get(part, 0.0)) / seconds for part in after
    }


# Pieces measured without Airflow


def seed_tasks(db: Any, label: str, count: int) -> None:
    """Insert `count` task documents with `payload.run == label` (distinct texts per label)."""
    db.tasks.delete_many({"payload.run": label})
    db.tasks.insert_many(
        [
            {"_id": f"{label}-{i:06d}", "payload": {"run": label, "text": f"{label} text {i}"}}
            for i in range(count)
        ]
    )


def _client(url: str, api_key: str) -> Any:
    from llm_hook.client import LLMClient
    from llm_hook.settings import ClientSettings

    return LLMClient(ClientSettings(base_url=url, api_key=api_key, model="sim-small"))


def _tasks(label: str, batch_no: int, size: int = config.BATCH_SIZE) -> list[Any]:
    from llm_hook.types import LLMTask

    return [
        LLMTask(f"{label}-{i:06d}", {"run": label, "text": f"{label} text {i}"})
        for i in range(batch_no * size, (batch_no + 1) * size)
    ]


def reference_run(url: str, api_key: str, requests_count: int, workers: int) -> float:
    """Wall seconds for `workers` threads to send `requests_count` batch requests, no Airflow."""
    local = threading.local()
    clients: list[Any] = []
    lock = threading.Lock()

    def send(batch_no: int) -> int:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = _client(url, api_key)
            with lock:
                clients.append(client)
        outcomes = client.complete(_tasks("ref", batch_no))
        return sum(1 for o in outcomes if o.status.value == "succeeded")

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        succeeded = sum(pool.map(send, range(requests_count)))
    wall = time.monotonic() - started
    for client in clients:
        client.close()
    log.info("reference: %d tasks succeeded in %.1f s", succeeded, wall)
    return wall


def hook_overhead(url: str, api_key: str, iterations: int) -> dict[str, float]:
    """Median ms per request: LLMClient.complete vs a raw requests.post of the same body."""
    from llm_hook.adapters import BatchAdapter
    from llm_hook.client import encode_body

    tasks = _tasks("hook", 0)
    path, body = BatchAdapter().build_request(tasks, "sim-small", None, None)
    data = encode_body(body)
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Authorization": f"Bearer {api_key}",
    }
    session = requests.Session()
    client = _client(url, api_key)
    hook_ms: list[float] = []
    raw_ms: list[float] = []
    try:
        for _ in range(10):  # warm both connections
            client.complete(tasks)
            session.post(url + path, data=data, headers=headers, timeout=30).json()
        for _ in range(iterations):
            started = time.perf_counter()
            client.complete(tasks)
            hook_ms.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            answer = session.post(url + path, data=data, headers=headers, timeout=30)
            answer.raise_for_status()
            answer.json()
            raw_ms.append((time.perf_counter() - started) * 1000)
    finally:
        client.close()
        session.close()
    hook, raw = statistics.median(hook_ms), statistics.median(raw_ms)
    return {
        "iterations": iterations,
        "hook_median_ms": round(hook, 3),
        "raw_median_ms": round(raw, 3),
        "overhead_ms": round(hook - raw, 3),
    }


def reconcile_timing(mongo_uri: str, db_name: str, job_id: str, repeats: int = 3) -> dict[str, Any]:
    """Best-of seconds to reconcile a finished job again, and its `set_last_results` alone."""
    from llm_batch.reconcile import reconcile_job
    from llm_batch.store import JobStore

    client: pymongo.MongoClient[Any] = pymongo.MongoClient(mongo_uri)
    try:
        store = JobStore(client[db_name])
        fields = ("task_id", "job_id", "status", "output", "error", "updated_at")
        results = store.job_results(job_id, dict.fromkeys(fields, 1))
        totals, bulk = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            reconcile_job(store, job_id)
            totals.append(time.perf_counter() - started)
            started = time.perf_counter()
            store.set_last_results(results)
            bulk.append(time.perf_counter() - started)
    finally:
        client.close()
    return {
        "results": len(results),
        "reconcile_s": round(min(totals), 3),
        "set_last_results_s": round(min(bulk), 3),
    }


PARSE_SCRIPT = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
out = {}
for path in sys.argv[2:]:
    times = []
    for _ in range(int(sys.argv[1])):
        started = time.perf_counter()
        bag = DagBag(dag_folder=path, safe_mode=False)
        times.append((time.perf_counter() - started) * 1000)
        if bag.import_errors:
            raise SystemExit(f"{path}: {bag.import_errors}")
    out[path] = {"first_ms": round(times[0], 1), "best_ms": round(min(times), 1)}
print(json.dumps(out))
"""


def parse_times(files: list[Path], airflow_home: Path, repeats: int = 10) -> dict[str, Any]:
    """Milliseconds to parse each DAG file with a DagBag: the first (cold) and best of N."""
    env = {**os.environ, "AIRFLOW_HOME": str(airflow_home)}
    output = subprocess.run(
        [sys.executable, "-c", PARSE_SCRIPT, str(repeats), *map(str, files)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    measured = json.loads(output.strip().splitlines()[-1])
    return {Path(path).name: figures for path, figures in measured.items()}


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
def bench_stack(work_dir: Path, pool: int) -> Iterator[Stack]:
    dags = work_dir / "dags"
    prepare_dags(dags)
    settings = StackSettings.on_free_ports(
        work_dir,
        pool_slots=pool,
        dags_folder=dags,
        simulator_config={"latency_ms": 0, "latency_jitter_ms": 0},
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
            for label in ("zero", "pipe"):
                seed_tasks(db, label, tasks)

            progress("hook overhead (zero-latency simulator)")
            figures["hook"] = hook_overhead(sim_url, api_key, iterations=300)
            progress("idle CPU of the stack")
            idle = idle_cpu_rate(stack.work_dir)
            figures["idle_cpu_per_s"] = {k: round(v, 3) for k, v in idle.items()}

            def job(label: str) -> RunFigures:
                conf = {"filter": {"payload.run": label}, "limit": tasks, "use_cache": False}
                return run_dag(stack, label, config.JOB_DAG_ID, conf, batches, idle)

            progress("warm-up: a small no-op run (first-use costs of the api-server workers)")
            warmup = min(batches, pool)
            run_dag(stack, "warmup", NOOP_DAG_ID, {"count": warmup}, warmup, idle)
            progress(f"no-op mapped DAG, {batches} instances")
            noop = run_dag(stack, "noop", NOOP_DAG_ID, {"count": batches}, batches, idle)
            progress("job DAG against a zero-latency simulator (orchestration floor)")
            zero = job("zero")
            progress(f"job DAG at {latency_ms:.0f} ms latency (the pipeline)")
            simulator(latency_ms=latency_ms, latency_jitter_ms=0)
            pipe = job("pipe")
            progress("reference: a thread pool of plain clients, no Airflow")
            reference = reference_run(sim_url, api_key, batches, pool)
            figures["runs"] = {r.name: r.to_dict() for r in (noop, zero, pipe)}
            figures["reference_s"] = round(reference, 2)
            (root / "figures.json").write_text(json.dumps(figures, indent=2))

            progress("reconcile a finished job again")
            finished = db.jobs.find_one({"params.filter": {"payload.run": "pipe"}}, {"_id": 1})
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
        f"  pipeline / max(floors)               {sm['pipeline_vs_max_floor']:8.2f}"
        f"   (target <= {TARGET_PIPELINE_VS_FLOOR})",
        f"  pipeline / reference                 {sm['pipeline_vs_reference']:8.2f}",
        "",
        "CPU (whole stack, idle rate subtracted), per mapped instance",
    ]
    for name in ("noop", "zero", "pipe"):
        run = runs[name]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in run["cpu_s"].items() if v >= 0.05)
        lines.append(
            f"  {name:5s} {run['cpu_per_instance_s']:6.3f} CPU-s/instance  "
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
        "targets:",
    ]
    for target, met in sm["targets"].items():
        lines.append(f"  [{'met' if met else 'MISSED'}] {target}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llm_batch.benchmark", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--pool", type=int, default=config.DEFAULT_POOL_SLOTS)
    parser.add_argument("--latency-ms", type=float, default=1000.0)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the stack's files here")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    # The client logs every request at INFO: keep the records (their cost is part of the hook's
    # overhead, as in a task), not the screenful.
    hook_log = logging.getLogger("llm_hook")
    hook_log.propagate = False
    hook_log.addHandler(logging.NullHandler())
    figures = run_benchmark(args.tasks, args.pool, args.latency_ms, work_dir=args.work_dir)
    print(json.dumps(figures, indent=2) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
