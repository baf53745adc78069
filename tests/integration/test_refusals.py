"""Bad input of every kind is refused at job creation, over a real MongoDB-wire server and the
simulator: one clear message, no job document, no LLM request, and no retry of `create_job`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from bson import ObjectId

from llm_batch import config
from llm_batch.jobs import create_job, estimate_request
from llm_batch.request import InvalidJobRequest, parse_job_request
from llm_batch.selection import resolve_selection
from llm_batch.service import LLMService
from llm_batch.store import JobStore
from llm_hook import ClientSettings
from tests.conftest import Simulator
from tests.integration.test_pipeline import seed

pytestmark = pytest.mark.integration

HEX = "65f0a1b2c3d4e5f601234567"

BAD_INPUT: dict[str, tuple[dict[str, Any], str]] = {
    "nan budget": ({"filter": {}, "max_cost_usd": float("nan")}, "max_cost_usd must be a finite"),
    "nan review threshold": (
        {"filter": {}, "review_below": float("nan")},
        "review_below must be a finite",
    ),
    "infinite alert rate": (
        {"filter": {}, "alert_failure_rate": float("inf")},
        "alert_failure_rate must be a finite",
    ),
    "reserved llm_params key": (
        {"filter": {}, "llm_params": {"stream": True}},
        "llm_params.stream is set by the openai adapter itself",
    ),
    "unknown llm_params key": (
        {"filter": {}, "llm_params": {"service_tier": "flex"}},
        "llm_params.service_tier is not a parameter the openai adapter sends",
    ),
    "max_tokens above the ceiling": (
        {"filter": {}, "llm_params": {"max_tokens": 10**9}},
        "above the connection's ceiling of 2048",
    ),
    "oversized llm_params": (
        {"filter": {}, "llm_params": {"output_schema": {"description": "x" * 10_000}}},
        "more than the 8192 allowed",
    ),
    "NUL in a filter key": ({"filter": {"payload.a\x00b": 1}}, "holds a NUL character"),
    "deeply nested filter": (
        {"filter": '{"$and": [' * 3000 + "{}" + "]}" * 3000},
        "filter nests deeper than",
    ),
    "catastrophic regex": (
        {"filter": {"payload.text": {"$regex": "^(a+)+$"}}},
        "repeats a group that itself repeats",
    ),
    "mixed _id types": ({"filter": {}}, "same text under different _id types"),
}


@pytest.fixture
def sim(start_simulator: Callable[..., Simulator]) -> Simulator:
    return start_simulator(latency_ms=0)


@pytest.fixture
def service(sim: Simulator) -> LLMService:
    return LLMService.from_settings(
        ClientSettings(
            base_url=sim.url,
            api_key=sim.api_key,
            adapter="openai",
            model="sim-small",
            max_tokens_ceiling=2048,
        )
    )


def seed_for(store: JobStore, case: str) -> None:
    seed(store, 5)
    if case == "mixed _id types":
        store.tasks.insert_many(
            [{"_id": HEX, "payload": {"text": "a"}}, {"_id": ObjectId(HEX), "payload": {}}]
        )


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_before_a_job_exists_or_a_request_is_sent(
    store: JobStore, sim: Simulator, service: LLMService, case: str
) -> None:
    conf, message = BAD_INPUT[case]
    seed_for(store, case)

    with pytest.raises(InvalidJobRequest) as info:
        create_job(store, conf, dag_id="d", run_id="r1", source="ui", service=service)
    with pytest.raises(InvalidJobRequest):
        estimate_request(store, {**conf, "dry_run": True}, service)

    assert message in str(info.value)
    assert store.jobs.count_documents({}) == 0
    assert sim.stats()["requests_total"] == 0


def test_mixed_id_types_are_refused_with_the_colliding_ids_listed(
    store: JobStore, service: LLMService
) -> None:
    seed_for(store, "mixed _id types")
    with pytest.raises(InvalidJobRequest) as info:
        create_job(store, {"filter": {}}, dag_id="d", run_id="r1", source="ui", service=service)
    assert f"'{HEX}' (str) and ObjectId(\"{HEX}\")" in str(info.value)


def test_an_object_id_given_in_upper_case_is_found(store: JobStore, service: LLMService) -> None:
    store.tasks.insert_one({"_id": ObjectId(HEX), "payload": {"text": "a"}})
    created = create_job(
        store, {"task_ids": [HEX.upper()]}, dag_id="d", run_id="r1", source="ui",
        service=service,
    )  # fmt: skip
    stored = store.get_job(created.job_id, with_task_ids=True)
    assert stored is not None and stored["task_ids"] == [ObjectId(HEX)]


def test_a_filter_the_driver_cannot_encode_is_refused_not_raised(store: JobStore) -> None:
    """Whatever slips past the parser: bson's own refusal becomes the request's refusal."""
    seed(store, 3)
    request = dataclasses.replace(parse_job_request({"filter": {}}), filter={"a\x00b": 1})
    with pytest.raises(InvalidJobRequest, match="cannot be sent to the database"):
        resolve_selection(store.tasks, request)


def test_selection_runs_under_the_configured_time_bound(
    store: JobStore, service: LLMService
) -> None:
    seed(store, 30)
    created = create_job(
        store, {"filter": {"payload.n": {"$gte": 10}}}, dag_id="d", run_id="r1", source="ui",
        service=service, selection_timeout_s=5.0,
    )  # fmt: skip
    assert created.task_count == 20


# The DAG's create_job task body, connections from the environment as Airflow gives them.


class FakeTaskInstance:
    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


@pytest.fixture
def airflow_connections(
    store: JobStore, sim: Simulator, mongo_uri: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    mongo_host = mongo_uri.removeprefix("mongodb://")
    monkeypatch.setenv("AIRFLOW_CONN_MONGO_DEFAULT", f"mongo://{mongo_host}/{store.db.name}")
    monkeypatch.setenv(
        "AIRFLOW_CONN_LLM_DEFAULT",
        json.dumps(
            {
                "conn_type": "llm_batch",
                "host": sim.url,
                "password": sim.api_key,
                "extra": {"model": "sim-small", "adapter": "openai", "max_tokens_ceiling": 2048},
            }
        ),
    )
    yield


@pytest.mark.parametrize("dry_run", [False, True], ids=["job", "dry run"])
@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_every_refusal_fails_the_create_job_task_for_good(
    store: JobStore, sim: Simulator, airflow_connections: None, case: str, dry_run: bool
) -> None:
    """AirflowFailException: Airflow never retries it, whatever the task's `retries`."""
    from airflow.sdk.exceptions import AirflowFailException

    from llm_batch.orchestration import task_bodies

    conf, message = BAD_INPUT[case]
    seed_for(store, case)
    ti = FakeTaskInstance()

    with pytest.raises(AirflowFailException) as info:
        task_bodies.create_job(
            {**conf, "dry_run": dry_run}, dag_id="d", run_id="r1", run_type="manual", ti=ti
        )

    assert message in str(info.value)
    assert any(message in problem for problem in ti.xcom[config.REJECTION_XCOM_KEY])
    assert store.jobs.count_documents({}) == 0
    assert sim.stats()["requests_total"] == 0
