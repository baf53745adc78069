"""Operator input is refused with a message that says what to fix, before any I/O."""

from __future__ import annotations

from typing import Any

import pytest

from llm_batch.config import MAX_TASKS_PER_JOB
from llm_batch.request import InvalidJobRequest, parse_job_request


def refusal(conf: dict[str, Any]) -> str:
    with pytest.raises(InvalidJobRequest) as info:
        parse_job_request(conf)
    return str(info.value)


@pytest.mark.parametrize("limit", [0, -1, MAX_TASKS_PER_JOB + 1])
def test_limit_out_of_range_is_refused_with_the_range(limit: int) -> None:
    message = refusal({"filter": {}, "limit": limit})
    assert f"limit {limit} is out of range" in message
    assert f"1 to {MAX_TASKS_PER_JOB}" in message


@pytest.mark.parametrize("limit", [True, 2.5, "many", None])
def test_limit_that_is_not_a_whole_number_is_refused(limit: Any) -> None:
    assert "limit must be a whole number" in refusal({"filter": {}, "limit": limit})


def test_limit_bounds_are_accepted() -> None:
    assert parse_job_request({"filter": {}, "limit": 1}).limit == 1
    assert parse_job_request({"filter": {}, "limit": MAX_TASKS_PER_JOB}).limit == MAX_TASKS_PER_JOB


def test_limit_given_as_digits_is_accepted() -> None:
    assert parse_job_request({"filter": {}, "limit": "25"}).limit == 25


@pytest.mark.parametrize(
    "operator", ["$where", "$function", "$accumulator", "$expr", "$lookup", "$merge"]
)
def test_filter_operators_that_run_code_are_refused(operator: str) -> None:
    message = refusal({"filter": {"payload": {operator: "sleep(1000)"}}})
    assert f"filter operator {operator} is not allowed" in message


def test_code_operators_are_found_at_any_depth() -> None:
    query = {"$or": [{"a": 1}, {"$and": [{"b": {"$elemMatch": {"$where": "1"}}}]}]}
    assert "$where is not allowed" in refusal({"filter": query})


def test_plain_query_operators_are_accepted() -> None:
    query = {
        "$or": [{"payload.lang": {"$in": ["en", "de"]}}, {"payload.n": {"$gte": 3, "$lt": 9}}],
        "payload.text": {"$regex": "^hello", "$options": "i"},
        "tags": {"$elemMatch": {"$eq": "x"}},
    }
    assert parse_job_request({"filter": query}).filter == query


def test_malformed_filter_json_is_refused_with_the_position() -> None:
    message = refusal({"filter": '{"payload.lang": "en"'})
    assert "filter is not valid JSON" in message
    assert "line 1 column" in message


def test_filter_given_as_json_text_is_parsed() -> None:
    assert parse_job_request({"filter": '{"payload.lang": "en"}'}).filter == {"payload.lang": "en"}


@pytest.mark.parametrize("value", ["[1, 2]", 7, [{"a": 1}]])
def test_filter_that_is_not_an_object_is_refused(value: Any) -> None:
    assert "filter must be a JSON object" in refusal({"filter": value})


def test_no_selection_is_refused_and_says_how_to_select_everything() -> None:
    message = refusal({"task_ids": [], "filter": None})
    assert "no tasks selected" in message
    assert "{} selects all tasks" in message


def test_ids_and_filter_together_are_refused() -> None:
    both = {"task_ids": ["a"], "filter": {"x": 1}}
    assert "give one of task_ids, filter or retry_of" in refusal(both)


def test_duplicate_task_ids_are_refused() -> None:
    assert "'a' is listed twice" in refusal({"task_ids": ["a", "b", "a"]})


def test_task_ids_as_one_string_are_split_on_commas_and_whitespace() -> None:
    request = parse_job_request({"task_ids": "a, b\nc"})
    assert request.task_ids == ("a", "b", "c")
    assert request.filter is None


def test_more_ids_than_the_limit_is_refused() -> None:
    assert "3 task ids given but limit is 2" in refusal({"task_ids": ["a", "b", "c"], "limit": 2})


def test_unknown_parameters_are_refused_by_name() -> None:
    assert "unknown parameter(s) limt" in refusal({"filter": {}, "limt": 5})


@pytest.mark.parametrize("job_id", ["has space", "-leading", "x" * 65, "semi;colon"])
def test_bad_job_ids_are_refused(job_id: str) -> None:
    assert "job_id" in refusal({"filter": {}, "job_id": job_id})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InvalidJobRequest) as info:
        parse_job_request({"filter": {"$where": "1"}, "limit": 0, "model": "bad model!"})
    assert len(info.value.problems) == 3


def test_a_valid_request_keeps_its_settings() -> None:
    request = parse_job_request(
        {
            "task_ids": ["t1", "t2"],
            "limit": 10,
            "instructions": "  Summarize.  ",
            "model": "sim-small",
            "job_id": "job-1",
            "llm_params": {"temperature": 0},
        }
    )
    assert request.task_ids == ("t1", "t2")
    assert request.instructions == "Summarize."
    assert request.model == "sim-small"
    assert request.job_id == "job-1"
    assert request.llm_params == {"temperature": 0}


def test_ids_that_would_travel_under_the_same_wire_id_are_refused_and_listed() -> None:
    from bson import ObjectId

    from llm_batch.selection import refuse_colliding_ids

    hex_id = "65f0a1b2c3d4e5f601234567"
    with pytest.raises(InvalidJobRequest) as info:
        refuse_colliding_ids([hex_id, "other", ObjectId(hex_id), 7, "7"])
    message = str(info.value)
    assert "2 selected id(s) are the same text under different _id types" in message
    assert f"'{hex_id}' (str) and ObjectId(\"{hex_id}\")" in message
    assert "7 (int) and '7' (str)" in message


def test_distinct_wire_ids_pass() -> None:
    from bson import ObjectId

    from llm_batch.selection import refuse_colliding_ids

    refuse_colliding_ids(["a", ObjectId(), 1, "b"])


def test_a_selection_slower_than_the_time_bound_is_refused_with_the_setting_to_raise() -> None:
    from pymongo.errors import ExecutionTimeout

    from llm_batch.selection import resolve_selection

    class SlowTasks:
        """Stands in for a collection whose query exceeds its maxTimeMS."""

        name = "tasks"
        bound_ms: int | None = None

        def find(self, *args: Any) -> SlowTasks:
            return self

        def sort(self, *args: Any) -> SlowTasks:
            return self

        def limit(self, *args: Any) -> SlowTasks:
            return self

        def max_time_ms(self, ms: int) -> SlowTasks:
            SlowTasks.bound_ms = ms
            return self

        def __iter__(self) -> Any:
            raise ExecutionTimeout("operation exceeded time limit", 50)

    request = parse_job_request({"filter": {"payload.text": {"$regex": "x"}}})
    with pytest.raises(InvalidJobRequest) as info:
        resolve_selection(SlowTasks(), request, timeout_s=2.5)  # type: ignore[arg-type]
    assert SlowTasks.bound_ms == 2500
    assert "took longer than 2.5 s" in str(info.value)
    assert "LLM_BATCH_SELECTION_TIMEOUT_S" in str(info.value)
