"""The Airflow hook: maps an `llm_batch` connection to a configured `LLMClient`. Nothing more."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from llm_hook.client import LLMClient
from llm_hook.pacing import RateLimiter
from llm_hook.provider import UI_FIELD_BEHAVIOUR
from llm_hook.settings import ClientSettings


class LLMHook(BaseHook):
    """Give tasks an `LLMClient` for the LLM service named by an Airflow connection.

    :param llm_conn_id: the connection (type `llm_batch`) holding the base URL,
        API key and client settings.
    """

    conn_name_attr = "llm_conn_id"
    default_conn_name = "llm_default"
    conn_type = "llm_batch"
    hook_name = "LLM batch service"

    def __init__(self, llm_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm_conn_id = llm_conn_id
        self._client: LLMClient | None = None

    def get_conn(self, rate_limiter: RateLimiter | None = None) -> LLMClient:
        """Return the client, reading the connection on first use only.

        :param rate_limiter: shares request pacing and endpoint health with other workers
            (used when the client is built, on the first call).
        """
        if self._client is None:
            conn = self.get_connection(self.llm_conn_id)
            self._client = LLMClient(
                ClientSettings.from_connection(conn), rate_limiter=rate_limiter
            )
        return self._client

    def test_connection(self) -> tuple[bool, str]:
        """List each endpoint's models: proves URLs and keys without spending tokens."""
        try:
            client = self.get_conn()
            offered = {e.url: client.list_models(e.id) for e in client.endpoints}
        except Exception as exc:  # the UI shows the message; any failure is a failed test
            return False, str(exc)
        model = client.settings.model
        for url, models in offered.items():
            if models and model not in models:
                return False, (
                    f"Connected to {url}, but the default model {model!r} is not offered "
                    f"(available: {', '.join(models[:20])}); fix `model` in the extra."
                )
        return True, "; ".join(
            f"Connected to {url}: {len(models)} model(s) available"
            for url, models in offered.items()
        ) + "."

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Relabel the connection form for an HTTP API with a key (as `provider.py` declares)."""
        return {key.replace("-", "_"): value for key, value in UI_FIELD_BEHAVIOUR.items()}
