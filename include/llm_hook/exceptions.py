"""Errors the LLM client raises.

    LLMError
     ├── LLMConfigError    the connection's settings are unusable; says which field to fix
     ├── LLMRequestError   a request got no usable answer (transport error or non-2xx status)
     └── LLMResponseError  a 2xx body that breaks the wire protocol

`LLMClient.complete` raises none of these for service trouble: it classifies every
task into a `TaskOutcome` instead. They surface from settings validation,
`LLMClient.list_models` and `LLMHook.test_connection`.
"""

from __future__ import annotations


class LLMError(Exception):
    """Base class for every error raised by `llm_hook`."""


class LLMConfigError(LLMError, ValueError):
    """The connection's settings are unusable."""


class LLMRequestError(LLMError):
    """A request got no usable answer."""

    def __init__(self, message: str, *, error_type: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.http_status = http_status


class LLMResponseError(LLMError):
    """A successful response whose body does not follow the wire protocol."""
