"""What job creation knows about the LLM connection: its protocol, model, endpoints and prices.

Read from the connection's settings once, when a job is created or estimated, so that the
domain can check `llm_params` against the connection's adapter and output-token ceiling and
base an estimate on the history of this very connection, without talking to Airflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from llm_hook.adapters import ADAPTERS
from llm_hook.params import check_llm_params
from llm_hook.settings import ClientSettings

_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ClientSettings)}
"""A connection's defaults (instantiating `ClientSettings` needs a URL)."""


@dataclass(frozen=True)
class Prices:
    """USD per 1000 tokens of one model."""

    input_per_1k: float
    output_per_1k: float

    def cost(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.input_per_1k + output_tokens * self.output_per_1k) / 1000


@dataclass(frozen=True)
class LLMService:
    """The LLM connection as job creation sees it; the defaults are a connection's defaults."""

    adapter: str = _DEFAULTS["adapter"]
    model: str = _DEFAULTS["model"]
    """The connection's model: a job that names none uses it."""
    call_urls: tuple[str, ...] = ()
    """The URLs its requests go to, as `llm_calls.endpoint` records them."""
    max_tokens_ceiling: int = _DEFAULTS["max_tokens_ceiling"]
    prices: Prices = field(default_factory=lambda: Prices(0.0, 0.0))
    batch_prices: Prices | None = None
    """Prices through the provider's batch API, when the connection has one."""

    @classmethod
    def from_settings(cls, settings: ClientSettings) -> LLMService:
        """Return the service a client with `settings` talks to."""
        path = ADAPTERS[settings.adapter].path
        return cls(
            adapter=settings.adapter,
            model=settings.model,
            call_urls=tuple(endpoint.url + path for endpoint in settings.endpoint_list()),
            max_tokens_ceiling=settings.max_tokens_ceiling,
            prices=Prices(settings.price_input_per_1k, settings.price_output_per_1k),
            batch_prices=(
                Prices(*settings.batch_prices) if settings.supports_provider_batch else None
            ),
        )

    def llm_params_problems(self, params: Mapping[str, Any] | None) -> list[str]:
        """Return why a job's `llm_params` cannot be sent through this connection; empty if fine."""
        return check_llm_params(self.adapter, params, max_tokens_ceiling=self.max_tokens_ceiling)


DEFAULT_SERVICE = LLMService()
"""A connection with the default settings: what `create_job` checks against when given none."""
