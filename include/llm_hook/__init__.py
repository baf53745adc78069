"""Airflow hook and client for batch LLM services.

`LLMHook(llm_conn_id).get_conn()` gives an `LLMClient`; `LLMClient.complete`
sends up to 10 `LLMTask`s and returns one `TaskOutcome` per task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from llm_hook.client import LLMClient
from llm_hook.exceptions import LLMConfigError, LLMError, LLMRequestError, LLMResponseError
from llm_hook.settings import ClientSettings
from llm_hook.types import CallRecord, LLMTask, OutcomeStatus, TaskOutcome, Usage

if TYPE_CHECKING:
    from llm_hook.hook import LLMHook


def __getattr__(name: str) -> Any:
    # The hook imports Airflow (about a second); the client and its types don't need it,
    # so the CLI and plain scripts stay fast and free of Airflow's logging setup.
    if name == "LLMHook":
        from llm_hook.hook import LLMHook

        return LLMHook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CallRecord",
    "ClientSettings",
    "LLMClient",
    "LLMConfigError",
    "LLMError",
    "LLMHook",
    "LLMRequestError",
    "LLMResponseError",
    "LLMTask",
    "OutcomeStatus",
    "TaskOutcome",
    "Usage",
]
