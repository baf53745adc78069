"""`python -m llm_batch_dev.stack up|down|status`: the embedded stack's command line.

`make up`, `make down` and `make status` call it; `render_status` is the summary they print.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from llm_batch.cli.airflow_client import AirflowAPIError
from llm_batch_dev.stack.launcher import Stack
from llm_batch_dev.stack.mongo_uri import redact_uri
from llm_batch_dev.stack.settings import StackSettings

DESCRIPTION = (
    "The embedded local stack: Airflow on an embedded PostgreSQL, a MongoDB-wire server and the "
    "LLM simulator, on localhost."
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `up`, `down` or `status` on the stack the environment describes; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m llm_batch_dev.stack", description=DESCRIPTION)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--json", action="store_true", help="status: print JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        stack = Stack(StackSettings.from_env())
        if args.command == "up":
            stack.up()
            print(render_status(stack.status()))
        elif args.command == "down":
            stack.down()
        else:
            status = stack.status()
            print(json.dumps(status, indent=2) if args.json else render_status(status))
            return 0 if status["running"] else 1
    except (RuntimeError, TimeoutError, AirflowAPIError) as exc:
        # StackError, and a service that died or never listened (processes.ManagedProcess).
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def render_status(status: Mapping[str, Any]) -> str:
    """Return a human summary of `Stack.status()`."""
    if "airflow_url" not in status:
        lines = [f"No stack runs from {status['work_dir']} (start it with `make up`)."]
        if status.get("leftover_pids"):
            lines.append(
                f"Leftover processes of it still run: {status['leftover_pids']}; `make down` "
                "stops them."
            )
        return "\n".join(lines)
    procs = status.get("processes", {})

    def state(name: str) -> str:
        if name not in procs:
            return "external"
        return f"pid {procs[name]['pid']}, " + ("running" if procs[name]["alive"] else "STOPPED")

    health = status.get("airflow_health") or {}
    parts = ", ".join(
        f"{part} {(health.get(part) or {}).get('status', '?')}"
        for part in ("scheduler", "dag_processor", "triggerer")
    )
    lines = [
        f"Stack in {status['work_dir']}: {'running' if status['running'] else 'NOT HEALTHY'}",
        f"  Airflow UI  {status['airflow_url']}  ({state('airflow')}; {parts or 'no answer'})",
        f"    login     {status['airflow_username']} / {status.get('airflow_password') or '?'}"
        f"  (from {status['airflow_password_file']})",
        f"  Airflow DB  PostgreSQL, {status.get('metadata_db', {}).get('psql', '?')}"
        f"  ({state('postgres')})",
        f"  MongoDB     {redact_uri(status['mongo_uri'])}  ({state('mongo')})",
        f"  LLM         {status['llm_url']}  ({state('simulator')})",
        f"  Pool        {status['pool']['name']}: {status['pool']['slots']} slots",
        f"  Logs        {status['logs_dir']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
