"""The job request's declaration is the one source of its fields, defaults and stored shape."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from llm_batch.request import (
    REQUEST_FIELDS,
    REQUEST_KEYS,
    Group,
    InvalidJobRequest,
    JobRequest,
    Kind,
    default_of,
    parse_job_request,
)


def test_the_checked_request_has_one_attribute_per_declared_field_in_order() -> None:
    assert tuple(f.name for f in dataclasses.fields(JobRequest)) == REQUEST_KEYS


def test_fields_left_out_take_their_declared_defaults() -> None:
    request = parse_job_request({"filter": {}})
    for field in REQUEST_FIELDS:
        if field.name != "filter":
            assert getattr(request, field.name) == field.default, field.name


def test_the_failure_alert_threshold_defaults_to_thirty_percent() -> None:
    assert parse_job_request({"filter": {}}).alert_failure_rate == 0.3


def test_a_mutable_default_is_not_shared_between_requests() -> None:
    first = parse_job_request({"filter": {}})
    first.llm_params["temperature"] = 1
    assert parse_job_request({"filter": {}}).llm_params == {}
    assert default_of("llm_params") == {}


def test_the_stored_params_keep_the_data_contracts_field_names() -> None:
    document = parse_job_request({"task_ids": ["a", "b"], "job_id": "job-1"}).to_document()
    assert set(document) == {
        "task_ids", "filter", "retry_of", "include_needs_review", "limit", "instructions",
        "model", "llm_params", "use_cache", "cache_below_review", "review_below", "max_cost_usd",
        "alert_failure_rate",
        "delivery", "resend_via",
    }  # fmt: skip
    assert document["task_ids"] == ["a", "b"]


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"retry_of": "no good"}, "retry_of 'no good' is not a job id"),
        ({"instructions": "x" * 40_000}, "instructions are 40000 characters long"),
        ({"model": "bad model!"}, "model 'bad model!' is not a model name"),
        ({"llm_params": [1]}, 'llm_params must be a JSON object, e.g. {"temperature": 0}'),
        ({"review_below": 1.5}, "review_below 1.5 is out of range: give a number from 0 to 1"),
        ({"max_cost_usd": -1}, "max_cost_usd -1 is out of range: give a number of 0 or more"),
        ({"alert_failure_rate": "high"}, "alert_failure_rate must be a number, not 'high'"),
        ({"dry_run": "yes"}, "dry_run must be true or false, not 'yes'"),
        ({"include_needs_review": 1}, "include_needs_review must be true or false, not 1"),
        ({"instructions": 7}, "instructions must be text, not int"),
    ],
)
def test_each_kind_of_field_is_refused_with_what_to_fix(conf: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidJobRequest) as info:
        parse_job_request({"filter": {}, **conf})
    assert message in str(info.value)


def test_a_refused_selection_is_not_also_reported_as_missing() -> None:
    with pytest.raises(InvalidJobRequest) as info:
        parse_job_request({"task_ids": 5})
    assert "no tasks selected" not in str(info.value)


def test_exactly_the_selecting_fields_exclude_each_other() -> None:
    assert [f.name for f in REQUEST_FIELDS if f.selects] == ["task_ids", "filter", "retry_of"]
    assert all(f.group is Group.SELECTION for f in REQUEST_FIELDS if f.selects)


def test_every_field_has_a_title_help_and_a_default_of_its_kind() -> None:
    for field in REQUEST_FIELDS:
        assert field.title and field.help, field.name
        if field.kind is Kind.BOOL:
            assert isinstance(field.default, bool), field.name
        if field.minimum is not None and field.default is not None:
            assert field.minimum <= field.default <= (field.maximum or field.default), field.name


@pytest.mark.parametrize("name", ["max_cost_usd", "review_below", "alert_failure_rate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_number_is_refused_not_taken_as_no_limit(name: str, value: float) -> None:
    with pytest.raises(InvalidJobRequest) as info:
        parse_job_request({"filter": {}, name: value})
    assert f"{name} must be a finite number, not {value!r}" in str(info.value)


@pytest.mark.parametrize(
    "conf",
    [
        {"filter": {}, "llm_params": {"temperature": float("nan")}},
        {"filter": {}, "llm_params": {"output_schema": {"maximum": float("inf")}}},
        {"filter": {"payload.score": {"$gt": float("nan")}}},
        {"filter": '{"payload.score": {"$lt": Infinity}}'},
    ],
)
def test_nan_or_infinity_inside_an_object_field_is_refused(conf: dict[str, Any]) -> None:
    with pytest.raises(InvalidJobRequest, match="NaN and infinity are refused"):
        parse_job_request(conf)


def test_a_filter_key_with_a_nul_byte_is_refused_before_reaching_the_database() -> None:
    with pytest.raises(InvalidJobRequest, match="holds a NUL character"):
        parse_job_request({"filter": {"payload.a\x00b": 1}})


@pytest.mark.parametrize("depth", [50, 5000, 100_000])
def test_a_deeply_nested_filter_is_refused_not_a_recursion_error(depth: int) -> None:
    text = '{"$and": [' * depth + "{}" + "]}" * depth
    with pytest.raises(InvalidJobRequest, match="filter nests deeper than"):
        parse_job_request({"filter": text})


def test_a_deeply_nested_filter_object_is_refused_not_a_recursion_error() -> None:
    nested: dict[str, Any] = {}
    for _ in range(5000):
        nested = {"$and": [nested]}
    with pytest.raises(InvalidJobRequest, match="filter nests deeper than"):
        parse_job_request({"filter": nested})


def test_deeply_nested_llm_params_are_refused() -> None:
    nested: dict[str, Any] = {}
    for _ in range(5000):
        nested = {"a": nested}
    with pytest.raises(InvalidJobRequest, match="llm_params nests deeper than"):
        parse_job_request({"filter": {}, "llm_params": {"output_schema": nested}})


@pytest.mark.parametrize("depth", [5000, 100_000])
def test_deeply_nested_llm_params_text_is_refused_not_a_recursion_error(depth: int) -> None:
    text = '{"a": ' * depth + "1" + "}" * depth
    with pytest.raises(InvalidJobRequest, match="llm_params nests deeper than"):
        parse_job_request({"filter": {}, "llm_params": text})


@pytest.mark.parametrize(
    "pattern", ["(a+)+$", "^(a*)*b", "(x|y+){2,}", "((ab)*c)+", "(\\w+\\s?)*$", "(.{1,3})+z"]
)
def test_a_regex_with_nested_quantifiers_is_refused(pattern: str) -> None:
    with pytest.raises(InvalidJobRequest, match="repeats a group that itself repeats"):
        parse_job_request({"filter": {"payload.text": {"$regex": pattern}}})


@pytest.mark.parametrize(
    "pattern", ["^abc", "a+b*", "(ab)+", "(a+)b", "[(a+)]+", "\\(a+\\)+", "(a{3})+", "(a|b)*c"]
)
def test_an_ordinary_regex_is_accepted(pattern: str) -> None:
    request = parse_job_request({"filter": {"payload.text": {"$regex": pattern}}})
    assert request.filter == {"payload.text": {"$regex": pattern}}
