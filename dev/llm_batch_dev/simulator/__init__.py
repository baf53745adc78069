"""A local LLM service for the demo stack and the tests: the batch protocol and OpenAI chat.

Run it with `python -m llm_batch_dev.simulator --port 8765`; see docs/simulator.md.
"""

from __future__ import annotations

from llm_batch_dev.simulator.config import ITEM_FAULTS, REQUEST_FAULTS, SimulatorConfig
from llm_batch_dev.simulator.http import SimulatorServer, make_server, serve
from llm_batch_dev.simulator.outputs import (
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
