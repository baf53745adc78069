"""The job request, declared once: its fields, how each is checked, and the checked request.

`REQUEST_FIELDS` is the one declaration of what an operator may ask for (name, kind, bounds,
default, title, help, form group, CLI flag). The trigger form's Params
(`orchestration/params.py`), the CLI's `submit` flags (`cli/commands.py`), the parser below and
`JobRequest.to_document()` are generated from it, so none of them can drift from the others.

`parse_job_request` checks shape alone (no I/O; the CLI runs it before triggering);
`selection.resolve_selection` then checks the request against the `tasks` collection.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from llm_batch.config import MAX_TASKS_PER_JOB

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
MAX_OBJECT_DEPTH = 32
"""Deepest nesting accepted in a JSON object field (`llm_params`): sampling parameters and a
structured output schema fit well within it."""
MAX_FILTER_CHARS = 16_384
MAX_TASK_ID_CHARS = 256
MAX_INSTRUCTIONS_CHARS = 32_768

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")
_ID_SEPARATORS = re.compile(r"[\s,]+")
_DECIMAL = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


class Kind(str, Enum):
    """What a field holds; decides its check, its form widget and its CLI flag."""

    IDS = "ids"
    """A list of task ids, or one string of ids separated by commas or whitespace."""
    FILTER = "filter"
    """A plain MongoDB query over `tasks`: a JSON object, or JSON text."""
    OBJECT = "object"
    """Any JSON object."""
    TEXT = "text"
    """Free text, several lines."""
    JOB_ID = "job_id"
    MODEL = "model"
    BOOL = "bool"
    INTEGER = "integer"
    """A whole number in [minimum, maximum]; digits given as text are accepted."""
    NUMBER = "number"
    """A number in [minimum, maximum] (no upper bound when maximum is None)."""
    CHOICE = "choice"
    """One of the field's `choices`."""


class Group(str, Enum):
    """Where a field belongs on the form."""

    SELECTION = "selection"
    WHAT_TO_ASK = "what to ask"
    LIMITS = "limits and safety"
    ADVANCED = "advanced"


@dataclass(frozen=True)
class RequestField:
    """One field of the job request."""

    name: str
    kind: Kind
    group: Group
    title: str
    help: str
    default: Any = None
    """None: the field may be left empty (the form's type admits null)."""
    minimum: float | None = None
    maximum: float | None = None
    max_chars: int | None = None
    """Longest text accepted (for ids: per id)."""
    selects: bool = False
    """Selects the tasks: exactly one selecting field is given per request."""
    stored: bool = True
    """Kept in the job document's `params`."""
    flag: str = ""
    """The CLI flag, when not `--` + the name with dashes (a bool defaulting on: its negation)."""
    flag_help: str = ""
    """The CLI's help, only where the flag means something else than the form's field."""
    choices: tuple[str, ...] = ()
    """The values a CHOICE field takes."""
    messages: Mapping[str, str] = field(default_factory=dict)
    """Refusal texts that differ from the kind's (keys as in `_MESSAGES`)."""

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def message(self, problem: str, **values: Any) -> str:
        """Return the refusal text for `problem` with this field's name and bounds filled in."""
        template = self.messages.get(problem) or _MESSAGES[problem]
        return template.format(
            name=self.name, minimum=self.minimum, maximum=self.maximum,
            max_chars=self.max_chars, choices=", ".join(self.choices), **values,
        )  # fmt: skip


_MESSAGES = {
    "not_text": "{name} must be text, not {type_name}",
    "too_long": "{name} is {length} characters long; at most {max_chars} are accepted",
    "not_bool": "{name} must be true or false, not {value!r}",
    "not_integer": "{name} must be a whole number from {minimum:g} to {maximum:g}, not {value!r}",
    "integer_range": "{name} {value} is out of range: give a whole number from {minimum:g} to "
    "{maximum:g}",
    "not_number": "{name} must be a number, not {value!r}",
    "not_finite": "{name} must be a finite number, not {value!r}: NaN and infinity are refused "
    "(leave it empty for none)",
    "number_range": "{name} {value:g} is out of range: give a number {bound}",
    "not_object": "{name} must be a JSON object",
    "not_job_id": "{name} {value!r} is not valid: use 1 to 64 letters, digits, '.', '_' or '-', "
    "starting with a letter or digit",
    "not_model": "{name} {value!r} is not a model name (letters, digits and ._:/@- only)",
    "not_choice": "{name} {value!r} is not one of {choices}",
}

