"""Cache keys and the job's `use_cache` switch: pure, no database."""

from __future__ import annotations

from typing import Any

import pytest

from llm_batch.cache import answer_scope, question_key
from llm_batch.request import InvalidJobRequest, parse_job_request
from llm_hook import ClientSettings, LLMClient

SCOPE = {"adapter": "batch", "model": "sim-small"}


def test_the_key_ignores_dict_key_order_but_nothing_that_changes_the_question() -> None:
    question: tuple[Any, ...] = (SCOPE, "Summarise.", {"temperature": 0}, {"a": 1, "b": [1, 2]})
    key = question_key(*question)
    assert key == question_key(SCOPE, "Summarise.", {"temperature": 0}, {"b": [1, 2], "a": 1})
    changes = [
        (0, {**SCOPE, "model": "sim-large"}),
        (0, {**SCOPE, "adapter": "openai"}),
        (1, "Translate."),
        (2, {"temperature": 1}),
        (3, {"a": 1, "b": [2, 1]}),
    ]
    changed = []
    for position, value in changes:
        parts = list(question)
        parts[position] = value
        changed.append(question_key(*parts))
    assert key not in changed and len(set(changed)) == len(changed)


def test_no_instructions_and_empty_instructions_are_the_same_question() -> None:
    assert question_key(SCOPE, None, {}, "x") == question_key(SCOPE, "", {}, "x")


@pytest.mark.parametrize("value", [float("nan"), {1, 2}, object()])
def test_an_input_that_is_not_plain_json_has_no_key(value: Any) -> None:
    assert question_key(SCOPE, None, {}, value) is None


def test_the_client_names_its_adapter_and_effective_model() -> None:
    client = LLMClient(ClientSettings(base_url="http://llm.test", api_key="k" * 8, model="m1"))
    assert answer_scope(client, None) == {"adapter": "batch", "model": "m1"}
    assert answer_scope(client, "m2") == {"adapter": "batch", "model": "m2"}
    assert answer_scope(object(), "m2") is None


@pytest.mark.parametrize(("given", "expected"), [(None, True), (True, True), (False, False)])
def test_use_cache_defaults_to_on(given: bool | None, expected: bool) -> None:
    conf: dict[str, Any] = {"filter": {}}
    if given is not None:
        conf["use_cache"] = given
    request = parse_job_request(conf)
    assert request.use_cache is expected
    assert request.to_document()["use_cache"] is expected


@pytest.mark.parametrize("value", ["no", 0, "false"])
def test_use_cache_must_be_a_boolean(value: Any) -> None:
    with pytest.raises(InvalidJobRequest, match="use_cache must be true or false"):
        parse_job_request({"filter": {}, "use_cache": value})
