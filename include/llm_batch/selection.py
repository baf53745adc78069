"""Resolve a checked job request to task ids against MongoDB, before anything is spent.

The second of two steps: `request.parse_job_request` checks the request's shape (no I/O; the
CLI runs it before triggering), `resolve_selection` checks it against the `tasks` collection.
Whatever the database refuses because of the request (a filter it cannot run, a key BSON cannot
hold, a selection slower than the time bound) becomes an `InvalidJobRequest`, never a crash
that Airflow would retry.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bson import ObjectId
from bson.errors import BSONError
from pymongo.collection import Collection
from pymongo.errors import ExecutionTimeout, OperationFailure

from llm_batch.config import LOOKUP_CHUNK, SELECTION_TIMEOUT_ENV, SELECTION_TIMEOUT_S
from llm_batch.request import InvalidJobRequest, JobRequest


def resolve_selection(
    tasks: Collection[dict[str, Any]],
    request: JobRequest,
    *,
    timeout_s: float = SELECTION_TIMEOUT_S,
) -> list[Any]:
    """Return the `_id`s of the tasks the request selects, in a stable order.

    Raises `InvalidJobRequest` for unknown ids, a filter the server refuses or cannot run
    within `timeout_s`, or an empty selection.
    """
    if request.task_ids is not None:
        return _existing_ids(tasks, request.task_ids)
    assert request.filter is not None
    with _refusing_bad_filters(timeout_s):
        cursor = (
            tasks.find(request.filter, {"_id": 1})
            .sort("_id", 1)
            .limit(request.limit)
            .max_time_ms(_ms(timeout_s))
        )
        ids = [doc["_id"] for doc in cursor]
    if not ids:
        raise InvalidJobRequest(
            [
                f"the filter {json.dumps(request.filter, default=str)} matched no tasks in "
                f"collection {tasks.name!r}: check field names (payload fields are under "
                "'payload.') and values"
            ]
        )
    return ids


def count_matching(
    tasks: Collection[dict[str, Any]], query: dict[str, Any], *, timeout_s: float
) -> int:
    """Return how many tasks `query` matches, within the same time bound as the selection."""
    with _refusing_bad_filters(timeout_s):
        return tasks.count_documents(query, maxTimeMS=_ms(timeout_s))


@contextmanager
def _refusing_bad_filters(timeout_s: float) -> Iterator[None]:
    """Turn what the database says about a user's filter into an `InvalidJobRequest`."""
    try:
        yield
    except ExecutionTimeout as exc:
        raise InvalidJobRequest(
            [
                f"the filter took longer than {timeout_s:g} s to select tasks: narrow it (match "
                f"indexed fields, anchor a $regex with ^) or raise {SELECTION_TIMEOUT_ENV}"
            ]
        ) from exc
    except OperationFailure as exc:
        reason = exc.details.get("errmsg") if exc.details else str(exc)
        raise InvalidJobRequest([f"the database refused the filter: {reason}"]) from exc
    except BSONError as exc:
        # e.g. a key with a NUL character: BSON keys end at NUL, the driver refuses to encode it.
        raise InvalidJobRequest(
            [f"the filter cannot be sent to the database ({exc}): fix its keys and values"]
        ) from exc


def refuse_colliding_ids(ids: Sequence[Any]) -> None:
    """Refuse a selection in which two tasks would go to the LLM under the same id.

    Tasks travel as `str(_id)`: the string `"65f0..."` and `ObjectId("65f0...")` (or `1` and
    `"1"`) would share one wire id, and one answer would stand for two tasks.
    """
    by_wire_id: dict[str, list[Any]] = defaultdict(list)
    for task_id in ids:
        by_wire_id[str(task_id)].append(task_id)
    colliding = {wire: same for wire, same in by_wire_id.items() if len(same) > 1}
    if not colliding:
        return
    shown = "; ".join(
        " and ".join(_describe(task_id) for task_id in same)
        for same in list(colliding.values())[:10]
    )
    more = f" (and {len(colliding) - 10} more)" if len(colliding) > 10 else ""
    raise InvalidJobRequest(
        [
            f"{len(colliding)} selected id(s) are the same text under different _id types, "
            f"so their answers could not be told apart: {shown}{more}; select only one of "
            'each (e.g. add {"_id": {"$type": "string"}} to the filter) or give those '
            "tasks distinct _ids"
        ]
    )


def _describe(task_id: Any) -> str:
    if isinstance(task_id, ObjectId):
        return f'ObjectId("{task_id}")'
    return f"{task_id!r} ({type(task_id).__name__})"


def _existing_ids(tasks: Collection[dict[str, Any]], wanted: tuple[str, ...]) -> list[Any]:
    """Map each requested id to its stored `_id` (a string, or an ObjectId given as hex)."""
    found = _stored_ids(tasks, wanted)
    # Hex of any case names an ObjectId: map it back to the text the operator gave.
    as_object_ids = {t: ObjectId(t) for t in wanted if t not in found and ObjectId.is_valid(t)}
    stored = _stored_ids(tasks, as_object_ids.values())
    found.update(
        (text, stored[str(oid)]) for text, oid in as_object_ids.items() if str(oid) in stored
    )
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


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