REQUEST_FIELDS: tuple[RequestField, ...] = (
    RequestField(
        "task_ids", Kind.IDS, Group.SELECTION, "Task ids",
        "The _id of each task document to process, one per line. "
        "Leave empty to select by filter instead.",
        max_chars=MAX_TASK_ID_CHARS, selects=True, flag_help="comma-separated task _ids",
    ),
    RequestField(
        "filter", Kind.FILTER, Group.SELECTION, "Filter",
        'A MongoDB query over the tasks collection, as JSON: e.g. {"payload.lang": "en"}; '
        "{} selects all tasks (up to the limit). Empty: select by task ids or a re-drive "
        "instead. Plain query operators only ($where, $function, $expr are refused).",
        max_chars=MAX_FILTER_CHARS, selects=True,
    ),
    RequestField(
        "retry_of", Kind.JOB_ID, Group.SELECTION, "Re-drive: failed tasks of job (new job)",
        "Send the failed tasks of this earlier job again, as a new job (instead of task "
        "ids or a filter), with its instructions, model, LLM parameters and review threshold "
        "unless you give others. To finish an unfinished job itself, use Resume job instead.",
        selects=True,
        messages={"not_job_id": "{name} {value!r} is not a job id"},
    ),
    RequestField(
        "include_needs_review", Kind.BOOL, Group.SELECTION, "Re-drive: needs-review tasks too",
        "With a re-drive job: also select its tasks whose answers need review.",
        default=False,
    ),
    RequestField(
        "limit", Kind.INTEGER, Group.LIMITS, "Limit",
        f"At most this many tasks (1 to {MAX_TASKS_PER_JOB}); with task ids, at least as many "
        "as you list.",
        default=MAX_TASKS_PER_JOB, minimum=1, maximum=MAX_TASKS_PER_JOB,
        messages={
            "integer_range": "{name} {value} is out of range: a job takes {minimum:g} to "
            "{maximum:g} tasks; split larger selections over several jobs"
        },
    ),
    RequestField(
        "instructions", Kind.TEXT, Group.WHAT_TO_ASK, "Instructions",
        "Text the LLM applies to every task.",
        max_chars=MAX_INSTRUCTIONS_CHARS,
        messages={
            "too_long": "{name} are {length} characters long; at most {max_chars} are accepted"
        },
    ),
    RequestField(
        "model", Kind.MODEL, Group.WHAT_TO_ASK, "Model",
        "Model name; empty uses the llm_default connection's model.",
    ),
    RequestField(
        "job_id", Kind.JOB_ID, Group.ADVANCED, "Resume job (same job), or new job's id",
        "An existing job's id resumes that job: only its unanswered tasks are sent again, "
        "its answers are kept. Another id names the new job. Empty: the Run ID you chose "
        "(Advanced Options below), else a generated id.",
        stored=False,
    ),
    RequestField(
        "llm_params", Kind.OBJECT, Group.WHAT_TO_ASK, "LLM parameters",
        'Passed to the service with every request, e.g. {"temperature": 0}.',
        default={},
        messages={"not_object": '{name} must be a JSON object, e.g. {{"temperature": 0}}'},
    ),
    RequestField(
        "use_cache", Kind.BOOL, Group.ADVANCED, "Use cached answers",
        "Answer a task from a stored answer to the same input, instructions, model "
        "and parameters (spends nothing). Turn off to ask the LLM again.",
        default=True, flag="--no-cache", flag_help="ask the LLM even if answered",
    ),
    RequestField(
        "cache_below_review", Kind.BOOL, Group.ADVANCED, "Use cached answers that need review",
        "Also take stored answers below this job's review threshold, or sent to review by "
        "the job that got them; they end needs_review. Off: such tasks are asked again.",
        default=False,
    ),
    RequestField(
        "dry_run", Kind.BOOL, Group.LIMITS, "Dry run",
        "Only estimate tokens and cost of the selection: the estimate becomes the run's "
        "note. Nothing is sent and no job is created.",
        default=False, stored=False,
    ),
    RequestField(
        "review_below", Kind.NUMBER, Group.LIMITS, "Review below confidence",
        "Answers whose confidence (0 to 1) is below this end as needs_review "
        "instead of succeeded. Empty: no review routing.",
        minimum=0, maximum=1,
    ),
    RequestField(
        "max_cost_usd", Kind.NUMBER, Group.LIMITS, "Budget (USD)",
        "Hard budget: once the job has spent this much, nothing more is sent and "
        "the remaining tasks end cancelled (budget_exhausted).",
        minimum=0,
    ),
    RequestField(
        "alert_failure_rate", Kind.NUMBER, Group.LIMITS, "Alert above failure rate",
        "Alert (the log, and the e-mail and Slack channels set up with Airflow connections) "
        "when more than this share of the job's tasks failed.",
        default=0.3, minimum=0, maximum=1,
    ),
    RequestField(
        "delivery", Kind.CHOICE, Group.ADVANCED, "Delivery",
        "sync: requests answered as they are sent (minutes). provider_batch: one file through "
        "the provider's batch API, about half the price, answered within 24 h; needs an "
        "OpenAI-compatible connection (else the job runs sync).",
        default="sync", choices=("sync", "provider_batch"),
    ),
    RequestField(
        "resend_via", Kind.CHOICE, Group.ADVANCED, "Re-send after expiry via",
        "When a provider batch expires or is cancelled by the provider, its answered tasks are "
        "kept and the rest are sent once more: in a new provider batch, or sync.",
        default="provider_batch", choices=("provider_batch", "sync"),
    ),
)  # fmt: skip

