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
from llm_batch.batching import result_id
from llm_batch.cli.airflow_client import AirflowAPIError, AirflowClient
from llm_batch.cli.local_stack import StackFileError, read_stack_file, state_file
from llm_batch.estimate import render_range
from llm_batch.models import JobState
from llm_batch.reconcile import render_summary
from llm_batch.request import (
    REQUEST_FIELDS,
    InvalidJobRequest,
    Kind,
    RequestField,
    parse_job_request,
)
from llm_batch.review import Decision, ReviewError, conflict_message, decide
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
    except (AirflowAPIError, StackFileError) as exc:
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
    add_request_flags(selection, [field for field in REQUEST_FIELDS if field.selects])
    selection.add_argument("--task-ids-file", type=Path, help="a file of task _ids, one per line")
    selection.add_argument("--all", action="store_true", help="all tasks, up to --limit")
    add_request_flags(submit, [field for field in REQUEST_FIELDS if not field.selects])
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

    review = commands.add_parser(
        "review", help="list a job's answers that need review, or decide one"
    )
    review.add_argument("job_id")
    review.add_argument("--json", action="store_true")
    review.set_defaults(handler=cmd_review)
    add_review_decisions(review)

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


def add_request_flags(target: argparse._ActionsContainer, fields: Sequence[RequestField]) -> None:
    """Add one flag per field of the job request, spelled and typed as declared."""
    for field in fields:
        # argparse %-formats help texts: keep a literal % literal.
        help_text = (field.flag_help or field.help).replace("%", "%%")
        if field.kind is Kind.BOOL:
            # The flag turns the default over; left out, the field keeps its declared default.
            target.add_argument(
                field.cli_flag, dest=field.name, action="store_const",
                const=not field.default, default=None, help=help_text,
            )  # fmt: skip
        else:
            target.add_argument(
                field.cli_flag, dest=field.name, type=_FLAG_TYPES.get(field.kind, str),
                default=None, help=help_text, choices=field.choices or None,
            )  # fmt: skip


_FLAG_TYPES: dict[Kind, type] = {Kind.INTEGER: int, Kind.NUMBER: float}


def build_conf(args: argparse.Namespace) -> dict[str, Any]:
    """Turn submit's flags into the DAG run conf, checked exactly as the form's input is."""
    conf: dict[str, Any] = {}
    for field in REQUEST_FIELDS:
        value = getattr(args, field.name)
        if value is None:
            continue  # not given: the form's default applies
        conf[field.name] = value
    if args.task_ids_file is not None:
        conf["task_ids"] = args.task_ids_file.read_text()
    elif args.all:
        conf["filter"] = {}
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
    for field in REQUEST_FIELDS:
        if field.kind is Kind.OBJECT and field.name in conf:
            conf[field.name] = getattr(request, field.name)
    conf["limit"] = request.limit
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
    estimate = airflow.get_xcom(
        config.JOB_DAG_ID, run_id, config.CREATE_JOB_TASK_ID, config.ESTIMATE_XCOM_KEY
    )
    if estimate is None:
        problems = airflow.get_xcom(
            config.JOB_DAG_ID, run_id, config.CREATE_JOB_TASK_ID, config.REJECTION_XCOM_KEY
        ) or [f"no estimate recorded: see create_job's log of run {run_id}"]
        raise CliError("job request refused:\n  - " + "\n  - ".join(problems), EXIT_REFUSED)
    if as_json:
        print(json.dumps(estimate, indent=2))
    else:
        print(
            f"dry run (nothing sent): {estimate['task_count']} tasks in {estimate['requests']} "
            f"requests, about {estimate['input_tokens']} input + {render_range(estimate)}\n"
            f"  basis: {estimate['basis']}"
        )
    return EXIT_OK


def existing_job(store: JobStore, job_id: str) -> dict[str, Any]:
    """Return the job, or raise the CLI's error naming where it was looked for."""
    job = store.get_job(job_id)
    if job is None:
        raise CliError(f"no job {job_id!r} in {store.jobs.full_name}", EXIT_JOB_NOT_OK)
    return job


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    store = settings.store()
    job = existing_job(store, args.job_id)
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
        f"{'created (UTC)':<16} {'job':<34} {'state':<17} {'source':<9} {'tasks':>5} {'ok':>5} "
        f"{'review':>6} {'failed':>6} {'cost $':>9} {'wall s':>7}  {'triggered by':<16} run"
    )
    for row in rows:
        counts = row["counts"] or {}
        wall = row["wall_time_s"]
        created = row["created_at"]
        print(
            f"{created.strftime('%Y-%m-%d %H:%M') if created else '':<16} "
            f"{row['job_id']:<34} {row['state']:<17} {row['source'] or '':<9} "
            f"{row['tasks'] or 0:>5} {counts.get('succeeded', 0):>5} "
            f"{counts.get('needs_review', 0):>6} {counts.get('failed', 0):>6} "
            f"{float(row['cost_usd'] or 0):>9.4f} {wall if wall is not None else '':>7}  "
            f"{row['triggered_by'] or '':<16} {row['run_id']}"
        )
    return EXIT_OK


def cmd_review(args: argparse.Namespace, settings: Settings) -> int:
    store = settings.store()
    existing_job(store, args.job_id)
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


def add_review_decisions(review: argparse.ArgumentParser) -> None:
    """Add `review JOB approve|reject|correct TASK`: the workspace's review queue, in a terminal."""
    decisions = review.add_subparsers(dest="decision", metavar="DECISION")
    for name, text in (
        ("approve", "accept the answer: succeeded, output kept"),
        ("reject", "refuse the answer: failed (rejected_in_review), re-drive picks it up"),
        ("correct", "replace the output; the model's original is kept beside it"),
    ):
        decision = decisions.add_parser(name, help=text)
        decision.add_argument("task_id")
        decision.add_argument("--note", help="why (stored in the review history)")
        decision.add_argument(
            "--again",
            action="store_true",
            help="decide an answer already reviewed (a new decision; the history stays)",
        )
        if name == "correct":
            output = decision.add_mutually_exclusive_group(required=True)
            output.add_argument("--output", help="the corrected output, as JSON")
            output.add_argument("--output-file", type=Path, help="a file holding it as JSON")
        decision.set_defaults(handler=cmd_review_decide, decision=name)


def cmd_review_decide(args: argparse.Namespace, settings: Settings) -> int:
    """Approve, reject or correct one answer through the same code as the review queue."""
    store = settings.store()
    output = None
    if args.decision == "correct":
        text = args.output if args.output is not None else args.output_file.read_text()
        try:
            output = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"the corrected output is not valid JSON: {exc}", EXIT_REFUSED) from exc
    current = store.results.find_one({"_id": result_id(args.job_id, args.task_id)})
    if current is not None and current.get("review") and not args.again:
        raise CliError(conflict_message(current) + " (or pass --again)", EXIT_REFUSED)
    try:
        result = decide(
            store,
            args.job_id,
            args.task_id,
            Decision(args.decision),
            by=os.environ.get("USER") or "cli",
            output=output,
            note=args.note,
        )
    except ReviewError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from exc
    print(
        f"{args.job_id} {args.task_id}: {result['review']['decision']} by "
        f"{result['review']['by']}, now {result['status']}"
    )
    return EXIT_OK


def cmd_wait(args: argparse.Namespace, settings: Settings) -> int:
    store = settings.store()
    job = existing_job(store, args.job_id)
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
            problems = airflow.get_xcom(
                config.JOB_DAG_ID, run_id, config.CREATE_JOB_TASK_ID, config.REJECTION_XCOM_KEY
            )
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
