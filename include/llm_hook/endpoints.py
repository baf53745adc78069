"""One client's view of its endpoints: which it may use now, and a weighted choice among them.

The shared truth lives in the rate limiter's store; this view adds what only this client
knows (the backoff after its own failed attempt) and remembers what the store said, so
a cooling endpoint is skipped without asking again. Times here are the client's
monotonic clock.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llm_hook.pacing import EndpointState
from llm_hook.settings import EndpointSettings

log = logging.getLogger(__name__)


@dataclass
class _View:
    state: EndpointState = EndpointState.ACTIVE
    until: float = 0.0
    """Not chosen before this time (its cooldown, or this client's backoff after a failure)."""


class EndpointRouter:
    """Choose an endpoint per attempt: weighted among the usable, else the first to recover."""

    def __init__(
        self,
        endpoints: Sequence[EndpointSettings],
        *,
        rng: random.Random,
        clock: Callable[[], float],
    ) -> None:
        if not endpoints:
            raise ValueError("an EndpointRouter needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self._rng = rng
        self._clock = clock
        self._views = {endpoint.id: _View() for endpoint in self.endpoints}

    def usable(self) -> list[EndpointSettings]:
        """Return the endpoints not resting now, in configuration order."""
        now = self._clock()
        return [e for e in self.endpoints if self._views[e.id].until <= now]

    def choose(self) -> EndpointSettings | None:
        """Pick a usable endpoint with probability proportional to its weight; None if none."""
        candidates = self.usable()
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        return self._rng.choices(candidates, weights=[e.weight for e in candidates])[0]

    def first_to_recover(self) -> tuple[EndpointSettings, float]:
        """Return the endpoint whose rest ends first and the seconds until then."""
        now = self._clock()
        endpoint = min(self.endpoints, key=lambda e: self._views[e.id].until)
        return endpoint, max(0.0, self._views[endpoint.id].until - now)

    def rest(
        self, endpoint: EndpointSettings, state: EndpointState, seconds: float, reason: str
    ) -> None:
        """Leave an endpoint alone for `seconds`; log when its state changes."""
        view = self._views[endpoint.id]
        if state is not view.state:
            log.warning(
                "LLM endpoint %s: %s -> %s for %.2fs (%s)",
                endpoint.id,
                view.state.value,
                state.value,
                seconds,
                reason,
            )
        view.state = state
        view.until = max(view.until, self._clock() + max(0.0, seconds))

    def restore(self, endpoint: EndpointSettings) -> None:
        """Mark an endpoint that answered as active and usable at once."""
        view = self._views[endpoint.id]
        if view.state is not EndpointState.ACTIVE:
            log.info("LLM endpoint %s: %s -> active", endpoint.id, view.state.value)
        view.state = EndpointState.ACTIVE
        view.until = 0.0

    def state(self, endpoint_id: str) -> EndpointState:
        """Return the state this client last saw for an endpoint."""
        return self._views[endpoint_id].state
