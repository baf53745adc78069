"""Measure the CPU of a deferred batch with its clients opened per batch and shared.

`python -m llm_batch_dev.benchmark.trigger_cpu [--batches 50] [--rounds 2]`.
Runs `ProcessBatchTrigger` in an event loop in this process, as the triggerer does, against a
SecantusDB and a simulator started for it, with the connections in the environment (so a
connection look-up here costs no api-server round trip: they are counted, not timed). Each arm
sends `--batches` batches of a job of its own, all deferred at once, and measures the CPU time
of this process (the triggerer's share), of the MongoDB-wire server and of the simulator:

- `per-batch`: the task body with its clients opened for each batch (`TaskClients`), as a
  worker does and as the trigger did before it shared them;
- `shared`: the trigger as it is (`SharedClients`).

The arms alternate (`--rounds`), after a warm-up of both, so machine load falls on each alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pymongo

from llm_batch_dev.stack import processes


@dataclass
class Arm:
    """The CPU seconds one arm took, summed over its rounds."""

    batches: int = 0
    own_s: float = 0.0
    mongo_s: float = 0.0
    simulator_s: float = 0.0
    lookups: int = 0

    def per_batch_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.batches

    def render(self, name: str) -> str:
        total = self.own_s + self.mongo_s
        return (
            f"  {name:10} {self.per_batch_ms(self.own_s):6.2f} ms triggerer "
            f"+ {self.per_batch_ms(self.mongo_s):6.2f} ms mongo "
            f"= {self.per_batch_ms(total):6.2f} ms CPU per batch "
            f"(simulator {self.per_batch_ms(self.simulator_s):.2f} ms); "
            f"{self.lookups / self.batches:.2f} connection look-ups per batch"
        )


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@contextmanager
def counted_lookups(counter: Counter[str]) -> Iterator[None]:
    """Count `BaseHook.get_connection` calls (each an api-server round trip in a triggerer)."""
    from airflow.sdk import BaseHook

    original = BaseHook.get_connection.__func__  # type: ignore[attr-defined]

    def counting(cls: type, conn_id: str) -> Any:
        counter[conn_id] += 1
        return original(cls, conn_id)

    BaseHook.get_connection = classmethod(counting)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        BaseHook.get_connection = classmethod(original)  # type: ignore[method-assign, assignment]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=50, help="batches per arm and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="trigger-cpu-"))
    mongo_port, sim_port = processes.free_port(), processes.free_port()
    mongo = processes.start_mongo_wire_server(mongo_port, base / "data", base / "mongo.log")
    sim = processes.start_simulator(
        sim_port,
        base / "simulator.log",
        "--api-key",
        "bench-key",
        "--config-json",
        json.dumps({"latency_ms": args.latency_ms}),
    )
    try:
        return measure(args, mongo.pid, sim.pid, mongo_port, sim_port)
    finally:
        sim.stop()
        mongo.stop()


def measure(
    args: argparse.Namespace, mongo_pid: int, sim_pid: int, mongo_port: int, sim_port: int
) -> int:
    os.environ["AIRFLOW_CONN_MONGO_DEFAULT"] = f"mongo://127.0.0.1:{mongo_port}/trigger_cpu"
    os.environ["AIRFLOW_CONN_LLM_DEFAULT"] = json.dumps(
        {
            "conn_type": "llm_batch",
            "host": f"http://127.0.0.1:{sim_port}",
            "password": "bench-key",
            "extra": {"model": "sim-small"},
        }
    )
    os.environ["LLM_BATCH_CACHE_MAX_AGE_S"] = "0"
    from llm_batch import config
    from llm_batch.jobs import create_job
    from llm_batch.orchestration import batch_trigger
    from llm_batch.orchestration.batch_trigger import ProcessBatchTrigger
    from llm_batch.orchestration.task_bodies import process_batch
    from llm_batch.store import JobStore

    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        f"mongodb://127.0.0.1:{mongo_port}"
    )
    store = JobStore(client["trigger_cpu"])
    store.ensure_indexes()
    tasks = config.BATCH_SIZE * args.batches
    store.tasks.insert_many(
        [{"_id": f"t{i:05d}", "payload": {"text": f"document {i}", "n": i}} for i in range(tasks)]
    )
    shared_body = batch_trigger.run_batch

    def per_batch_body(job_id: str, batch_no: int, try_number: int) -> dict[str, Any]:
        return process_batch(job_id, batch_no, try_number=try_number)

    bodies: dict[str, Callable[[str, int, int], dict[str, Any]]] = {
        "per-batch": per_batch_body,
        "shared": shared_body,
    }

    async def run(triggers: list[ProcessBatchTrigger]) -> list[str]:
        async def one(trigger: ProcessBatchTrigger) -> str:
            return ",".join([type(event).__name__ async for event in trigger.run()])

        return list(await asyncio.gather(*(one(t) for t in triggers)))

    def run_arm(name: str, run_id: str, batches: int) -> tuple[list[str], float, float, float]:
        batch_trigger.run_batch = bodies[name]  # type: ignore[assignment]
        job = create_job(
            store, {"filter": {}, "limit": config.BATCH_SIZE * batches}, dag_id="bench",
            run_id=run_id, source="cli",
        )  # fmt: skip
        mongo, sim = psutil.Process(mongo_pid), psutil.Process(sim_pid)
        own0, mongo0, sim0 = time.process_time(), cpu_s(mongo), cpu_s(sim)
        events = asyncio.run(run([ProcessBatchTrigger(job.job_id, n, 1) for n in range(batches)]))
        return (
            events,
            time.process_time() - own0,
            cpu_s(mongo) - mongo0,
            cpu_s(sim) - sim0,
        )

    for name in bodies:  # imports, first connections, indexes: paid once, by neither arm
        run_arm(name, f"warm-{name}", 5)
    arms = {name: Arm() for name in bodies}
    for round_no in range(args.rounds):
        for name, arm in arms.items():
            lookups: Counter[str] = Counter()
            with counted_lookups(lookups):
                events, own, mongo_cpu, sim_cpu = run_arm(name, f"{name}-{round_no}", args.batches)
            if Counter(events) != Counter({"TaskSuccessEvent": args.batches}):
                print(f"{name}: not every batch succeeded: {Counter(events)}", file=sys.stderr)
                return 1
            arm.batches += args.batches
            arm.own_s += own
            arm.mongo_s += mongo_cpu
            arm.simulator_s += sim_cpu
            arm.lookups += sum(lookups.values())
    before, after = arms["per-batch"], arms["shared"]
    ratio = (after.own_s + after.mongo_s) / (before.own_s + before.mongo_s)
    print(
        f"{args.rounds} x {args.batches} batches per arm, simulator latency "
        f"{args.latency_ms:.0f} ms, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}"
    )
    print(before.render("per-batch"))
    print(after.render("shared"))
    print(
        f"  shared / per-batch: triggerer {after.own_s / before.own_s:.2f}, "
        f"mongo {after.mongo_s / before.mongo_s:.2f}, both {ratio:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
