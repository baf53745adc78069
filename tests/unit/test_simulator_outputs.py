"""The simulator's outputs, token counts and settings: pure functions, no server."""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import pytest

from llm_batch_dev.simulator import (
    SimulatorConfig,
    canonical_json,
    count_tokens,
    estimate_tokens,
    expected_confidence,
    expected_output,
    input_tokens,
    simulated_error,
    task_result,
)

INPUTS: list[Any] = [
    "plain text input",
    {"title": "Ünïcödé", "body": "x" * 500, "n": [1, 2, 3]},
    [1, "two", None],
    42,
    3.5,
    True,
    None,
    "",
]


def test_canonical_json_sorts_keys_drops_spaces_and_keeps_unicode() -> None:
    assert (
        canonical_json({"b": 1, "a": [1, {"d": 2, "c": "é"}]}) == '{"a":[1,{"c":"é","d":2}],"b":1}'
    )


@pytest.mark.parametrize("task_input", INPUTS)
def test_expected_output_is_deterministic_and_carries_the_input_digest(task_input: Any) -> None:
    output = expected_output(task_input, instructions="summarize", model="sim-small")
    assert output == expected_output(task_input, instructions="summarize", model="sim-small")
    digest = hashlib.sha256(canonical_json(task_input).encode()).hexdigest()[:16]
    assert output["digest"] == digest
    assert output["model"] == "sim-small"
    assert output["instructions_digest"] == hashlib.sha256(b"summarize").hexdigest()[:16]
    assert isinstance(output["summary"], str) and 0 < len(output["summary"]) <= 80
    json.dumps(output)  # JSON-ready


def test_expected_output_ignores_key_order_but_not_content() -> None:
    assert expected_output({"a": 1, "b": 2}, model="m") == expected_output(
        {"b": 2, "a": 1}, model="m"
    )
    assert expected_output({"a": 1}, model="m") != expected_output({"a": 2}, model="m")
    assert expected_output("1", model="m") != expected_output(1, model="m")


def test_expected_output_reflects_instructions_and_model() -> None:
    base = expected_output("text", instructions="", model="sim-small")
    assert expected_output("text", instructions="other", model="sim-small") != base
    assert expected_output("text", instructions="", model="sim-large") != base


def test_summary_describes_the_shape_of_the_input() -> None:
    assert (
        expected_output("one two three", model="m")["summary"] == "text of 3 words: one two three"
    )
    assert expected_output({"b": 1, "a": 2}, model="m")["summary"] == "object with 2 keys: a, b"
    assert expected_output([1, 2], model="m")["summary"] == "list of 2 items"
    assert expected_output(None, model="m")["summary"] == "null"
    long_summary = expected_output(" ".join(["word" * 10] * 9), model="m")["summary"]
    assert len(long_summary) == 80 and long_summary.endswith("...")


@pytest.mark.parametrize("task_input", INPUTS)
def test_confidence_is_deterministic_and_in_range(task_input: Any) -> None:
    confidence = expected_confidence(task_input)
    assert 0.5 <= confidence < 1.0
    assert confidence == expected_confidence(task_input)


def test_confidence_varies_between_inputs() -> None:
    assert len({expected_confidence(f"input {n}") for n in range(50)}) > 40


def test_token_counts_follow_the_documented_formula() -> None:
    task_input = {"text": "héllo"}
    instructions = "Summarize."
    assert count_tokens("") == 0
    assert count_tokens("abcde") == 2
    expected_in = math.ceil(len(canonical_json(task_input) + instructions) / 4) + 8
    assert input_tokens(task_input, instructions) == expected_in
    output = expected_output(task_input, instructions=instructions, model="sim-small")
    counts = estimate_tokens(task_input, instructions=instructions, model="sim-small")
    assert counts.input_tokens == expected_in
    assert counts.output_tokens == math.ceil(len(canonical_json(output)) / 4)
    assert counts.as_dict() == {"input_tokens": expected_in, "output_tokens": counts.output_tokens}


def test_task_result_of_a_normal_input_has_output_confidence_and_usage() -> None:
    result = task_result("some text", instructions="i", model="sim-large")
    assert result["output"] == expected_output("some text", instructions="i", model="sim-large")
    assert result["confidence"] == expected_confidence("some text")
    assert (
        result["usage"]
        == estimate_tokens("some text", instructions="i", model="sim-large").as_dict()
    )
    assert "error" not in result


@pytest.mark.parametrize("error_type", ["invalid_input", "content_filtered"])
def test_input_asking_for_an_item_error_gets_it_and_bills_input_only(error_type: str) -> None:
    task_input = {"simulate": error_type, "text": "x"}
    assert simulated_error(task_input) == error_type
    result = task_result(task_input, instructions="", model="sim-small")
    assert "output" not in result
    assert result["error"]["type"] == error_type
    assert result["error"]["message"]
    assert result["usage"] == {"input_tokens": input_tokens(task_input, ""), "output_tokens": 0}


@pytest.mark.parametrize("task_input", [{"simulate": "explode"}, {"simulate": 1}, "simulate", None])
def test_other_inputs_do_not_simulate_errors(task_input: Any) -> None:
    assert simulated_error(task_input) is None


def test_config_defaults_are_the_documented_ones() -> None:
    config = SimulatorConfig()
    assert config.models == ("sim-small", "sim-large")
    assert config.max_tasks_per_request == 10
    assert config.latency_ms == 50
    assert config.max_concurrency == 0 and config.rpm_limit == 0
    assert config.seed is None
    assert config.to_dict()["models"] == ["sim-small", "sim-large"]
    json.dumps(config.to_dict())


def test_config_from_json_applies_settings_and_lists_become_tuples() -> None:
    config = SimulatorConfig.from_json('{"latency_ms": 5, "models": ["m1"], "seed": 7}')
    assert config.latency_ms == 5
    assert config.models == ("m1",)
    assert config.seed == 7
    assert SimulatorConfig.from_json("") == SimulatorConfig()


def test_config_with_changes_is_a_partial_update() -> None:
    config = SimulatorConfig(latency_ms=10).with_changes({"reset_rate": 0.5})
    assert config.latency_ms == 10 and config.reset_rate == 0.5


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"no_such_setting": 1}, "unknown setting(s) no_such_setting"),
        ({"reset_rate": 1.5}, "reset_rate must be a probability from 0 to 1"),
        ({"drop_id_rate": -0.1}, "drop_id_rate must be a probability"),
        ({"error_5xx_rate": "0.5"}, "error_5xx_rate must be a probability"),
        ({"latency_ms": -1}, "latency_ms must be a number of milliseconds"),
        ({"slow_ms": float("nan")}, "slow_ms must be a number of milliseconds"),
        ({"max_concurrency": 2.5}, "max_concurrency must be an integer >= 0"),
        ({"max_tasks_per_request": 0}, "max_tasks_per_request must be an integer >= 1"),
        ({"rpm_limit": True}, "rpm_limit must be an integer"),
        ({"models": []}, "models must be a non-empty list"),
        ({"models": ["ok", ""]}, "models must be a non-empty list"),
        ({"seed": "abc"}, "seed must be an integer or null"),
    ],
)
def test_config_rejects_bad_settings_with_a_message(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SimulatorConfig.from_mapping(settings)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json"])
def test_config_from_json_rejects_non_objects(text: str) -> None:
    with pytest.raises(ValueError, match="settings"):
        SimulatorConfig.from_json(text)
