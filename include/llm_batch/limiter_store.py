"""The rate limiter's shared store in MongoDB: one document per LLM endpoint.

Every worker, on any machine, reaches the same MongoDB, so every worker's client paces
its requests against the same budget and sees the same endpoint health (see
`llm_hook.pacing` for the rules). A document is `{_id: <endpoint id>, version, state,
until, failures, request_tat, token_tat, factor, learned_rpm, learned_tpm, updated_at}`.

Each change is a compare-and-swap: read the document, compute the new record, and write it
with `find_one_and_update` only if `version` is still the one read; a writer that lost the
race reads again. One document per endpoint holding the GCRA state keeps every rolling
window under the limit, which counters per fixed window cannot (a window's last second
and the next window's first can each take a full limit), and needs no transaction.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from llm_batch import config
from llm_hook.pacing import HEADROOM, EndpointRecord, RateLimiter

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CONFLICTS = 200
"""Lost races in a row before giving up: far beyond any real contention."""


class StoreContention(RuntimeError):
    """A record could not be updated: other writers kept winning the race."""


class MongoLimiterStore:
    """Endpoint records in a MongoDB collection, changed by compare-and-swap."""

    def __init__(self, collection: Collection[dict[str, Any]]) -> None:
        self.collection = collection

    def load(self, endpoint_id: str) -> EndpointRecord:
        """Return the endpoint's record (a fresh one if there is none)."""
        return EndpointRecord.from_document(self.collection.find_one({"_id": endpoint_id}))

    def modify(
        self, endpoint_id: str, change: Callable[[EndpointRecord], tuple[EndpointRecord, T]]
    ) -> T:
        """Apply `change` to the stored record atomically; unchanged records are not written."""
        for conflicts in range(MAX_CONFLICTS):
            document = self.collection.find_one({"_id": endpoint_id})
            current = EndpointRecord.from_document(document)
            updated, result = change(current)
            if updated == current:
                return result
            fields = {**updated.to_document(), "updated_at": datetime.now(UTC)}
            if document is None:
                try:
                    self.collection.insert_one({"_id": endpoint_id, "version": 1, **fields})
                except DuplicateKeyError:
                    continue
                return result
            version = document.get("version", 0)
            written = self.collection.find_one_and_update(
                {"_id": endpoint_id, "version": version},
                {"$set": {**fields, "version": version + 1}},
                projection={"_id": 1},
                return_document=ReturnDocument.AFTER,
            )
            if written is not None:
                return result
            if conflicts >= 3:
                # Many writers at once: spread the retries so they stop colliding.
                time.sleep(random.uniform(0, 0.002 * conflicts))
        raise StoreContention(
            f"could not update the rate-limit record of {endpoint_id!r} in "
            f"{self.collection.full_name} after {MAX_CONFLICTS} tries"
        )


def mongo_rate_limiter(
    db: Database[dict[str, Any]],
    *,
    clock: Callable[[], float] = time.time,
    headroom: float = HEADROOM,
) -> RateLimiter:
    """Return a rate limiter whose budgets and endpoint health live in `db`."""
    return RateLimiter(MongoLimiterStore(db[config.LLM_ENDPOINTS]), clock=clock, headroom=headroom)
