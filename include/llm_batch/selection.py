"""Validate an operator's job request and resolve it to task ids, before anything is spent.

Two steps, so the same checks serve the trigger form, the CLI and the REST API:
`parse_job_request` checks shape alone (no I/O; the CLI runs it before triggering),
`resolve_selection` checks the request against the `tasks` collection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from bson import ObjectId
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from llm_batch.config import LOOKUP_CHUNK, MAX_TASKS_PER_JOB
from llm_batch.models import JobRequest

DEFAULT_ALERT_FAILURE_RATE = 0.30

ALLOWED_QUERY_OPERATORS = frozenset(
    {
        "$and", "$or", "$nor", "$not",
        "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin",
        "$exists", "$type", "$regex", "$options", "$elemMatch", "$size", "$all", "$mod",
        "$comment",
    }
)  # fmt: skip
"""Plain query operators. Everything else is refused: `$where`, `$function` and
`$accumulator` run code on the server, and `$expr` can wrap them."""

MAX_FILTER_DEPTH = 12
MAX_FILTER_CHARS = 16_384
MAX_TASK_ID_CHARS = 256
MAX_INSTRUCTIONS_CHARS = 32_768
REQUEST_KEYS = (
    "task_ids", "filter", "retry_of", "include_needs_review", "limit", "instructions", "model",
    "job_id", "llm_params", "use_cache", "review_below", "max_cost_usd", "alert_failure_rate",
    "dry_run",
)  # fmt: skip

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")
_ID_SEPARATORS = re.compile(r"[\s,]+")


class InvalidJobRequest(ValueError):
    """The request cannot run as given; the message says what to fix."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_job_request(conf: Mapping[str, Any]) -> JobRequest:
    """Check a trigger's `conf` (or the form's params) and return the request it describes."""
    problems: list[str] = []
    unknown = sorted(set(conf) - set(REQUEST_KEYS))
    if unknown:
        problems.append(
            f"unknown parameter(s) {', '.join(unknown)}: the job takes {', '.join(REQUEST_KEYS)}"
        )

    limit = _parse_limit(conf.get("limit", MAX_TASKS_PER_JOB), problems)
    task_ids = _parse_task_ids(conf.get("task_ids"), problems)
    query = _parse_filter(conf.get("filter"), problems)
    retry_of = _optional_text(conf.get("retry_of"), "retry_of", problems)
    if retry_of is not None and not _JOB_ID.match(retry_of):
        problems.append(f"retry_of {retry_of!r} is not a job id")
    selections = sum([bool(task_ids), query is not None, retry_of is not None])
    if selections > 1:
        problems.append(
            "give one of task_ids, filter or retry_of, not several: clear the others ({} as the "
            "filter selects all tasks)"
        )
    elif selections == 0 and not problems:
        problems.append(
            "no tasks selected: give task_ids (a list of task document _ids), a filter "
            "(a MongoDB query over tasks; {} selects all tasks, up to limit) or retry_of "
            "(an earlier job whose failed tasks to send again)"
        )
    if task_ids and limit is not None and len(task_ids) > limit:
        problems.append(
            f"{len(task_ids)} task ids given but limit is {limit}: raise limit (at most "
            f"{MAX_TASKS_PER_JOB}) or split the ids over several jobs"
        )

    instructions = _optional_text(conf.get("instructions"), "instructions", problems)
    if instructions is not None and len(instructions) > MAX_INSTRUCTIONS_CHARS:
        problems.append(
            f"instructions are {len(instructions)} characters long; at most "
            f"{MAX_INSTRUCTIONS_CHARS} are accepted"
        )
    model = _optional_text(conf.get("model"), "model", problems)
    if model is not None and not _MODEL.match(model):
        problems.append(f"model {model!r} is not a model name (letters, digits and ._:/@- only)")
    job_id = _optional_text(conf.get("job_id"), "job_id", problems)
    if job_id is not None and not _JOB_ID.match(job_id):
        problems.append(
            f"job_id {job_id!r} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    llm_params = conf.get("llm_params") or {}
    if not isinstance(llm_params, dict):
        problems.append('llm_params must be a JSON object, e.g. {"temperature": 0}')
        llm_params = {}
    use_cache = conf.get("use_cache")
    if use_cache is None:
        use_cache = True
    elif not isinstance(use_cache, bool):
        problems.append(f"use_cache must be true or false, not {use_cache!r}")

    review_below = _optional_number(conf.get("review_below"), "review_below", problems, upper=1.0)
    max_cost_usd = _optional_number(conf.get("max_cost_usd"), "max_cost_usd", problems)
    alert_rate = _optional_number(
        conf.get("alert_failure_rate"), "alert_failure_rate", problems, upper=1.0
    )
    if not isinstance(conf.get("dry_run") or False, bool):
        problems.append(f"dry_run must be true or false, not {conf.get('dry_run')!r}")
    include_review = conf.get("include_needs_review") or False
    if not isinstance(include_review, bool):
        problems.append(f"include_needs_review must be true or false, not {include_review!r}")

    if problems or limit is None:
        raise InvalidJobRequest(problems)
    return JobRequest(
        task_ids=tuple(task_ids) if task_ids else None,
        filter=query if not task_ids and retry_of is None else None,
        limit=limit,
        instructions=instructions,
        model=model,
        job_id=job_id,
        llm_params=dict(llm_params),
        use_cache=bool(use_cache),
        retry_of=retry_of,
        include_needs_review=bool(include_review),
        review_below=review_below,
        max_cost_usd=max_cost_usd,
        alert_failure_rate=DEFAULT_ALERT_FAILURE_RATE if alert_rate is None else alert_rate,
    )


def _parse_limit(value: Any, problems: list[str]) -> int | None:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(
            f"limit must be a whole number from 1 to {MAX_TASKS_PER_JOB}, not {value!r}"
        )
        return None
    if not 1 <= value <= MAX_TASKS_PER_JOB:
        problems.append(
            f"limit {value} is out of range: a job takes 1 to {MAX_TASKS_PER_JOB} tasks; "
            "split larger selections over several jobs"
        )
        return None
    return value


def _parse_task_ids(value: Any, problems: list[str]) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items: list[Any] = [part for part in _ID_SEPARATORS.split(value) if part]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        problems.append(
            "task_ids must be a list of strings (or one string of ids separated by commas)"
        )
        return []
    ids: list[str] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            problems.append(f"task id {item!r} is not a non-empty string")
            continue
        task_id = item.strip()
        if len(task_id) > MAX_TASK_ID_CHARS:
            problems.append(
                f"task id {task_id[:40]!r}... is longer than {MAX_TASK_ID_CHARS} characters"
            )
        elif task_id in seen:
            problems.append(f"task id {task_id!r} is listed twice: list each task once")
        else:
            seen.add(task_id)
            ids.append(task_id)
    return ids


def _parse_filter(value: Any, problems: list[str]) -> dict[str, Any] | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            problems.append(
                f"filter is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
                'write it as a JSON object, e.g. {"payload.lang": "en"}'
            )
            return None
    if not isinstance(value, dict):
        problems.append(
            f"filter must be a JSON object (a MongoDB query), not {type(value).__name__}: "
            'e.g. {"payload.lang": "en"}'
        )
        return None
    if len(json.dumps(value, default=str)) > MAX_FILTER_CHARS:
        problems.append(
            f"filter is larger than {MAX_FILTER_CHARS} characters: select by fewer terms"
        )
        return None
    for problem in _unsafe_operators(value, depth=0):
        problems.append(problem)
    return value


def _unsafe_operators(node: Any, depth: int) -> Iterator[str]:
    if depth > MAX_FILTER_DEPTH:
        yield f"filter nests deeper than {MAX_FILTER_DEPTH} levels: simplify it"
        return
    if isinstance(node, dict):
        for key, child in node.items():
            if not isinstance(key, str):
                yield f"filter key {key!r} is not a string"
            elif key.startswith("$") and key not in ALLOWED_QUERY_OPERATORS:
                yield (
                    f"filter operator {key} is not allowed: only plain query operators are "
                    f"accepted ({', '.join(sorted(ALLOWED_QUERY_OPERATORS))}); operators that "
                    "run code or expressions ($where, $function, $accumulator, $expr) are refused"
                )
            else:
                yield from _unsafe_operators(child, depth + 1)
    elif isinstance(node, list):
        for child in node:
            yield from _unsafe_operators(child, depth + 1)


def _optional_number(
    value: Any, name: str, problems: list[str], *, upper: float | None = None
) -> float | None:
    """Return a number in [0, upper] (no upper bound when None), or None when not given."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{name} must be a number, not {value!r}")
        return None
    if value < 0 or (upper is not None and value > upper):
        bound = f"from 0 to {upper:g}" if upper is not None else "of 0 or more"
        problems.append(f"{name} {value:g} is out of range: give a number {bound}")
        return None
    return float(value)


def _optional_text(value: Any, name: str, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(f"{name} must be text, not {type(value).__name__}")
        return None
    return value.strip() or None


def resolve_selection(tasks: Collection[dict[str, Any]], request: JobRequest) -> list[Any]:
    """Return the `_id`s of the tasks the request selects, in a stable order.

    Raises `InvalidJobRequest` for unknown ids, a filter the server refuses, or an empty selection.
    """
    if request.task_ids is not None:
        return _existing_ids(tasks, request.task_ids)
    assert request.filter is not None
    try:
        cursor = tasks.find(request.filter, {"_id": 1}).sort("_id", 1).limit(request.limit)
        ids = [doc["_id"] for doc in cursor]
    except OperationFailure as exc:
        reason = exc.details.get("errmsg") if exc.details else str(exc)
        raise InvalidJobRequest([f"the database refused the filter: {reason}"]) from exc
    if not ids:
        raise InvalidJobRequest(
            [
                f"the filter {json.dumps(request.filter, default=str)} matched no tasks in "
                f"collection {tasks.name!r}: check field names (payload fields are under "
                "'payload.') and values"
            ]
        )
    return ids


def _existing_ids(tasks: Collection[dict[str, Any]], wanted: tuple[str, ...]) -> list[Any]:
    """Map each requested id to its stored `_id` (a string, or an ObjectId given as hex)."""
    found = _stored_ids(tasks, wanted)
    hex_ids = [ObjectId(t) for t in wanted if t not in found and ObjectId.is_valid(t)]
    found.update(_stored_ids(tasks, hex_ids))
    unknown = [task_id for task_id in wanted if task_id not in found]
    if unknown:
        shown = ", ".join(repr(task_id) for task_id in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise InvalidJobRequest(
            [
                f"{len(unknown)} task id(s) not found in collection {tasks.name!r}: {shown}{more}; "
                "check the ids (they are the task documents' _id values) or create those "
                "tasks first"
            ]
        )
    return [found[task_id] for task_id in wanted]


def _stored_ids(tasks: Collection[dict[str, Any]], ids: Iterable[Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for chunk in _chunks(ids, LOOKUP_CHUNK):
        cursor = tasks.find({"_id": {"$in": chunk}}, {"_id": 1})
        found.update((str(doc["_id"]), doc["_id"]) for doc in cursor)
    return found


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
