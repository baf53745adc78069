"""A local LLM service for the demo stack and the tests: the batch protocol and OpenAI chat.

Run it with `python -m llm_batch.simulator --port 8765`; see docs/simulator.md.
"""

from __future__ import annotations

from llm_batch.simulator.config import ITEM_FAULTS, REQUEST_FAULTS, SimulatorConfig
from llm_batch.simulator.outputs import (
    TokenCounts,
    canonical_json,
    count_tokens,
    estimate_tokens,
    expected_confidence,
    expected_output,
    input_tokens,
    simulated_error,
    task_result,
)
from llm_batch.simulator.server import SimulatorServer, make_server, serve

__all__ = [
    "ITEM_FAULTS",
    "REQUEST_FAULTS",
    "SimulatorConfig",
    "SimulatorServer",
    "TokenCounts",
    "canonical_json",
    "count_tokens",
    "estimate_tokens",
    "expected_confidence",
    "expected_output",
    "input_tokens",
    "make_server",
    "serve",
    "simulated_error",
    "task_result",
]
