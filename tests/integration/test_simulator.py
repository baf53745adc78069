"""The LLM simulator as a real process over loopback HTTP: contract, limits, faults, idempotency."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import requests

from llm_batch_dev.simulator import (
    estimate_tokens,
    expected_confidence,
    expected_output,
    input_tokens,
)
from tests.conftest import Simulator

pytestmark = pytest.mark.integration

StartSimulator = Callable[..., Simulator]
INSTRUCTIONS = "Summarize the document in one line."


def make_tasks(count: int, prefix: str = "task") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}-{n:04d}", "input": {"text": f"document number {n}", "n": n}}
        for n in range(count)
    ]


def post_batch(
    sim: Simulator,
    tasks: list[dict[str, Any]],
    *,
    model: str = "sim-small",
    instructions: str = INSTRUCTIONS,
    api_key: str | None = None,
    idempotency_key: str | None = None,
    timeout: float = 10,
    session: requests.Session | None = None,
) -> requests.Response:
    headers = {"Authorization": f"Bearer {sim.api_key if api_key is None else api_key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    body = {"model": model, "instructions": instructions, "tasks": tasks}
    return (session or sim.session).post(
        f"{sim.url}/v1/batch", json=body, headers=headers, timeout=timeout
    )


def post_chat(
    sim: Simulator, body: dict[str, Any], *, api_key: str | None = None
) -> requests.Response:
    headers = {"Authorization": f"Bearer {sim.api_key if api_key is None else api_key}"}
    return sim.session.post(
        f"{sim.url}/v1/chat/completions", json=body, headers=headers, timeout=10
    )


def assert_results_belong_to_their_tasks(
    results: list[dict[str, Any]], tasks: list[dict[str, Any]], instructions: str, model: str
) -> None:
    inputs = {task["id"]: task["input"] for task in tasks}
    for result in results:
        task_input = inputs[result["id"]]
        assert result["output"] == expected_output(
            task_input, instructions=instructions, model=model
        )
        assert result["confidence"] == expected_confidence(task_input)
        counts = estimate_tokens(task_input, instructions=instructions, model=model)
        assert result["usage"] == counts.as_dict()


def test_batch_round_trip_returns_expected_outputs_and_bills_their_usage(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0)
    tasks = make_tasks(10)

    response = post_batch(sim, tasks, model="sim-large")

    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "sim-large"
    assert sorted(result["id"] for result in body["results"]) == [task["id"] for task in tasks]
    assert_results_belong_to_their_tasks(body["results"], tasks, INSTRUCTIONS, "sim-large")
    assert body["usage"] == {
        "input_tokens": sum(result["usage"]["input_tokens"] for result in body["results"]),
        "output_tokens": sum(result["usage"]["output_tokens"] for result in body["results"]),
    }
    stats = sim.stats()
    assert stats["requests_total"] == 1
    assert stats["requests_by_status"] == {"200": 1}
    assert stats["requests_by_endpoint"] == {"/v1/batch": 1}
    assert stats["tasks_received"] == stats["tasks_billed"] == 10
    assert stats["input_tokens_billed"] == body["usage"]["input_tokens"]
    assert stats["output_tokens_billed"] == body["usage"]["output_tokens"]
    assert stats["in_flight"] == 0
    assert stats["peak_in_flight"] == 1


def test_inputs_asking_for_item_errors_get_them_and_are_billed(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0)
    tasks: list[dict[str, Any]] = [
        {"id": "bad", "input": {"simulate": "invalid_input", "text": "x"}},
        {"id": "filtered", "input": {"simulate": "content_filtered"}},
        {"id": "fine", "input": "a normal document"},
    ]

    results = {item["id"]: item for item in post_batch(sim, tasks).json()["results"]}

    assert results["bad"]["error"]["type"] == "invalid_input"
    assert results["filtered"]["error"]["type"] == "content_filtered"
    assert "output" not in results["bad"] and "output" not in results["filtered"]
    assert results["bad"]["error"]["message"]
    assert results["fine"]["output"] == expected_output(
        "a normal document", instructions=INSTRUCTIONS, model="sim-small"
    )
    stats = sim.stats()
    assert stats["tasks_billed"] == 3
    assert stats["input_tokens_billed"] == sum(
        input_tokens(task["input"], INSTRUCTIONS) for task in tasks
    )


def test_requests_without_the_right_key_get_401_and_cost_nothing(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(api_key="right-key", latency_ms=0)
    url = f"{sim.url}/v1/batch"
    body = {"model": "sim-small", "tasks": make_tasks(2)}

    for headers in (
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": "Basic right-key"},
    ):
        response = requests.post(url, json=body, headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "unauthorized"
        assert "api key" in response.json()["error"]["message"].lower()
    assert requests.get(f"{sim.url}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{sim.url}/healthz", timeout=10).json() == {"status": "ok"}
    stats = sim.stats()
    assert stats["requests_by_status"] == {"401": 4}
    assert stats["tasks_received"] == stats["tasks_billed"] == 0


def test_unknown_model_gets_404(start_simulator: StartSimulator) -> None:
    sim = start_simulator(latency_ms=0)

    response = post_batch(sim, make_tasks(1), model="gpt-99")

    assert response.status_code == 404
    assert response.json()["error"]["type"] == "model_not_found"
    assert "sim-small" in response.json()["error"]["message"]
    assert sim.stats()["tasks_billed"] == 0


def test_too_many_tasks_or_too_large_a_body_gets_413_and_keeps_the_connection(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0, max_body_bytes=4000)
    session = requests.Session()

    too_many = post_batch(sim, make_tasks(11), session=session)
    too_large = post_batch(sim, [{"id": "big", "input": "x" * 5000}], session=session)
    fine = post_batch(sim, make_tasks(10), session=session)

    assert too_many.status_code == 413
    assert "limit is 10" in too_many.json()["error"]["message"]
    assert too_large.status_code == 413
    assert "limit is 4000" in too_large.json()["error"]["message"]
    assert fine.status_code == 200
    assert sim.stats()["tasks_billed"] == 10


MALFORMED_BATCH_BODIES = [
    (b"not json", 400, "not valid JSON"),
    (b"[1, 2]", 422, "JSON object"),
    (b'{"model": "sim-small"}', 422, "tasks must be a list"),
    (b'{"model": "sim-small", "tasks": []}', 422, "tasks is empty"),
    (b'{"tasks": [{"id": "a", "input": 1}]}', 422, "model must be"),
    (b'{"model": "sim-small", "tasks": [{"id": 7, "input": 1}]}', 422, "tasks[0].id must be"),
    (b'{"model": "sim-small", "tasks": [{"id": "a"}]}', 422, '"id" and "input"'),
    (
        b'{"model": "sim-small", "tasks": [{"id": "a", "input": 1}, {"id": "a", "input": 2}]}',
        422,
        "more than once",
    ),
    (
        b'{"model": "sim-small", "instructions": 5, "tasks": [{"id": "a", "input": 1}]}',
        422,
        "instructions must be",
    ),
]


def test_malformed_batch_requests_get_400_or_422_with_a_message(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0)
    headers = {"Authorization": f"Bearer {sim.api_key}", "Content-Type": "application/json"}

    for body, status, message in MALFORMED_BATCH_BODIES:
        response = sim.session.post(f"{sim.url}/v1/batch", data=body, headers=headers, timeout=10)
        assert response.status_code == status, body
        assert message in response.json()["error"]["message"], body

    stats = sim.stats()
    assert stats["requests_by_status"] == {"400": 1, "422": len(MALFORMED_BATCH_BODIES) - 1}
    assert stats["tasks_received"] == 0


def test_rpm_limit_answers_429_with_retry_after_and_rate_limit_headers(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0, rpm_limit=3)

    answers = [post_batch(sim, make_tasks(2)) for _ in range(4)]

    assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
    remaining = [answer.headers["x-ratelimit-remaining-requests"] for answer in answers]
    assert remaining == ["2", "1", "0", "0"]
    assert all(answer.headers["x-ratelimit-limit-requests"] == "3" for answer in answers)
    assert answers[0].headers["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(answers[3].headers["Retry-After"]) <= 60
    assert answers[3].json()["error"]["type"] == "rate_limited"
    chat = post_chat(sim, {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 429
    assert chat.headers["x-ratelimit-limit-requests"] == "3"
    stats = sim.stats()
    assert stats["requests_by_status"] == {"200": 3, "429": 2}
    assert stats["rejections"]["rpm"] == 2
    assert stats["peak_requests_per_minute"] == 3
    assert stats["tasks_billed"] == 6


def settled(sim: Simulator, timeout_s: float = 5.0) -> dict[str, Any]:
    """Return stats once no request is in flight: a handler counts itself out after it answers."""
    deadline = time.monotonic() + timeout_s
    stats = sim.stats()
    while stats["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
        stats = sim.stats()
    return stats


def send_concurrently(sim: Simulator, count: int, tasks_each: int) -> list[requests.Response]:
    """Send `count` batch requests at the same moment, each on its own connection."""
    barrier = threading.Barrier(count)
    answers: list[requests.Response | None] = [None] * count

    def send(slot: int) -> None:
        session = requests.Session()
        barrier.wait()
        answers[slot] = post_batch(sim, make_tasks(tasks_each, f"c{slot}"), session=session)

    threads = [threading.Thread(target=send, args=(slot,)) for slot in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(answer is not None for answer in answers)
    return [answer for answer in answers if answer is not None]


def test_peak_in_flight_counts_every_concurrent_request(start_simulator: StartSimulator) -> None:
    sim = start_simulator(latency_ms=1000)

    answers = send_concurrently(sim, 8, 1)

    assert [answer.status_code for answer in answers] == [200] * 8
    assert sim.stats()["peak_in_flight"] == 8
    assert settled(sim)["in_flight"] == 0


def test_max_concurrency_turns_away_extra_requests_with_429(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=1000, max_concurrency=3)

    answers = send_concurrently(sim, 6, 2)

    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {200: 3, 429: 3}
    assert all(a.headers["Retry-After"] == "1" for a in answers if a.status_code == 429)
    stats = settled(sim)
    assert stats["rejections"]["concurrency"] == 3
    assert stats["tasks_billed"] == 6
    assert stats["in_flight"] == 0


def test_idempotent_replay_returns_the_same_answer_and_bills_once(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0)
    tasks = make_tasks(5)

    first = post_batch(sim, tasks, idempotency_key="job-1:batch-0")
    replay = post_batch(sim, tasks, idempotency_key="job-1:batch-0")
    other_key = post_batch(sim, tasks, idempotency_key="job-1:batch-0:again")
    reused_key = post_batch(sim, make_tasks(4), idempotency_key="job-1:batch-0")

    assert first.status_code == replay.status_code == other_key.status_code == 200
    assert replay.content == first.content
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert reused_key.status_code == 422
    assert reused_key.json()["error"]["type"] == "idempotency_key_reused"
    stats = sim.stats(per_task=1)
    assert stats["replays"] == 1
    assert stats["tasks_billed"] == 10
    assert set(stats["billed_per_task"].values()) == {2}


def test_retry_after_a_connection_reset_replays_without_a_second_bill(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0, reset_rate=1)
    tasks = make_tasks(3)

    with pytest.raises(requests.ConnectionError):
        post_batch(sim, tasks, idempotency_key="k-reset", session=requests.Session())
    assert sim.stats()["tasks_billed"] == 3
    sim.configure(reset_rate=0)
    retry = post_batch(sim, tasks, idempotency_key="k-reset")

    assert retry.status_code == 200
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert_results_belong_to_their_tasks(retry.json()["results"], tasks, INSTRUCTIONS, "sim-small")
    stats = sim.stats(per_task=1)
    assert stats["faults_injected"]["reset"] == 1
    assert stats["replays"] == 1
    assert stats["billed_per_task"] == {task["id"]: 1 for task in tasks}


def test_second_request_with_a_key_in_progress_waits_and_replays(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=800)
    tasks = make_tasks(2)
    answers: dict[str, requests.Response] = {}

    def send(name: str) -> None:
        answers[name] = post_batch(sim, tasks, idempotency_key="same", session=requests.Session())

    first = threading.Thread(target=send, args=("first",))
    first.start()
    time.sleep(0.3)
    send("second")
    first.join(timeout=10)

    assert answers["first"].status_code == answers["second"].status_code == 200
    assert answers["second"].content == answers["first"].content
    assert answers["second"].headers["Idempotent-Replayed"] == "true"
    assert sim.stats()["tasks_billed"] == 2


def test_slow_answer_is_billed_and_its_retry_is_replayed(start_simulator: StartSimulator) -> None:
    sim = start_simulator(latency_ms=0, slow_rate=1, slow_ms=1500)
    tasks = make_tasks(2)

    with pytest.raises(requests.Timeout):
        post_batch(sim, tasks, idempotency_key="k-slow", timeout=0.5, session=requests.Session())
    sim.configure(slow_rate=0)
    retry = post_batch(sim, tasks, idempotency_key="k-slow")

    assert retry.status_code == 200
    assert retry.headers["Idempotent-Replayed"] == "true"
    stats = sim.stats()
    assert stats["faults_injected"]["slow"] == 1
    assert stats["tasks_billed"] == 2


def test_truncated_answer_is_not_json_and_is_billed(start_simulator: StartSimulator) -> None:
    sim = start_simulator(latency_ms=0, truncate_rate=1)

    response = post_batch(sim, make_tasks(3))

    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    stats = sim.stats()
    assert stats["faults_injected"]["truncate"] == 1
    assert stats["tasks_billed"] == 3


def test_server_errors_are_not_billed_and_not_stored_for_replay(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0, error_5xx_rate=1)
    tasks = make_tasks(3)

    failed = post_batch(sim, tasks, idempotency_key="k-5xx")
    sim.configure(error_5xx_rate=0)
    retry = post_batch(sim, tasks, idempotency_key="k-5xx")

    assert failed.status_code in (500, 502, 503, 504)
    assert failed.json()["error"]["message"]
    assert retry.status_code == 200
    assert "Idempotent-Replayed" not in retry.headers
    stats = sim.stats()
    assert stats["faults_injected"]["error_5xx"] == 1
    assert stats["tasks_received"] == stats["tasks_billed"] == 3
    assert stats["replays"] == 0


def test_random_rate_limit_answers_429_and_bills_nothing(start_simulator: StartSimulator) -> None:
    sim = start_simulator(latency_ms=0, rate_limit_rate=1)

    response = post_batch(sim, make_tasks(3))

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"
    stats = sim.stats()
    assert stats["faults_injected"]["rate_limit"] == 1
    assert stats["tasks_billed"] == 0


@pytest.mark.parametrize(
    ("fault", "billed"),
    [
        ("drop_id", False),
        ("duplicate_id", True),
        ("unknown_id", True),
        ("malformed_item", False),
        ("item_error", True),
    ],
)
def test_each_item_fault_shows_up_and_is_counted(
    start_simulator: StartSimulator, fault: str, billed: bool
) -> None:
    sim = start_simulator(latency_ms=0, **{f"{fault}_rate": 1})
    tasks = make_tasks(4)
    sent_ids = {task["id"] for task in tasks}

    body = post_batch(sim, tasks).json()

    results = body["results"]
    ids = Counter(result["id"] for result in results)
    if fault == "drop_id":
        assert results == []
    elif fault == "duplicate_id":
        assert ids == dict.fromkeys(sent_ids, 2)
        assert_results_belong_to_their_tasks(results, tasks, INSTRUCTIONS, "sim-small")
    elif fault == "unknown_id":
        assert len(results) == 4 and not set(ids) & sent_ids
    elif fault == "malformed_item":
        assert set(ids) == sent_ids
        assert all("output" not in result and "error" not in result for result in results)
    else:
        assert set(ids) == sent_ids
        assert {result["error"]["type"] for result in results} <= {"overloaded", "internal"}
    stats = sim.stats(per_task=1)
    assert stats["faults_injected"][fault] == 4
    assert stats["tasks_received"] == 4
    assert stats["tasks_billed"] == (4 if billed else 0)
    assert stats["billed_per_task"] == ({task_id: 1 for task_id in sent_ids} if billed else {})
    assert body["usage"]["input_tokens"] == stats["input_tokens_billed"]


def test_seed_reproduces_the_same_faults_for_the_same_request_order(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0, seed=1234, drop_id_rate=0.5, error_5xx_rate=0.3)

    def run() -> list[tuple[int, list[str]]]:
        answers = [post_batch(sim, make_tasks(10, f"r{n}")) for n in range(6)]
        return [(a.status_code, [r["id"] for r in a.json().get("results", [])]) for a in answers]

    first = run()
    sim.reset()
    second = run()

    assert first == second
    assert len({len(ids) for _, ids in first}) > 1  # the faults did vary between requests


def test_chat_completion_has_the_openai_shape(start_simulator: StartSimulator) -> None:
    sim = start_simulator(latency_ms=0)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about the weather today"},
    ]

    text = post_chat(sim, {"model": "sim-small", "messages": messages, "temperature": 0})
    as_json = post_chat(
        sim,
        {
            "model": "sim-small",
            "messages": messages,
            "response_format": {"type": "json_object"},
            "max_completion_tokens": 100,
        },
    )

    assert text.status_code == 200
    answer = text.json()
    assert answer["object"] == "chat.completion"
    assert answer["id"] and isinstance(answer["created"], int)
    assert answer["model"] == "sim-small"
    [choice] = answer["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    expected = expected_output(messages[1]["content"], instructions="Be brief.", model="sim-small")
    assert expected["digest"] in choice["message"]["content"]
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    content = as_json.json()["choices"][0]["message"]["content"]
    assert json.loads(content) == expected
    stats = sim.stats()
    assert stats["requests_by_endpoint"] == {"/v1/chat/completions": 2}
    assert stats["tasks_billed"] == 0
    assert stats["input_tokens_billed"] > 0


def test_chat_rejects_bad_requests_like_openai(start_simulator: StartSimulator) -> None:
    sim = start_simulator(latency_ms=0)
    user = [{"role": "user", "content": "hi"}]

    assert post_chat(sim, {"model": "sim-small", "messages": user}, api_key="no").status_code == 401
    assert post_chat(sim, {"model": "nope", "messages": user}).status_code == 404
    assert post_chat(sim, {"model": "sim-small", "messages": []}).status_code == 400
    assert (
        post_chat(
            sim, {"model": "sim-small", "messages": user, "response_format": {"type": "yaml"}}
        ).status_code
        == 400
    )


def test_chat_with_tasks_json_answers_results_like_the_batch_endpoint(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0)
    tasks = make_tasks(4)
    messages = [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": json.dumps({"tasks": tasks})},
    ]

    response = post_chat(sim, {"model": "sim-large", "messages": messages})

    assert response.status_code == 200
    answer = response.json()
    results = json.loads(answer["choices"][0]["message"]["content"])["results"]
    assert sorted(result["id"] for result in results) == [task["id"] for task in tasks]
    assert_results_belong_to_their_tasks(results, tasks, INSTRUCTIONS, "sim-large")
    assert answer["usage"]["prompt_tokens"] == sum(r["usage"]["input_tokens"] for r in results)
    stats = sim.stats(per_task=1)
    assert stats["billed_per_task"] == {task["id"]: 1 for task in tasks}
    assert stats["input_tokens_billed"] == answer["usage"]["prompt_tokens"]
    too_many = [{"role": "user", "content": json.dumps({"tasks": make_tasks(11)})}]
    assert post_chat(sim, {"model": "sim-large", "messages": too_many}).status_code == 413


def test_models_list_needs_the_key_and_is_never_rate_limited(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0, rpm_limit=1, models=["sim-small", "sim-xl"])
    headers = {"Authorization": f"Bearer {sim.api_key}"}

    answers = [requests.get(f"{sim.url}/v1/models", headers=headers, timeout=10) for _ in range(3)]

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    listing = answers[0].json()
    assert listing["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listing["data"]] == [
        ("sim-small", "model", "simulator"),
        ("sim-xl", "model", "simulator"),
    ]
    stats = sim.stats()
    assert stats["requests_last_minute"] == 0
    assert stats["tasks_billed"] == stats["input_tokens_billed"] == 0


def test_stats_report_per_task_counts_and_request_records(start_simulator: StartSimulator) -> None:
    sim = start_simulator(latency_ms=0)
    tasks = make_tasks(3)

    post_batch(sim, tasks, idempotency_key="rec-1")
    post_batch(sim, tasks, idempotency_key="rec-1")
    post_batch(sim, tasks[:1])

    plain = sim.stats()
    assert "billed_per_task" not in plain and "requests" not in plain
    stats = sim.stats(per_task=1, requests=1)
    assert stats["billed_per_task"] == {"task-0000": 2, "task-0001": 1, "task-0002": 1}
    assert stats["received_per_task"] == stats["billed_per_task"]
    records = stats["requests"]
    assert [(r["status"], r["replayed"], r["idempotency_key"]) for r in records] == [
        (200, False, "rec-1"),
        (200, True, "rec-1"),
        (200, False, None),
    ]
    assert records[0]["task_ids"] == [task["id"] for task in tasks]
    assert records[0]["endpoint"] == "/v1/batch"
    assert records[0]["at"] <= records[2]["at"]
    sim.reset()
    assert sim.stats()["requests_total"] == 0


def test_admin_config_validates_changes_and_returns_the_whole_config(
    start_simulator: StartSimulator,
) -> None:
    sim = start_simulator(latency_ms=0)

    config = sim.configure(rpm_limit=100, latency_jitter_ms=5)
    unknown = sim.session.post(f"{sim.url}/admin/config", json={"colour": "red"}, timeout=10)
    bad = sim.session.post(f"{sim.url}/admin/config", json={"reset_rate": 2}, timeout=10)

    assert config["rpm_limit"] == 100 and config["latency_jitter_ms"] == 5
    assert config["latency_ms"] == 0
    assert {"models", "max_tasks_per_request", "seed", "item_error_rate"} <= set(config)
    assert unknown.status_code == 400
    assert "colour" in unknown.json()["error"]["message"]
    assert bad.status_code == 400
    assert "reset_rate" in bad.json()["error"]["message"]
    assert sim.configure()["rpm_limit"] == 100


def test_sigterm_stops_the_simulator_cleanly(start_simulator: StartSimulator) -> None:
    sim = start_simulator(latency_ms=0)
    assert post_batch(sim, make_tasks(1)).status_code == 200

    sim.stop()

    assert sim.process.popen.returncode == 0
    log = sim.process.log_path.read_text()
    assert "listening on" in log
    assert sim.api_key not in log
