"""The OpenAI-compatible adapter: request bodies the official library accepts, strict parsing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, get_type_hints

import pytest
from openai.types.chat import (
    ChatCompletionSystemMessageParam,
    ChatCompletionUserMessageParam,
    completion_create_params,
)
from openai.types.shared_params import ResponseFormatJSONSchema
from openai.types.shared_params.response_format_json_schema import JSONSchema
from pydantic import TypeAdapter

from llm_hook import LLMTask, OutcomeStatus, Usage
from llm_hook.adapters import (
    DEFAULT_OUTPUT_SCHEMA,
    OPENAI_PREAMBLE,
    OpenAIAdapter,
    make_adapter,
    system_prompt,
)
from llm_hook.exceptions import LLMResponseError
from tests.unit.test_llm_client import SETTINGS, Harness, Reply, Sent, by_id, make_tasks

ADAPTER = OpenAIAdapter()
IDS = ["a", "b", "c"]


def tasks(*ids: str) -> list[LLMTask]:
    return [
        LLMTask(task_id, {"text": f"input of {task_id}", "n": i}) for i, task_id in enumerate(ids)
    ]


def assert_valid_openai_request(body: Mapping[str, Any]) -> None:
    """Validate a body against the installed `openai` library's request types, strictly.

    Pydantic validates a TypedDict leniently (unknown keys are ignored, iterables are
    checked lazily), so unknown keys are refused here and every iterable is consumed.
    """
    params_type = completion_create_params.CompletionCreateParamsNonStreaming
    known = set(get_type_hints(params_type))
    assert set(body) <= known, f"keys unknown to openai: {set(body) - known}"
    validated: Any = TypeAdapter(params_type).validate_python(body)
    assert list(validated["messages"])  # forces validation of each message
    message_types = {
        "system": ChatCompletionSystemMessageParam,
        "user": ChatCompletionUserMessageParam,
    }
    for message in body["messages"]:
        kind = message_types[message["role"]]
        assert set(message) <= set(get_type_hints(kind))
        TypeAdapter(kind).validate_python(message)
    response_format = body["response_format"]
    assert set(response_format) <= set(get_type_hints(ResponseFormatJSONSchema))
    TypeAdapter(ResponseFormatJSONSchema).validate_python(response_format)
    assert set(response_format["json_schema"]) <= set(get_type_hints(JSONSchema))
    # OpenAI's documented limit on the name: letters, digits, '_' and '-', at most 64.
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", response_format["json_schema"]["name"])


def completion(
    content: Any,
    *,
    finish_reason: str = "stop",
    refusal: str | None = None,
    usage: Any = None,
    model: str = "gpt-test",
) -> dict[str, Any]:
    text = content if isinstance(content, str) or content is None else json.dumps(content)
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": refusal},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage if usage is not None else {"prompt_tokens": 120, "completion_tokens": 30},
    }


def result(task_id: str, **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "output": f"out-{task_id}", "confidence": 0.8, **extra}


# --- requests ------------------------------------------------------------------------


def test_the_adapter_is_registered_by_name() -> None:
    assert isinstance(make_adapter("openai"), OpenAIAdapter)


def test_request_carries_instructions_tasks_and_a_strict_schema_of_the_sent_ids() -> None:
    path, body = ADAPTER.build_request(tasks(*IDS), "gpt-test", "Summarise.", {"temperature": 0})

    assert path == "/v1/chat/completions"
    assert body["model"] == "gpt-test"
    system, user = body["messages"]
    assert system == {"role": "system", "content": system_prompt("Summarise.")}
    assert system["content"].startswith(OPENAI_PREAMBLE)
    assert system["content"].endswith("Instructions:\nSummarise.")
    assert user["role"] == "user"
    assert json.loads(user["content"]) == {
        "tasks": [{"id": t.id, "input": t.input} for t in tasks(*IDS)]
    }
    response_format = body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["strict"] is True
    schema = response_format["json_schema"]["schema"]
    assert schema["required"] == ["results"] and schema["additionalProperties"] is False
    answered, refused = schema["properties"]["results"]["items"]["anyOf"]
    assert answered["properties"]["id"] == {"type": "string", "enum": IDS}
    assert refused["properties"]["id"] == {"type": "string", "enum": IDS}
    assert answered["properties"]["output"] == DEFAULT_OUTPUT_SCHEMA
    assert set(answered["required"]) == {"id", "output", "confidence"}
    assert body["temperature"] == 0


def test_strict_schema_follows_openais_rules_for_every_object() -> None:
    """Strict mode: every object lists all its properties as required and allows no others."""
    _, body = ADAPTER.build_request(tasks(*IDS), "m", None, None)

    def objects(node: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        if isinstance(node, dict):
            if node.get("type") == "object":
                found.append(node)
            for child in node.values():
                found += objects(child)
        elif isinstance(node, list):
            for child in node:
                found += objects(child)
        return found

    schema_objects = objects(body["response_format"]["json_schema"]["schema"])
    assert len(schema_objects) == 4
    for node in schema_objects:
        assert node["additionalProperties"] is False
        assert set(node["required"]) == set(node["properties"])


@pytest.mark.parametrize(
    "params",
    [
        None,
        {"temperature": 0.2, "max_tokens": 800, "top_p": 0.9, "seed": 7},
        {"max_completion_tokens": 500, "stop": ["\n\n"], "presence_penalty": 0.1},
        {"output_schema": {"type": "object", "properties": {"label": {"type": "string"}},
                           "required": ["label"], "additionalProperties": False}},
    ],
    ids=["no-params", "sampling", "completion-tokens", "output-schema"],
)  # fmt: skip
def test_request_bodies_validate_against_the_official_openai_types(
    params: dict[str, Any] | None,
) -> None:
    _, body = ADAPTER.build_request(tasks(*IDS), "gpt-4o-mini", "Label it.", params)
    assert_valid_openai_request(body)


def test_batch_param_names_are_translated_and_output_schema_is_used_not_sent() -> None:
    schema = {"type": "integer"}
    _, body = ADAPTER.build_request(
        tasks("a"), "m", None, {"max_output_tokens": 64, "output_schema": schema}
    )
    assert body["max_tokens"] == 64
    assert "max_output_tokens" not in body and "output_schema" not in body
    items = body["response_format"]["json_schema"]["schema"]["properties"]["results"]["items"]
    assert items["anyOf"][0]["properties"]["output"] == schema


@pytest.mark.parametrize("param", ["stream", "messages", "response_format", "n", "model"])
def test_params_that_would_break_the_json_contract_are_refused(param: str) -> None:
    with pytest.raises(ValueError, match=f"{param}.*remove them from the job's llm_params"):
        ADAPTER.build_request(tasks("a"), "m", None, {param: 1})


def test_the_same_tasks_give_byte_identical_bodies_whatever_the_key_order() -> None:
    one = [LLMTask("a", {"x": 1, "y": 2})]
    two = [LLMTask("a", {"y": 2, "x": 1})]
    assert ADAPTER.build_request(one, "m", "i", None) == ADAPTER.build_request(two, "m", "i", None)


def test_without_instructions_the_system_message_is_the_preamble() -> None:
    _, body = ADAPTER.build_request(tasks("a"), "m", None, None)
    assert body["messages"][0]["content"] == OPENAI_PREAMBLE


# --- responses -----------------------------------------------------------------------


def test_content_json_maps_each_result_to_its_task_with_usage_from_the_completion() -> None:
    body = completion({"results": [result("c"), result("a"), result("b")]})
    parsed = ADAPTER.parse_response(body, IDS)
    assert parsed.usage == Usage(120, 30)
    assert parsed.model == "gpt-test"
    assert parsed.whole_request is None
    for task_id in IDS:
        item = parsed.items[task_id]
        assert item.status is OutcomeStatus.SUCCEEDED
        assert item.output == f"out-{task_id}"
        assert item.confidence == 0.8


@pytest.mark.parametrize(
    ("results", "faulty", "error_type"),
    [
        ([result("a"), result("b")], "c", "missing_id"),
        ([result("a"), result("b"), result("c"), result("c")], "c", "duplicate_id"),
        ([result("a"), result("b"), {"id": "c"}], "c", "malformed_item"),
        ([result("a"), result("b"), result("c", error={"type": "x"})], "c", "malformed_item"),
    ],
    ids=["missing", "duplicated", "neither-output-nor-error", "both-output-and-error"],
)
def test_faulty_items_are_retryable_and_never_attached(
    results: list[Any], faulty: str, error_type: str
) -> None:
    parsed = ADAPTER.parse_response(completion({"results": results}), IDS)
    assert parsed.items[faulty].status is OutcomeStatus.RETRYABLE
    assert parsed.items[faulty].error_type == error_type
    assert parsed.items[faulty].output is None
    for task_id in set(IDS) - {faulty}:
        assert parsed.items[task_id].status is OutcomeStatus.SUCCEEDED


def test_an_unknown_id_is_reported_and_ignored() -> None:
    body = completion({"results": [result("a"), result("b"), result("c"), result("zzz")]})
    parsed = ADAPTER.parse_response(body, IDS)
    assert parsed.unknown_ids == ("zzz",)
    assert all(item.status is OutcomeStatus.SUCCEEDED for item in parsed.items.values())


def test_an_invalid_input_error_item_fails_only_that_task() -> None:
    bad = {"id": "b", "error": {"type": "invalid_input", "message": "not a ticket"}}
    parsed = ADAPTER.parse_response(completion({"results": [result("a"), bad, result("c")]}), IDS)
    assert parsed.items["b"].status is OutcomeStatus.FAILED
    assert parsed.items["b"].error_type == "invalid_input"
    assert parsed.items["b"].error_message == "not a ticket"


def test_content_filter_fails_the_whole_request_as_content_filtered() -> None:
    parsed = ADAPTER.parse_response(completion(None, finish_reason="content_filter"), IDS)
    assert parsed.whole_request == "content_filtered"
    assert {item.status for item in parsed.items.values()} == {OutcomeStatus.FAILED}
    assert {item.error_type for item in parsed.items.values()} == {"content_filtered"}
    assert parsed.usage == Usage(120, 30)


def test_a_refusal_fails_the_whole_request_as_refused() -> None:
    parsed = ADAPTER.parse_response(completion(None, refusal="I can't help with that."), IDS)
    assert parsed.whole_request == "refused"
    assert {item.error_type for item in parsed.items.values()} == {"refused"}
    assert "I can't help with that." in (parsed.items["a"].error_message or "")


def test_output_cut_by_max_tokens_fails_the_whole_request() -> None:
    cut = json.dumps({"results": [result("a"), result("b")]})[:40]
    parsed = ADAPTER.parse_response(completion(cut, finish_reason="length"), IDS)
    assert parsed.whole_request == "output_truncated"
    assert {item.status for item in parsed.items.values()} == {OutcomeStatus.FAILED}
    assert {item.error_type for item in parsed.items.values()} == {"output_truncated"}


def test_complete_json_despite_length_is_used() -> None:
    body = completion({"results": [result("a"), result("b"), result("c")]}, finish_reason="length")
    parsed = ADAPTER.parse_response(body, IDS)
    assert parsed.whole_request is None
    assert all(item.status is OutcomeStatus.SUCCEEDED for item in parsed.items.values())


def test_a_markdown_fence_around_the_json_is_tolerated() -> None:
    fenced = "```json\n" + json.dumps({"results": [result(i) for i in IDS]}) + "\n```"
    parsed = ADAPTER.parse_response(completion(fenced), IDS)
    assert all(item.status is OutcomeStatus.SUCCEEDED for item in parsed.items.values())


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"choices": []},
        {"choices": [{"finish_reason": "stop"}]},
        completion("this is not JSON"),
        completion(""),
        completion([1, 2, 3]),
        completion({"answers": []}),
    ],
    ids=["not-object", "no-choices", "no-message", "prose", "empty", "array", "no-results"],
)
def test_unusable_bodies_raise_for_a_transport_retry(body: Any) -> None:
    with pytest.raises(LLMResponseError):
        ADAPTER.parse_response(body, IDS)


def test_missing_or_odd_usage_counts_as_zero() -> None:
    body = completion({"results": [result(i) for i in IDS]}, usage={"prompt_tokens": "many"})
    assert ADAPTER.parse_response(body, IDS).usage == Usage(0, 0)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda body: body.update(stream_mode=True),
        lambda body: body["messages"].append({"role": "robot", "content": "x"}),
        lambda body: body["response_format"].update(type="json_schemas"),
        lambda body: body["response_format"]["json_schema"].update(name="task results!"),
        lambda body: body.update(temperature="hot"),
    ],
    ids=["unknown-key", "unknown-role", "bad-format-type", "bad-schema-name", "bad-temperature"],
)
def test_the_validation_itself_catches_bodies_openai_would_refuse(breakage: Any) -> None:
    _, body = ADAPTER.build_request(tasks(*IDS), "m", "i", {"temperature": 0})
    breakage(body)
    with pytest.raises((AssertionError, ValueError, KeyError)):
        assert_valid_openai_request(body)


# --- through the client --------------------------------------------------------------


def sent_ids(sent: Sent) -> list[str]:
    return [task["id"] for task in json.loads(sent.body["messages"][1]["content"])["tasks"]]


def filtering(bad: str) -> Callable[[Sent], Reply]:
    """A service whose content filter blocks any answer that would include task `bad`."""

    def answer(sent: Sent) -> Reply:
        ids = sent_ids(sent)
        if bad in ids:
            return Reply(200, completion(None, finish_reason="content_filter"))
        return Reply(200, completion({"results": [result(i) for i in ids]}))

    return answer


def test_a_filtered_batch_is_split_until_only_the_offending_task_fails() -> None:
    h = Harness(filtering("c"), repeat_last=True, settings=replace(SETTINGS, adapter="openai"))
    outcomes = by_id(h.complete(make_tasks("a", "b", "c", "d"), idempotency_key="job:1"))

    assert outcomes["c"].status is OutcomeStatus.FAILED
    assert outcomes["c"].error_type == "content_filtered"
    for task_id in "abd":
        assert outcomes[task_id].status is OutcomeStatus.SUCCEEDED
        assert outcomes[task_id].output == f"out-{task_id}"
    assert [sent_ids(s) for s in h.sent] == [
        ["a", "b", "c", "d"],
        ["a", "b"],
        ["c", "d"],
        ["c"],
        ["d"],
    ]
    # Each half is a request of its own: its own idempotency key.
    assert len({s.key for s in h.sent}) == len(h.sent)


def test_a_truncated_answer_is_split_and_a_single_task_retried_next_round() -> None:
    def answer(sent: Sent) -> Reply:
        ids = sent_ids(sent)
        if len(ids) > 1:
            return Reply(200, completion('{"results": [', finish_reason="length"))
        return Reply(200, completion({"results": [result(ids[0])]}))

    h = Harness(answer, repeat_last=True, settings=replace(SETTINGS, adapter="openai"))
    outcomes = h.complete(make_tasks("a", "b"))
    assert [o.status for o in outcomes] == [OutcomeStatus.SUCCEEDED] * 2
    assert [sent_ids(s) for s in h.sent] == [["a", "b"], ["a"], ["b"]]


def test_a_single_task_cut_by_max_tokens_fails_without_being_sent_again() -> None:
    """Each resend would be a new round, so a new key: billed at max_tokens every time."""
    cut = Reply(200, completion('{"results": [{"id": "a", "out', finish_reason="length"))
    h = Harness(cut, repeat_last=True, settings=replace(SETTINGS, adapter="openai"))
    (outcome,) = h.complete(make_tasks("a"), idempotency_key="job-1:b-1")
    assert outcome.status is OutcomeStatus.FAILED
    assert outcome.error_type == "output_truncated"
    assert outcome.error_message is not None and "raise max_tokens" in outcome.error_message
    assert len(h.sent) == 1


def test_usage_of_a_chat_completion_is_billed_per_call() -> None:
    reply = Reply(
        200,
        completion(
            {"results": [result("a")]}, usage={"prompt_tokens": 1000, "completion_tokens": 100}
        ),
    )
    h = Harness(reply, settings=replace(SETTINGS, adapter="openai"))
    h.complete(make_tasks("a"))
    (record,) = h.records
    assert record.usage == Usage(1000, 100)
    assert record.cost_usd == pytest.approx(1000 * 2.0 / 1000 + 100 * 10.0 / 1000)
    assert record.endpoint == "http://llm.test/v1/chat/completions"
