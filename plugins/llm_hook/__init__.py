"""Airflow hook and client for batch LLM services.

`LLMHook(llm_conn_id).get_conn()` gives an `LLMClient`; `LLMClient.complete`
sends up to 10 `LLMTask`s and returns one `TaskOutcome` per task.
"""

from __future__ import annotations

from llm_hook.client import LLMClient
from llm_hook.exceptions import LLMConfigError, LLMError, LLMRequestError, LLMResponseError
from llm_hook.hook import LLMHook
from llm_hook.settings import ClientSettings
from llm_hook.types import CallRecord, LLMTask, OutcomeStatus, TaskOutcome, Usage

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
