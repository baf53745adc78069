"""The nightly backlog: which tasks an automatic run sends again, and which it leaves alone.

The backlog is every task without a good answer, except three kinds that sending again would
only spend on:

- `awaiting_review`: its last result is `needs_review`; a person decides, not the LLM;
- `failed_permanently`: its last failure is the task's own (`models.PERMANENT_ERROR_TYPES`,
  e.g. `invalid_input`): the same input fails again;
- `attempts_cap`: backlog jobs already failed it `max_attempts` times (the job ids are kept
  in the task's `auto_attempts`; a job counts once however often it is resumed).

A job whose filter is `backlog_filter(n)` is a backlog job: it records how many tasks were
left for each reason, and its failures count toward the cap.
"""

from __future__ import annotations

import os
from typing import Any

from llm_batch.models import PERMANENT_ERROR_TYPES, ResultStatus

ATTEMPTS_FIELD = "auto_attempts"
"""On `tasks`: the ids of the backlog jobs in which the task failed."""
MAX_ATTEMPTS_ENV = "LLM_BATCH_NIGHTLY_MAX_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 3

_SETTLED = [ResultStatus.SUCCEEDED.value, ResultStatus.NEEDS_REVIEW.value]
_PERMANENT = sorted(PERMANENT_ERROR_TYPES)


def backlog_filter(max_attempts: int) -> dict[str, Any]:
    """Return the query over `tasks` that selects the backlog (plain operators only)."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be 1 or more, not {max_attempts}")
    return {
        "last_result.status": {"$nin": _SETTLED},
        "last_result.error.type": {"$nin": _PERMANENT},
        # Fewer than max_attempts entries: the array has no element at index max_attempts-1.
        _cap_key(max_attempts): {"$exists": False},
    }


def max_attempts_from_env() -> int:
    """Return `LLM_BATCH_NIGHTLY_MAX_ATTEMPTS` (default 3), refusing what is not a count."""
    raw = os.environ.get(MAX_ATTEMPTS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_ATTEMPTS
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(
            f"{MAX_ATTEMPTS_ENV}={raw!r} is not a whole number of 1 or more: set how many "
            f"failed nightly jobs a task gets before the nightly leaves it (default "
            f"{DEFAULT_MAX_ATTEMPTS})"
        )
    return int(raw)


def backlog_cap(query: dict[str, Any] | None) -> int | None:
    """Return the attempts cap of a backlog filter, or None if `query` is not one."""
    for key in query or {}:
        prefix, _, index = key.partition(".")
        if prefix == ATTEMPTS_FIELD and index.isdigit():
            cap = int(index) + 1
            return cap if query == backlog_filter(cap) else None
    return None


def skip_queries(max_attempts: int) -> dict[str, dict[str, Any]]:
    """Return, per reason, the query of the tasks the backlog leaves for it (disjoint)."""
    unsettled = {"last_result.status": {"$nin": _SETTLED}}
    return {
        "awaiting_review": {"last_result.status": ResultStatus.NEEDS_REVIEW.value},
        "failed_permanently": {**unsettled, "last_result.error.type": {"$in": _PERMANENT}},
        "attempts_cap": {
            **unsettled,
            "last_result.error.type": {"$nin": _PERMANENT},
            _cap_key(max_attempts): {"$exists": True},
        },
    }


def _cap_key(max_attempts: int) -> str:
    return f"{ATTEMPTS_FIELD}.{max_attempts - 1}"
