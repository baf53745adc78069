"""The demo: start the local stack, seed 5000 tasks, run them as one job, show where to look.

    python -m llm_batch_dev.demo          # what `make demo` runs

It drives the `llm-batch` CLI exactly as a user would (`seed`, then `submit --all --wait`), so
what it prints is what the CLI prints. `LLM_BATCH_DEMO_COUNT` changes the number of tasks.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymongo

from llm_batch import config
from llm_batch.cli.airflow_client import AirflowAPIError
from llm_batch_dev.stack.__main__ import render_status
from llm_batch_dev.stack.launcher import Stack
from llm_batch_dev.stack.settings import StackSettings

log = logging.getLogger(__name__)

DEFAULT_COUNT = 5000


def cli_command() -> list[str]:
    """The `llm-batch` console script next to this Python, or the module if it is not installed."""
    script = Path(sys.executable).parent / "llm-batch"
    if script.exists():
        return [str(script)]
    found = shutil.which("llm-batch")
    return [found] if found else [sys.executable, "-m", "llm_batch.cli.commands"]


def cli_environment(stack: Stack, base: Mapping[str, str]) -> dict[str, str]:
    """Point the CLI at this stack, whatever LLM_BATCH_* the caller's shell exports."""
    return {
        **base,
        "LLM_BATCH_HOME": str(stack.work_dir),
        "LLM_BATCH_AIRFLOW_URL": stack.airflow_url,
        "LLM_BATCH_AIRFLOW_USERNAME": stack.airflow_username,
        "LLM_BATCH_AIRFLOW_PASSWORD": stack.airflow_password or "",
        "LLM_BATCH_MONGO_URI": stack.mongo_uri,
    }


def run_cli(args: Sequence[str], env: Mapping[str, str]) -> int:
    """Run one CLI command with its output going straight to the terminal."""
    command = [*cli_command(), *args]
    print(f"\n$ llm-batch {' '.join(args)}", flush=True)
    return subprocess.run(command, env=dict(env), stdin=subprocess.DEVNULL, check=False).returncode


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    count = int(os.environ.get("LLM_BATCH_DEMO_COUNT", DEFAULT_COUNT))
    try:
        stack = Stack(StackSettings.from_env())
        started = time.monotonic()
        stack.up()
        stack.wait_for_dag(config.JOB_DAG_ID)
        log.info("stack ready in %.1f s", time.monotonic() - started)
    except (RuntimeError, TimeoutError, AirflowAPIError) as exc:
        # StackError, a service that would not start, or Airflow refusing the login.
        print(f"error: {exc}", file=sys.stderr)
        return 1

    env = cli_environment(stack, os.environ)
    code = run_cli(["seed", "--count", str(count)], env)
    if code != 0:
        print(f"error: `llm-batch seed` failed with exit code {code}", file=sys.stderr)
        return code
    started, submitted_at = time.monotonic(), datetime.now(UTC)
    code = run_cli(["submit", "--all", "--limit", str(count), "--wait"], env)
    elapsed = time.monotonic() - started

    print(f"\nThe job took {elapsed:.0f} s from submit to summary (exit code {code}).")
    print(render_status(stack.status()))
    print(
        f"\nOpen {stack.airflow_url} and log in as {stack.airflow_username} / "
        f"{stack.airflow_password}: DAG `{config.JOB_DAG_ID}` shows the run, one "
        f"`process_batch` instance per batch of {config.BATCH_SIZE}.\n"
        "Stop everything with `make down`."
    )
    print(workspace_links(stack, submitted_at))
    return code


def workspace_links(stack: Stack, submitted_at: datetime) -> str:
    """Say where the workspace's pages are: the jobs page, and the job the demo just ran.

    Only a job created after `submitted_at` is the demo's: a run that failed before creating
    its job links no older job.
    """
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
        stack.mongo_uri, serverSelectionTimeoutMS=5000
    )
    try:
        newest = client[stack.mongo_db_name][config.JOBS].find_one(
            {"timings.created_at": {"$gte": submitted_at}},
            {"_id": 1},
            sort=[("timings.created_at", -1)],
        )
    finally:
        client.close()
    base = f"{stack.airflow_url}/llm-batch"
    lines = [f"\nWorkspace (after logging in): jobs and charts at {base}/jobs"]
    if newest is not None:
        lines.append(f"  this job, with its charts:  {base}/jobs/{newest['_id']}")
    lines.append(f"  review queue:               {base}/review")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