REQUEST_KEYS = tuple(f.name for f in REQUEST_FIELDS)
SELECTING_KEYS = tuple(f.name for f in REQUEST_FIELDS if f.selects)
_FIELDS = {f.name: f for f in REQUEST_FIELDS}


def request_field(name: str) -> RequestField:
    """Return the declared field `name`."""
    return _FIELDS[name]


def is_job_id(text: str) -> bool:
    """Return whether `text` is a valid job id."""
    return bool(_JOB_ID.match(text))


def default_of(name: str) -> Any:
    """Return a fresh copy of field `name`'s default (never share a mutable default)."""
    return copy.deepcopy(_FIELDS[name].default)


@dataclass(frozen=True, kw_only=True)
class JobRequest:
    """What an operator asked for, checked for shape but not yet against the database.

    One attribute per field of `REQUEST_FIELDS` (where each is explained), same order.
    """

    task_ids: tuple[str, ...] | None
    filter: dict[str, Any] | None
    retry_of: str | None
    include_needs_review: bool
    limit: int
    instructions: str | None
    model: str | None
    job_id: str | None
    llm_params: dict[str, Any]
    use_cache: bool
    cache_below_review: bool
    dry_run: bool
    review_below: float | None
    max_cost_usd: float | None
    alert_failure_rate: float
    delivery: str
    resend_via: str

    def to_document(self) -> dict[str, Any]:
        """Return the request as stored in `jobs.params`."""
        document = {f.name: getattr(self, f.name) for f in REQUEST_FIELDS if f.stored}
        if self.task_ids is not None:
            document["task_ids"] = list(self.task_ids)
        return document


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
    values: dict[str, Any] = {}
    refused: set[str] = set()
    for spec in REQUEST_FIELDS:
        value = None
        if spec.name in conf:
            before = len(problems)
            value = _PARSERS[spec.kind](spec, conf[spec.name], problems)
            if len(problems) > before:
                refused.add(spec.name)
        values[spec.name] = default_of(spec.name) if value is None else value

    selected = [name for name in SELECTING_KEYS if values[name] is not None]
    if len(selected) > 1:
        problems.append(
            f"give one of {', '.join(SELECTING_KEYS[:-1])} or {SELECTING_KEYS[-1]}, not several: "
            "clear the others ({} as the filter selects all tasks)"
        )
    elif not selected and not refused.intersection(SELECTING_KEYS):
        problems.append(
            "no tasks selected: give task_ids (a list of task document _ids), a filter "
            "(a MongoDB query over tasks; {} selects all tasks, up to limit) or retry_of "
            "(an earlier job whose failed tasks to send again)"
        )
    task_ids, limit = values["task_ids"], values["limit"]
    if task_ids and "limit" not in refused and len(task_ids) > limit:
        problems.append(
            f"{len(task_ids)} task ids given but limit is {limit}: raise limit (at most "
            f"{MAX_TASKS_PER_JOB}) or split the ids over several jobs"
        )
    if problems:
        raise InvalidJobRequest(problems)
    return JobRequest(**values)


# Each check returns the value as the request holds it, or None when not given (the field's
# default applies). A refused value is reported in `problems`; what is returned then only
# decides which other problems are worth reporting with it.


