"""check_llm_params: the gate job creation puts before a job's llm_params reach any batch."""

from __future__ import annotations

import math
from typing import Any

import pytest

from llm_hook.params import MAX_LLM_PARAMS_BYTES, check_llm_params, requested_max_tokens

CEILING = 4096


def problems(params: Any, adapter: str = "openai", ceiling: int = CEILING) -> list[str]:
    return check_llm_params(adapter, params, max_tokens_ceiling=ceiling)


@pytest.mark.parametrize("adapter", ["batch", "openai"])
@pytest.mark.parametrize(
    "params",
    [
        None,
        {},
        {"temperature": 0},
        {"temperature": 1.3, "top_p": 0.9, "seed": 42, "stop": ["\n\n", "END"]},
        {"max_output_tokens": 256, "presence_penalty": -0.5, "frequency_penalty": 2},
        {"max_tokens": CEILING},
        {"stop": "###", "top_k": 40},
    ],
)
def test_usual_sampling_parameters_pass_for_both_adapters(
    adapter: str, params: dict[str, Any] | None
) -> None:
    assert problems(params, adapter) == []


def test_openai_takes_its_output_schema_and_server_extensions() -> None:
    params = {
        "output_schema": {"type": "object", "properties": {"label": {"type": "string"}}},
        "max_completion_tokens": 100,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
    }
    assert problems(params) == []


def test_the_batch_adapter_refuses_an_output_schema_it_would_not_honour() -> None:
    (problem,) = problems({"output_schema": {"type": "string"}}, "batch")
    assert "llm_params.output_schema is not a parameter the batch adapter sends" in problem


@pytest.mark.parametrize(
    "name", ["stream", "model", "messages", "tools", "n", "response_format", "tool_choice"]
)
def test_openai_refuses_the_fields_the_adapter_owns(name: str) -> None:
    (problem,) = problems({name: True})
    assert f"llm_params.{name} is set by the openai adapter itself" in problem
    assert "remove it" in problem


@pytest.mark.parametrize("name", ["service_tier", "store", "logprobs", "user", "metadata"])
def test_unknown_keys_are_refused_with_the_allowed_list(name: str) -> None:
    (problem,) = problems({name: "x"})
    assert f"llm_params.{name} is not a parameter the openai adapter sends" in problem
    assert "temperature" in problem


@pytest.mark.parametrize(
    ("params", "says"),
    [
        ({"temperature": 2.5}, "llm_params.temperature=2.5 must be from 0 to 2"),
        ({"temperature": -0.1}, "must be from 0 to 2"),
        ({"temperature": "0.2"}, "llm_params.temperature must be a number"),
        ({"temperature": True}, "llm_params.temperature must be a number"),
        ({"top_p": 1.5}, "llm_params.top_p=1.5 must be from 0 to 1"),
        ({"presence_penalty": 3}, "must be from -2 to 2"),
        ({"frequency_penalty": -2.01}, "must be from -2 to 2"),
        ({"seed": 1.5}, "llm_params.seed must be a whole number"),
        ({"seed": 2**70}, "llm_params.seed="),
        ({"top_k": -2}, "llm_params.top_k=-2 must be from -1"),
        ({"stop": []}, "llm_params.stop must be a string or a list of 1 to 4"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "a list of 1 to 4"),
        ({"stop": ["ok", 3]}, "a list of 1 to 4"),
        ({"stop": ""}, "non-empty strings"),
        ({"stop": "x" * 300}, "at most 256 characters"),
        ({"output_schema": "string"}, "llm_params.output_schema must be a JSON schema object"),
        ({"max_tokens": 0}, "llm_params.max_tokens must be a whole number >= 1"),
        ({"max_tokens": 256.0}, "llm_params.max_tokens must be a whole number"),
        ({"max_tokens": True}, "llm_params.max_tokens must be a whole number"),
    ],
)
def test_types_and_ranges_are_checked(params: dict[str, Any], says: str) -> None:
    (problem,) = problems(params)
    assert says in problem


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens", "max_output_tokens"])
def test_output_token_bounds_above_the_connection_ceiling_are_refused(name: str) -> None:
    (problem,) = problems({name: 1_000_000_000}, ceiling=2000)
    assert f"llm_params.{name}=1000000000 is above the connection's ceiling of 2000" in problem
    assert "max_tokens_ceiling" in problem
    assert problems({name: 2000}, ceiling=2000) == []


def test_two_output_token_bounds_are_refused() -> None:
    (problem,) = problems({"max_output_tokens": 10, "max_tokens": 20})
    assert "give only one output-token bound" in problem


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(value: float) -> None:
    found = problems({"temperature": value})
    assert any("no NaN or infinity" in problem for problem in found)
    assert any("llm_params.temperature" in problem for problem in found)


def test_nan_hidden_inside_an_output_schema_is_refused() -> None:
    found = problems({"output_schema": {"type": "number", "maximum": math.nan}})
    assert any("no NaN or infinity" in problem for problem in found)


def test_params_larger_than_the_size_cap_are_refused() -> None:
    schema = {"type": "object", "description": "d" * MAX_LLM_PARAMS_BYTES}
    (problem,) = problems({"output_schema": schema})
    assert f"more than the {MAX_LLM_PARAMS_BYTES} allowed" in problem


@pytest.mark.parametrize("params", [[1, 2], "temperature=0", 3])
def test_params_that_are_not_an_object_are_refused(params: Any) -> None:
    assert problems(params) == ['llm_params must be a JSON object, e.g. {"temperature": 0}']


def test_an_unknown_adapter_is_a_problem_not_a_crash() -> None:
    (problem,) = problems({}, "grpc")
    assert "Unknown adapter 'grpc'" in problem


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"stream": True, "service_tier": "flex", "temperature": 9, "max_tokens": 1e9})
    assert len(found) == 4


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (None, None),
        ({}, None),
        ({"temperature": 0}, None),
        ({"max_output_tokens": 256}, 256),
        ({"max_completion_tokens": 64}, 64),
        ({"max_tokens": 0}, None),
        ({"max_tokens": True}, None),
    ],
)
def test_requested_max_tokens_is_the_output_bound_asked_for(
    params: dict[str, Any] | None, expected: int | None
) -> None:
    assert requested_max_tokens(params) == expected
