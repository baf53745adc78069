"""`llm-batch`: submit jobs and follow them from a terminal or a script.

Commands talk to Airflow's REST API v2 (trigger, run state) and read job figures from MongoDB.
Defaults come from the local stack's state file; environment variables override them.
Exit codes: 0 the job succeeded, 1 it ended otherwise, 2 the request was refused,
3 a service could not be reached or the wait timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pymongo

from llm_batch import config
from llm_batch.airflow_api import AirflowAPIError, AirflowClient, read_stack_file
from llm_batch.models import JobState
from llm_batch.reconcile import render_summary
from llm_batch.selection import InvalidJobRequest, parse_job_request
from llm_batch.stack import state_file
from llm_batch.store import JobStore

EXIT_OK, EXIT_JOB_NOT_OK, EXIT_REFUSED, EXIT_UNAVAILABLE = 0, 1, 2, 3
FINAL_RUN_STATES = {"success", "failed"}


class CliError(Exception):
    """A problem the user must act on; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_UNAVAILABLE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Settings:
    """Where the services are: the local stack's state file, overridden by the environment."""

    mongo_uri: str

    @classmethod
    def load(cls) -> Settings:
        recorded = read_stack_file(state_file())
        return cls(
            mongo_uri=os.environ.get("LLM_BATCH_MONGO_URI")
            or recorded.get("mongo_uri", f"mongodb://127.0.0.1:27017/{config.DEFAULT_DATABASE}")
        )

    def store(self) -> JobStore:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            self.mongo_uri, serverSelectionTimeoutMS=5000, tz_aware=True
        )
        return JobStore(client.get_default_database(default=config.DEFAULT_DATABASE))

    def airflow(self) -> AirflowClient:
        return AirflowClient.from_env()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args, Settings.load()))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except AirflowAPIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except pymongo.errors.PyMongoError as exc:
        print(
            f"error: MongoDB is not reachable ({exc.__class__.__name__}: {exc}); check "
            "LLM_BATCH_MONGO_URI or start the stack with `make up`",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-batch", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    seed = commands.add_parser("seed", help="insert demo task documents into MongoDB")
    seed.add_argument("--count", type=int, default=5000)
    seed.add_argument("--prefix", default="demo-")
    seed.set_defaults(handler=cmd_seed)

    submit = commands.add_parser("submit", help="validate a job request and trigger it")
    selection = submit.add_mutually_exclusive_group(required=True)
    selection.add_argument("--task-ids", help="comma-separated task _ids")
    selection.add_argument("--task-ids-file", type=Path, help="a file of task _ids, one per line")
    selection.add_argument("--filter", help="a MongoDB query over tasks, as JSON")
    selection.add_argument("--all", action="store_true", help="all tasks, up to --limit")
    selection.add_argument("--retry-of", help="re-drive: the failed tasks of this earlier job")
    submit.add_argument(
        "--include-needs-review", action="store_true", help="with --retry-of: review tasks too"
    )
    submit.add_argument("--review-below", type=float, help="confidence under which to review")
    submit.add_argument("--max-cost-usd", type=float, help="hard budget for the job")
    submit.add_argument("--alert-failure-rate", type=float, help="alert above this failed share")
    submit.add_argument("--no-cache", action="store_true", help="ask the LLM even if answered")
    submit.add_argument(
        "--dry-run", action="store_true", help="estimate tokens and cost only; send nothing"
    )
    submit.add_argument("--limit", type=int, default=config.MAX_TASKS_PER_JOB)
    submit.add_argument("--instructions")
    submit.add_argument("--model")
    submit.add_argument("--job-id", help="resume this job, or give the new job this id")
    submit.add_argument("--llm-params", help='JSON object, e.g. {"temperature": 0}')
    submit.add_argument("--wait", action="store_true", help="follow the job until it ends")
    submit.add_argument("--timeout", type=float, default=3600.0, help="seconds --wait waits")
    submit.add_argument("--json", action="store_true", help="print the result as JSON")
    submit.set_defaults(handler=cmd_submit)

    status = commands.add_parser("status", help="show a job's state and figures")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true")
    status.set_defaults(handler=cmd_status)

    cancel = commands.add_parser("cancel", help="stop a job: nothing more is sent")
    cancel.add_argument("job_id")
    cancel.set_defaults(handler=cmd_cancel)

    history = commands.add_parser("history", help="list recent jobs")
    history.add_argument("--limit", type=int, default=20)
    history.add_argument("--json", action="store_true")
    history.set_defaults(handler=cmd_history)

    review = commands.add_parser("review", help="list a job's answers that need review")
    review.add_argument("job_id")
    review.add_argument("--json", action="store_true")
    review.set_defaults(handler=cmd_review)

    wait = commands.add_parser("wait", help="wait for a job to end, showing progress")
    wait.add_argument("job_id")
    wait.add_argument("--timeout", type=float, default=3600.0)
    wait.add_argument("--json", action="store_true")
    wait.set_defaults(handler=cmd_wait)
    return parser


def cmd_seed(args: argparse.Namespace, settings: Settings) -> int:
    """Insert (or refresh) `count` deterministic demo tasks."""
    store = settings.store()
    languages = ["en", "de", "fr", "es"]
    ops = [
        pymongo.UpdateOne(
            {"_id": f"{args.prefix}{i:05d}"},
            {
                "$set": {
                    "payload": {
                        "text": f"Demo document {i}: a short text for the LLM to summarize.",
                        "lang": languages[i % len(languages)],
                        "n": i,
                    }
                }
            },
            upsert=True,
        )
        for i in range(args.count)
    ]
    if ops:
        store.tasks.bulk_write(ops, ordered=False)
    print(f"seeded {args.count} tasks ({args.prefix}00000..) in {store.tasks.full_name}")
    return EXIT_OK


def build_conf(args: argparse.Namespace) -> dict[str, Any]:
    """Turn submit's flags into the DAG run conf, checked exactly as the form's input is."""
    conf: dict[str, Any] = {"limit": args.limit}
    if args.task_ids is not None:
        conf["task_ids"] = args.task_ids
    elif args.task_ids_file is not None:
        conf["task_ids"] = args.task_ids_file.read_text()
    elif args.filter is not None:
        conf["filter"] = args.filter
    elif args.retry_of is not None:
        conf["retry_of"] = args.retry_of
        conf["include_needs_review"] = args.include_needs_review
    else:
        conf["filter"] = {}
    for key in ("review_below", "max_cost_usd", "alert_failure_rate"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    if args.no_cache:
        conf["use_cache"] = False
    if args.dry_run:
        conf["dry_run"] = True
    for key in ("instructions", "model", "job_id"):
        if getattr(args, key) is not None:
            conf[key] = getattr(args, key)
    if args.llm_params is not None:
        conf["llm_params"] = args.llm_params
        try:
            conf["llm_params"] = json.loads(args.llm_params)
        except json.JSONDecodeError as exc:
            raise CliError(f"--llm-params is not valid JSON: {exc}", EXIT_REFUSED) from exc
    try:
        request = parse_job_request(conf)
    except InvalidJobRequest as exc:
        raise CliError(
            "job request refused, nothing was sent:\n  - " + "\n  - ".join(exc.problems),
            EXIT_REFUSED,
        ) from exc
    # Send the parsed values: the form's schema wants a list and an object, not text.
    conf["task_ids"] = list(request.task_ids) if request.task_ids else None
    conf["filter"] = request.filter
    conf["job_id"] = request.job_id or new_cli_job_id()
    return conf


def new_cli_job_id() -> str:
    return f"job-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def cmd_submit(args: argparse.Namespace, settings: Settings) -> int:
    conf = build_conf(args)
    airflow = settings.airflow()
    run_id = f"cli__{conf['job_id']}__{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
    run = airflow.trigger_dag_run(config.JOB_DAG_ID, conf, run_id=run_id)
    job_id = conf["job_id"]
    if args.dry_run:
        return show_estimate(airflow, run["dag_run_id"], args.timeout, args.json)
    link = f"{airflow.url}/dags/{config.JOB_DAG_ID}/runs/{run['dag_run_id']}"
    if not args.wait:
        if args.json:
            print(json.dumps({"job_id": job_id, "run_id": run["dag_run_id"], "url": link}))
        else:
            print(f"submitted job {job_id} as run {run['dag_run_id']}\n  {link}")
        return EXIT_OK
    print(f"submitted job {job_id} as run {run['dag_run_id']}\n  {link}", file=sys.stderr)
    return follow(settings, job_id, run["dag_run_id"], args.timeout, args.json)


def show_estimate(airflow: AirflowClient, run_id: str, timeout_s: float, as_json: bool) -> int:
    """Wait for a dry run's create_job and print its estimate (or why it was refused)."""
    deadline = time.monotonic() + timeout_s
    while airflow.get_dag_run(config.JOB_DAG_ID, run_id)["state"] not in FINAL_RUN_STATES:
        if time.monotonic() > deadline:
            raise CliError(f"dry run {run_id} still running after {timeout_s:.0f} s")
        time.sleep(1.0)
    estimate = airflow.get_xcom(config.JOB_DAG_ID, run_id, "create_job", "estimate")
    if estimate is None:
        problems = airflow.get_xcom(config.JOB_DAG_ID, run_id, "create_job", "rejection") or [
            f"no estimate recorded: see create_job's log of run {run_id}"
        ]
        raise CliError("job request refused:\n  - " + "\n  - ".join(problems), EXIT_REFUSED)
    if as_json:
        print(json.dumps(estimate, indent=2))
    else:
        print(
            f"dry run (nothing sent): {estimate['task_count']} tasks in {estimate['requests']} "
            f"requests, about {estimate['input_tokens']} input + {estimate['output_tokens']} "
            f"output tokens, ${estimate['cost_usd']:.4f}\n  basis: {estimate['basis']}"
        )
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    store = settings.store()
    job = store.get_job(args.job_id)
    if job is None:
        raise CliError(f"no job {args.job_id!r} in {store.jobs.full_name}", EXIT_JOB_NOT_OK)
    view = job_view(store, job)
    print(json.dumps(view, default=str, indent=2) if args.json else render_summary(view))
    return exit_code_for(view["state"])


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    """Flag the job: batches not yet sent skip, in-flight ones finish, the rest end cancelled."""
    store = settings.store()
    by = os.environ.get("USER") or "cli"
    if not store.request_cancel(args.job_id, datetime.now(UTC), by):
        job = store.get_job(args.job_id)
        state = job["state"] if job else "unknown"
        raise CliError(f"job {args.job_id!r} cannot be cancelled (state: {state})", EXIT_JOB_NOT_OK)
    print(
        f"job {args.job_id}: cancel requested; nothing more is sent, in-flight requests finish, "
        "the remaining tasks end cancelled"
    )
    return EXIT_OK


def cmd_history(args: argparse.Namespace, settings: Settings) -> int:
    store = settings.store()
    jobs = list(
        store.jobs.find({}, {"task_ids": 0, "params.task_ids": 0})
        .sort("timings.created_at", -1)
        .limit(args.limit)
    )
    rows = [
        {
            "job_id": job["_id"],
            "state": job["state"],
            "source": job.get("source"),
            "tasks": job.get("task_count"),
            "counts": job.get("counts"),
            "cost_usd": job.get("cost_usd"),
            "wall_time_s": job.get("wall_time_s"),
            "created_at": job.get("timings", {}).get("created_at"),
            "run_id": job.get("run_id"),
            "triggered_by": job.get("triggered_by") or job.get("source"),
        }
        for job in jobs
    ]
    if args.json:
        print(json.dumps(rows, default=str, indent=2))
        return EXIT_OK
    print(
        f"{'job':<34} {'state':<17} {'source':<10} {'tasks':>5} {'ok':>5} {'failed':>6} "
        f"{'cost $':>9} {'wall s':>7}  {'triggered by':<16} run"
    )
    for row in rows:
        counts = row["counts"] or {}
        wall = row["wall_time_s"]
        print(
            f"{row['job_id']:<34} {row['state']:<17} {row['source'] or '':<10} "
            f"{row['tasks'] or 0:>5} {counts.get('succeeded', 0):>5} {counts.get('failed', 0):>6} "
            f"{float(row['cost_usd'] or 0):>9.4f} {wall if wall is not None else '':>7}  "
            f"{row['triggered_by'] or '':<16} {row['run_id']}"
        )
    return EXIT_OK


def cmd_review(args: argparse.Namespace, settings: Settings) -> int:
    store = settings.store()
    results = list(
        store.results.find(
            {"job_id": args.job_id, "status": "needs_review"},
            {"task_id": 1, "confidence": 1, "output": 1},
        )
    )
    if args.json:
        print(json.dumps(results, default=str, indent=2))
    else:
        for result in results:
            print(f"{result['task_id']}\tconfidence {result.get('confidence')}")
        print(f"{len(results)} answers of job {args.job_id} need review", file=sys.stderr)
    return EXIT_OK


def cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    store = settings.store()
    job = store.get_job(args.job_id)
    if job is None:
        raise CliError(f"no job {args.job_id!r} in {store.jobs.full_name}", EXIT_JOB_NOT_OK)
    if not job.get("run_id"):
        raise CliError(f"job {args.job_id!r} records no Airflow run to follow", EXIT_JOB_NOT_OK)
    return follow(settings, args.job_id, job["run_id"], args.timeout, args.json)


def follow(settings: Settings, job_id: str, run_id: str, timeout_s: float, as_json: bool) -> int:
    """Show progress until the job's run ends; print its summary or why it was refused."""
    store = settings.store()
    airflow = settings.airflow()
    deadline = time.monotonic() + timeout_s
    started = time.monotonic()
    last_line = ""
    while True:
        job = store.get_job(job_id)
        run_state = airflow.get_dag_run(config.JOB_DAG_ID, run_id)["state"]
        if job is not None:
            done = store.results.count_documents({"job_id": job_id})
            line = (
                f"\r{job['state']:<13} {done}/{job['task_count']} tasks answered, "
                f"{store.llm_calls.count_documents({'job_id': job_id})} requests, "
                f"{time.monotonic() - started:.0f} s"
            )
            if line != last_line and not as_json:
                print(line, end="", file=sys.stderr, flush=True)
                last_line = line
            if JobState(job["state"]).is_final and run_state in FINAL_RUN_STATES:
                break
        elif run_state == "failed":
            problems = airflow.get_xcom(config.JOB_DAG_ID, run_id, "create_job", "rejection")
            if problems:
                raise CliError(
                    "job request refused, nothing was sent:\n  - " + "\n  - ".join(problems),
                    EXIT_REFUSED,
                )
            raise CliError(
                f"run {run_id} failed before job {job_id} was created: see create_job's log in "
                f"{airflow.url}",
                EXIT_JOB_NOT_OK,
            )
        if run_state == "failed" and job is not None and not JobState(job["state"]).is_final:
            # Reconcile itself failed; the job document cannot be trusted to change any more.
            break
        if time.monotonic() > deadline:
            raise CliError(f"job {job_id} still running after {timeout_s:.0f} s", EXIT_UNAVAILABLE)
        time.sleep(2.0)
    if not as_json:
        print(file=sys.stderr)
    view = job_view(store, store.get_job(job_id) or {})
    print(json.dumps(view, default=str, indent=2) if as_json else render_summary(view))
    return exit_code_for(view.get("state", ""))


def job_view(store: JobStore, job: dict[str, Any]) -> dict[str, Any]:
    """Return the job's public fields, with live progress while it runs."""
    view = {key: value for key, value in job.items() if key not in ("task_ids", "runs")}
    view["job_id"] = view.pop("_id", None)
    if not JobState(job["state"]).is_final:
        view["counts"] = store.count_results(job["_id"])
        view.update(store.call_totals(job["_id"]))
    return view


def exit_code_for(state: str) -> int:
    return EXIT_OK if state == JobState.SUCCEEDED.value else EXIT_JOB_NOT_OK


if __name__ == "__main__":
    sys.exit(main())
