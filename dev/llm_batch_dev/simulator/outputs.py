"""What the simulated model answers: pure, deterministic functions of a task's input.

An output depends on the input, the instructions and the model, never on the task id, so a
test can recompute it and prove that a stored output belongs to the task it is stored under.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

SIMULATE_KEY = "simulate"
"""An input object with `"simulate": "<item error type>"` gets that permanent item error."""
SIMULATED_ERRORS = {
    "invalid_input": 'The input was rejected as invalid (simulated by "simulate": '
    '"invalid_input"); fix the task\'s payload before sending it again.',
    "content_filtered": "The input was blocked by the content filter (simulated by "
    '"simulate": "content_filtered"); this task will not succeed as it is.',
}
PROMPT_OVERHEAD_TOKENS = 8
"""Tokens billed per task on top of its text, as real services bill message framing."""
SUMMARY_MAX_CHARS = 80


@dataclass(frozen=True)
class TokenCounts:
    """Tokens one task is billed for."""

    input_tokens: int
    output_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


def canonical_json(value: Any) -> str:
    """Serialize `value` the one way the simulator hashes and counts it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def input_digest(task_input: Any) -> str:
    """Return the 16-hex-digit fingerprint of an input that its output carries."""
    return sha256_hex(canonical_json(task_input))[:16]


def count_tokens(text: str) -> int:
    """Count tokens the simulator's way: one per 4 characters, rounded up."""
    return math.ceil(len(text) / 4)


def expected_output(task_input: Any, *, instructions: str = "", model: str) -> dict[str, Any]:
    """Return the output the simulator gives for `task_input` under `instructions` and `model`."""
    return {
        "digest": input_digest(task_input),
        "model": model,
        "instructions_digest": sha256_hex(instructions)[:16],
        "summary": summarize(task_input),
    }


def expected_confidence(task_input: Any) -> float:
    """Return the confidence, in [0.5, 1.0), that the simulator gives for `task_input`."""
    fraction = int(sha256_hex(canonical_json(task_input))[16:24], 16) / 16**8
    return math.floor((0.5 + fraction / 2) * 10_000) / 10_000


def estimate_tokens(task_input: Any, *, instructions: str = "", model: str) -> TokenCounts:
    """Return the tokens the simulator bills for one successful task."""
    output = expected_output(task_input, instructions=instructions, model=model)
    return TokenCounts(input_tokens(task_input, instructions), count_tokens(canonical_json(output)))


def input_tokens(task_input: Any, instructions: str = "") -> int:
    """Return the input tokens billed for one task, whether it succeeds or gets an item error."""
    return count_tokens(canonical_json(task_input) + instructions) + PROMPT_OVERHEAD_TOKENS


def simulated_error(task_input: Any) -> str | None:
    """Return the permanent item error type the input asks for, if any."""
    if isinstance(task_input, dict):
        wanted = task_input.get(SIMULATE_KEY)
        if isinstance(wanted, str) and wanted in SIMULATED_ERRORS:
            return wanted
    return None


def task_result(task_input: Any, *, instructions: str, model: str) -> dict[str, Any]:
    """Return one result item without its id: `output`, `confidence` and `usage`, or `error`."""
    error_type = simulated_error(task_input)
    if error_type is not None:
        return {
            "error": {"type": error_type, "message": SIMULATED_ERRORS[error_type]},
            "usage": TokenCounts(input_tokens(task_input, instructions), 0).as_dict(),
        }
    output = expected_output(task_input, instructions=instructions, model=model)
    usage = TokenCounts(
        input_tokens(task_input, instructions), count_tokens(canonical_json(output))
    )
    return {
        "output": output,
        "confidence": expected_confidence(task_input),
        "usage": usage.as_dict(),
    }


def summarize(value: Any) -> str:
    """Describe `value` in one short line."""
    if isinstance(value, str):
        words = value.split()
        text = f"text of {len(words)} words: {' '.join(words[:8])}"
    elif isinstance(value, dict):
        keys = ", ".join(sorted(str(key) for key in value)[:6])
        text = f"object with {len(value)} keys: {keys}"
    elif isinstance(value, list):
        text = f"list of {len(value)} items"
    elif value is None:
        text = "null"
    elif isinstance(value, bool):
        text = f"boolean {canonical_json(value)}"
    else:
        text = f"number {canonical_json(value)}"
    return text if len(text) <= SUMMARY_MAX_CHARS else text[: SUMMARY_MAX_CHARS - 3] + "..."
