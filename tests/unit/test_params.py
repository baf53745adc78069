"""The trigger form is generated from the job request's declaration, field for field."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from airflow.sdk.exceptions import ParamValidationError

from llm_batch.orchestration.params import FINITE, SECTIONS, job_params
from llm_batch.request import REQUEST_FIELDS, REQUEST_KEYS, Group, Kind, RequestField

JSON_TYPES = {
    Kind.IDS: ["null", "array"], Kind.FILTER: ["null", "object", "string"],
    Kind.OBJECT: ["null", "object", "string"], Kind.TEXT: ["null", "string"],
    Kind.JOB_ID: ["null", "string"], Kind.MODEL: ["null", "string"],
    Kind.BOOL: ["boolean", "null"], Kind.INTEGER: "integer", Kind.NUMBER: "number",
    Kind.CHOICE: "string",
}  # fmt: skip


def test_the_form_has_one_param_per_declared_field_grouped_by_section() -> None:
    params = job_params()
    assert sorted(params) == sorted(REQUEST_KEYS)
    sections = [param.schema["section"] for param in params.values()]
    # Airflow shows a section where its first field is: each section's fields are together.
    assert sections == sorted(sections, key=list(SECTIONS.values()).index)
    assert sections[0] == SECTIONS[Group.SELECTION]


@pytest.mark.parametrize("field", REQUEST_FIELDS, ids=lambda field: field.name)
def test_each_params_schema_matches_its_declaration(field: RequestField) -> None:
    param = job_params()[field.name]
    schema = param.schema
    bounds = {
        key: value
        for key, value in (("minimum", field.minimum), ("maximum", field.maximum))
        if value is not None
    }
    if field.kind is Kind.NUMBER:
        # Refuses NaN (passes every bound) and infinity (above the largest finite float).
        bounds.setdefault("maximum", sys.float_info.max)
        bounds.update(FINITE)
    if field.kind is Kind.NUMBER and field.default is None:
        assert "type" not in schema  # the form shows a text box, which sends what is typed
        assert schema["anyOf"] == [
            {"type": "null"}, {"type": "number", **bounds}, {"type": "string"}
        ]  # fmt: skip
    else:
        assert schema["type"] == JSON_TYPES[field.kind]
        assert schema.get("allOf", [{}]) == [bounds or {}]
    # Bounds the form's number box would clamp to are never at the top level.
    assert "minimum" not in schema and "maximum" not in schema
    assert schema["title"] == field.title
    assert schema["section"] == SECTIONS[field.group]
    assert param.description == field.help
    assert param.value == field.default
    assert ("items" in schema) is (field.kind is Kind.IDS)
    assert (schema.get("format") == "multiline") is (field.kind is Kind.TEXT)
    assert set(schema) <= {"type", "anyOf", "allOf", "title", "section", "items", "format", "enum"}


@pytest.mark.parametrize(
    ("name", "value"),
    [("limit", 0), ("limit", 5001), ("max_cost_usd", -1), ("alert_failure_rate", 2)],
)
def test_numbers_out_of_bounds_are_refused_when_the_run_is_triggered(name: str, value: Any) -> None:
    with pytest.raises(ParamValidationError):
        job_params()[name].resolve(value)


@pytest.mark.parametrize("value", ["-1", "abc", "0.5"])
def test_an_optional_number_typed_as_text_reaches_create_job_as_typed(value: str) -> None:
    assert job_params()["max_cost_usd"].resolve(value) == value


def test_json_typed_as_text_reaches_create_job_as_typed() -> None:
    assert job_params()["filter"].resolve('{"a": 1') == '{"a": 1'
    assert job_params()["filter"].resolve({"a": 1}) == {"a": 1}


def test_every_declared_default_is_valid_on_the_form() -> None:
    for param in job_params().values():
        param.resolve(param.value)  # raises ParamValidationError when a default breaks its schema


def test_a_dag_can_change_defaults_but_not_the_schema() -> None:
    nightly = job_params(filter={"x": 1}, limit=10)
    assert nightly["filter"].value == {"x": 1} and nightly["limit"].value == 10
    assert nightly["filter"].schema == job_params()["filter"].schema
    assert nightly["limit"].schema == job_params()["limit"].schema


def test_a_default_for_an_undeclared_field_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="limt"):
        job_params(limt=10)


def test_forms_do_not_share_a_mutable_default() -> None:
    job_params()["llm_params"].value["temperature"] = 1
    assert job_params()["llm_params"].value == {}


@pytest.mark.parametrize("name", ["max_cost_usd", "review_below", "alert_failure_rate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_the_form_refuses_nan_and_infinity_in_number_fields(name: str, value: float) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    param = job_params()[name]
    with pytest.raises(ParamValidationError):
        param.resolve(value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_cost_usd", 0.0), ("max_cost_usd", 12.5), ("max_cost_usd", None),
     ("review_below", 0.0), ("review_below", 1.0), ("alert_failure_rate", 0.3)],
)  # fmt: skip
def test_the_form_still_takes_finite_numbers_and_empty_ones(name: str, value: float) -> None:
    assert job_params()[name].resolve(value) == value