def _parse_integer(spec: RequestField, value: Any, problems: list[str]) -> int | None:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        # Null included: a whole number has no "empty" on the form.
        problems.append(spec.message("not_integer", value=value))
        return None
    if (spec.minimum is not None and value < spec.minimum) or (
        spec.maximum is not None and value > spec.maximum
    ):
        problems.append(spec.message("integer_range", value=value))
        return None
    return value


def _parse_number(spec: RequestField, value: Any, problems: list[str]) -> float | None:
    if isinstance(value, str):
        # The form's text box for an optional number sends what was typed.
        if not value.strip():
            return None
        if _DECIMAL.match(value.strip()):
            value = float(value)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(spec.message("not_number", value=value))
        return None
    if not math.isfinite(value):
        # NaN compares false with every bound: a NaN budget would be no budget at all.
        problems.append(spec.message("not_finite", value=value))
        return None
    minimum = spec.minimum if spec.minimum is not None else float("-inf")
    if value < minimum or (spec.maximum is not None and value > spec.maximum):
        bound = (
            f"from {minimum:g} to {spec.maximum:g}"
            if spec.maximum is not None
            else f"of {minimum:g} or more"
        )
        problems.append(spec.message("number_range", value=value, bound=bound))
        return None
    return float(value)


def _parse_bool(spec: RequestField, value: Any, problems: list[str]) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    problems.append(spec.message("not_bool", value=value))
    return None


