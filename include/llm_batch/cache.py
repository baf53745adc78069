"""Reuse stored answers: the same question asked again within a set age costs nothing.

A question is (adapter, model, instructions, params, input); its `llm_cache` document
is `{_id: sha256 of the question as canonical JSON, output, confidence, needs_review, model,
adapter, created_at}`. Only successful answers are stored, so a failure is always asked again.
Answers older than `max_age_s` are never used; a TTL index on `created_at` removes them
(where the server supports TTL indexes; the age check alone keeps lookups right).

Review rule: a stored answer keeps its confidence, and whether the job that got it sent it to
review (`needs_review`). It answers another job's task only when neither that job's
`review_below` nor the first job's review routing doubts it, since an answer that a person must
check is not worth reusing for free; a job with `cache_below_review` on takes those answers
too, and they go through its review routing like fresh answers (`needs_review` below its
threshold). A re-drive of needs-review tasks never asks the cache for them: the point of a
re-drive is a new answer (see `processing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ASCENDING, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

log = logging.getLogger(__name__)

Document = dict[str, Any]

INDEX_OPTIONS_CONFLICT = frozenset({85, 86})
"""Server codes for "an index on these keys exists with other options"."""


@dataclass(frozen=True)
class CachedAnswer:
    """A stored successful answer."""

    output: Any
    confidence: float | None
    model: str | None
    needs_review: bool = False
    """The job that got this answer routed it to review (its confidence was below that job's
    `review_below`)."""

    def doubtful(self, review_below: float | None) -> bool:
        """Return whether this answer is below `review_below`, or was sent to review before."""
        return self.needs_review or below_review(self.confidence, review_below)


def below_review(confidence: float | None, review_below: float | None) -> bool:
    """Return whether an answer with `confidence` must be reviewed under `review_below`."""
    return confidence is not None and review_below is not None and confidence < review_below


def answer_scope(completer: object, model: str | None) -> dict[str, str] | None:
    """Return what besides the question decides the completer's answer, or None if unknown.

    `llm_hook.LLMClient.answer_scope` gives the adapter and the effective model; a completer
    without it is never cached, since a cached answer might belong to another model.
    """
    scope_of = getattr(completer, "answer_scope", None)
    return scope_of(model) if callable(scope_of) else None


def question_key(
    scope: Mapping[str, str], instructions: str | None, params: Mapping[str, Any], task_input: Any
) -> str | None:
    """Return the cache key of one question, or None if its input is not plain JSON."""
    try:
        text = json.dumps(
            [dict(scope), instructions or "", dict(params), task_input],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError):
        return None
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ResponseCache:
    """Stored answers in one collection, reused while younger than `max_age_s`."""

    def __init__(
        self,
        collection: Collection[Document],
        *,
        max_age_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.collection = collection
        self.max_age_s = max_age_s
        self._clock = clock

    def ensure_indexes(self) -> None:
        """Let the server drop answers past `max_age_s` (best effort: lookups check age too).

        A `max_age_s` of 0 turns the cache off: the index is left as it is, since a TTL made
        from it would have the server delete every stored answer at once.
        """
        if self.max_age_s <= 0:
            log.info("%s is off (max age 0): its TTL index is left as it is", self.collection.name)
            return
        ttl = max(1, int(self.max_age_s))
        try:
            self.collection.create_index(
                [("created_at", ASCENDING)], name="created_at_ttl", expireAfterSeconds=ttl
            )
        except OperationFailure as exc:
            if exc.code not in INDEX_OPTIONS_CONFLICT:
                raise
            try:
                self.collection.database.command(
                    "collMod",
                    self.collection.name,
                    index={"name": "created_at_ttl", "expireAfterSeconds": ttl},
                )
            except OperationFailure:
                log.warning(
                    "could not change the TTL of %s to %ds; old answers are still never reused",
                    self.collection.full_name,
                    ttl,
                )

    def lookup(
        self,
        scope: Mapping[str, str],
        instructions: str | None,
        params: Mapping[str, Any],
        inputs: Mapping[Any, Any],
    ) -> dict[Any, CachedAnswer]:
        """Return the stored answers, by task id, for the tasks whose question has one."""
        keys = {
            task_id: question_key(scope, instructions, params, i) for task_id, i in inputs.items()
        }
        wanted = sorted({key for key in keys.values() if key is not None})
        if not wanted:
            return {}
        oldest = self._clock() - timedelta(seconds=self.max_age_s)
        cursor = self.collection.find(
            {"_id": {"$in": wanted}, "created_at": {"$gte": oldest}},
            {"output": 1, "confidence": 1, "model": 1, "needs_review": 1},
        )
        found = {
            doc["_id"]: CachedAnswer(
                doc.get("output"),
                doc.get("confidence"),
                doc.get("model"),
                bool(doc.get("needs_review")),
            )
            for doc in cursor
        }
        return {task_id: found[key] for task_id, key in keys.items() if key in found}

    def store(
        self,
        scope: Mapping[str, str],
        instructions: str | None,
        params: Mapping[str, Any],
        answers: Iterable[tuple[Any, CachedAnswer]],
    ) -> int:
        """Store successful answers, given as (task input, answer); return how many."""
        now = self._clock()
        ops = []
        for task_input, answer in answers:
            key = question_key(scope, instructions, params, task_input)
            if key is None:
                continue
            document = {
                "output": answer.output,
                "confidence": answer.confidence,
                "needs_review": answer.needs_review,
                "model": answer.model,
                "adapter": scope.get("adapter"),
                "created_at": now,
            }
            ops.append(UpdateOne({"_id": key}, {"$set": document}, upsert=True))
        if ops:
            self.collection.bulk_write(ops, ordered=False)
        return len(ops)
