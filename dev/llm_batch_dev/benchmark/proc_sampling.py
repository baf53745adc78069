"""/proc accounting of a stack's process tree: CPU seconds and peak RSS by part of the stack.

A process belongs to the stack in a work dir if it runs in a session one of the stack's
processes started (docs/local-stack.md); its part (scheduler, api-server, tasks, ...) is read
from its command line, which Airflow rewrites into a title.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from llm_batch.cli.local_stack import MARKER
from llm_batch_dev.stack import processes

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
SAMPLE_INTERVAL_S = 0.5


def _category(cmdline: str) -> str:
    """Which part of the stack a process is, from its (rewritten) command line."""
    text = cmdline.lower()
    for needle, name in (
        ("postgres", "postgres"),  # the metadata DB: `postgres -D ...`, `postgres: <role> ...`
        ("llm_batch_dev.simulator", "simulator"),
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
    sessions = {
        p.sid for p in everything if marker in p.environ or processes.within(p.cwd, work_dir)
    }
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
    peak_stack_rss_mb: float = 0.0
    """All of the stack's processes together (Airflow, MongoDB, simulator), at the worst sample."""
    peak_airflow_rss_mb: float = 0.0
    """Airflow's processes together (the stack without MongoDB and the simulator)."""
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
            total = sum(s.rss_mb for _, s in samples)
            backing = sum(s.rss_mb for part, s in samples if part in ("mongo", "simulator"))
            self.peak_stack_rss_mb = max(self.peak_stack_rss_mb, total)
            self.peak_airflow_rss_mb = max(self.peak_airflow_rss_mb, total - backing)
            for part, sample in samples:
                self.titles.add(f"{part}: {sample.cmdline[:60]}")
                if part == "tasks" and sample.pid not in parents:
                    # A leaf of the executor's tree: the task process itself.
                    self.peak_task_rss_mb = max(self.peak_task_rss_mb, sample.rss_mb)
                elif part == "scheduler":
                    self.peak_scheduler_rss_mb = max(self.peak_scheduler_rss_mb, sample.rss_mb)
                elif part == "api-server":
                    self.peak_api_server_rss_mb = max(self.peak_api_server_rss_mb, sample.rss_mb)


def idle_cpu_rate(work_dir: Path, seconds: float = 10.0) -> dict[str, float]:
    """CPU seconds per second the stack spends with nothing to run, by part."""
    before = stack_cpu(work_dir)
    time.sleep(seconds)
    after = stack_cpu(work_dir)
    return {
        part: max(0.0, after.get(part, 0.0) - before.get(part, 0.0)) / seconds for part in after
    }