def _parse_text(spec: RequestField, value: Any, problems: list[str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        problems.append(spec.message("not_text", type_name=type(value).__name__))
        return None
    text = value.strip() or None
    if text is not None and spec.max_chars is not None and len(text) > spec.max_chars:
        problems.append(spec.message("too_long", length=len(text)))
        return None
    return text


def _parse_pattern(pattern: re.Pattern[str], problem: str) -> _Parser:
    def parse(spec: RequestField, value: Any, problems: list[str]) -> str | None:
        text = _parse_text(spec, value, problems)
        if text is not None and not pattern.match(text):
            problems.append(spec.message(problem, value=text))
        return text

    return parse


_NOT_JSON = object()
"""What `_load_json_text` returns for text it refused (a problem is added)."""


def _load_json_text(
    spec: RequestField, text: str, problems: list[str], max_depth: int, hint: str = ""
) -> Any:
    """Return the value JSON `text` holds, or `_NOT_JSON` with a problem saying what is wrong.

    Text nested thousands deep makes the decoder raise `RecursionError`: it is refused like
    any other unreadable text, never raised.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(
            f"{spec.name} is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}){hint}"
        )
    except RecursionError:
        problems.append(_too_deep(spec.name, max_depth))
    return _NOT_JSON


def _parse_object(spec: RequestField, value: Any, problems: list[str]) -> dict[str, Any] | None:
    if isinstance(value, str) and value.strip():
        # The form sends JSON it cannot parse as the text typed: say what is wrong with it.
        value = _load_json_text(spec, value, problems, MAX_OBJECT_DEPTH)
        if value is _NOT_JSON:
            return None
    if not value or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, dict):
        problems.append(spec.message("not_object"))
        return None
    before = len(problems)
    problems.extend(_unsendable_values(spec.name, value, MAX_OBJECT_DEPTH))
    return dict(value) if len(problems) == before else None


def _parse_ids(spec: RequestField, value: Any, problems: list[str]) -> tuple[str, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        items: list[Any] = [part for part in _ID_SEPARATORS.split(value) if part]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        problems.append(
            f"{spec.name} must be a list of strings (or one string of ids separated by commas)"
        )
        return None
    ids: list[str] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str) or not item.strip():
            problems.append(f"task id {item!r} is not a non-empty string")
            continue
        task_id = item.strip()
        if spec.max_chars is not None and len(task_id) > spec.max_chars:
            problems.append(
                f"task id {task_id[:40]!r}... is longer than {spec.max_chars} characters"
            )
        elif task_id in seen:
            problems.append(f"task id {task_id!r} is listed twice: list each task once")
        else:
            seen.add(task_id)
            ids.append(task_id)
    return tuple(ids) or None


def _parse_filter(spec: RequestField, value: Any, problems: list[str]) -> dict[str, Any] | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        hint = ': write it as a JSON object, e.g. {"payload.lang": "en"}'
        value = _load_json_text(spec, value, problems, MAX_FILTER_DEPTH, hint)
        if value is _NOT_JSON:
            return None
    if not isinstance(value, dict):
        problems.append(
            f"{spec.name} must be a JSON object (a MongoDB query), not {type(value).__name__}: "
            'e.g. {"payload.lang": "en"}'
        )
        return None
    # Before anything recursive (the size check below serializes it): a filter nested
    # thousands deep would end in a RecursionError instead of a refusal.
    shape = list(_unsendable_values(spec.name, value, MAX_FILTER_DEPTH))
    if shape:
        problems.extend(shape)
        return None
    if spec.max_chars is not None and len(json.dumps(value, default=str)) > spec.max_chars:
        problems.append(
            f"{spec.name} is larger than {spec.max_chars} characters: select by fewer terms"
        )
        return None
    problems.extend(_unsafe_operators(value, depth=0))
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
            elif key == "$regex" and isinstance(child, str) and has_nested_quantifier(child):
                yield (
                    f"filter $regex {child[:80]!r} repeats a group that itself repeats (like "
                    "(a+)+): such patterns can take exponential time; rewrite it without the "
                    "nested repetition, e.g. anchored with ^ and a single quantifier"
                )
            else:
                yield from _unsafe_operators(child, depth + 1)
    elif isinstance(node, list):
        for child in node:
            yield from _unsafe_operators(child, depth + 1)


def _unsendable_values(name: str, value: Any, max_depth: int) -> Iterator[str]:
    """Yield what in a JSON value cannot be stored or sent as given, walking it without recursion.

    Refused: nesting deeper than `max_depth`, numbers that are not finite (NaN passes every
    comparison, so a NaN threshold is no threshold) and keys with a NUL character (BSON keys
    end at NUL: the database driver refuses them).
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            yield _too_deep(name, max_depth)
            return
        if isinstance(node, float) and not math.isfinite(node):
            yield f"{name} holds {node!r}: NaN and infinity are refused, give a finite number"
        elif isinstance(node, dict):
            for key, child in node.items():
                if isinstance(key, str) and "\0" in key:
                    yield f"{name} key {key!r} holds a NUL character: remove it"
                stack.append((child, depth + 1))
        elif isinstance(node, list | tuple):
            stack.extend((child, depth + 1) for child in node)


def _too_deep(name: str, max_depth: int) -> str:
    return f"{name} nests deeper than {max_depth} levels: simplify it"


def has_nested_quantifier(pattern: str) -> bool:
    """Return whether a regex repeats a group that itself holds a repetition, like `(a+)+`.

    Such patterns backtrack exponentially on near-matches. A heuristic: escapes and character
    classes are skipped; fixed counts (`{3}`) do not count as repetition.
    """
    open_groups: list[bool] = []  # per open group: whether a repetition occurs inside it
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if char == "[":
            i = _end_of_class(pattern, i)
            continue
        if char == "(":
            open_groups.append(False)
        elif char == ")" and open_groups:
            repeats_inside = open_groups.pop()
            if repeats_inside and _repeats_at(pattern, i + 1):
                return True
            if open_groups:
                open_groups[-1] = open_groups[-1] or repeats_inside
        elif open_groups and _repeats_at(pattern, i):
            open_groups[-1] = True
        i += 1
    return False


_REPEAT = re.compile(r"[+*]|\{\d*,\d*\}")


def _repeats_at(pattern: str, i: int) -> bool:
    return _REPEAT.match(pattern, i) is not None


def _end_of_class(pattern: str, i: int) -> int:
    """Return the index just past the character class that opens at `i`."""
    j = i + 1
    if pattern.startswith("^", j):
        j += 1
    if pattern.startswith("]", j):
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _parse_choice(spec: RequestField, value: Any, problems: list[str]) -> str | None:
    if value is None or value == "":
        return None
    if value not in spec.choices:
        problems.append(spec.message("not_choice", value=value))
        return None
    return str(value)


_Parser = Callable[[RequestField, Any, list[str]], Any]

_PARSERS: dict[Kind, _Parser] = {
    Kind.IDS: _parse_ids,
    Kind.FILTER: _parse_filter,
    Kind.OBJECT: _parse_object,
    Kind.TEXT: _parse_text,
    Kind.JOB_ID: _parse_pattern(_JOB_ID, "not_job_id"),
    Kind.MODEL: _parse_pattern(_MODEL, "not_model"),
    Kind.BOOL: _parse_bool,
    Kind.INTEGER: _parse_integer,
    Kind.NUMBER: _parse_number,
    Kind.CHOICE: _parse_choice,
}
