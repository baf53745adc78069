"""The nightly backlog over a real MongoDB-wire server: what it sends again and what it leaves."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llm_batch.jobs import create_job
from llm_batch.processing import BatchIncomplete, process_batch
from llm_batch.reconcile import reconcile_job
from llm_batch.store import JobStore
from llm_hook import LLMClient
from tests.conftest import Simulator
from tests.integration.test_pipeline import seed

pytestmark = pytest.mark.integration

NIGHTLY_DAG = Path(__file__).resolve().parents[2] / "dags" / "llm_batch_nightly.py"


def load_nightly(monkeypatch: pytest.MonkeyPatch, max_attempts: int) -> ModuleType:
    monkeypatch.setenv("LLM_BATCH_NIGHTLY_MAX_ATTEMPTS", str(max_attempts))
    spec = importlib.util.spec_from_file_location("nightly_under_test", NIGHTLY_DAG)
    assert spec is not None and spec.loader is not None
    nightly = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nightly)
    return nightly


def last_result(status: str, error_type: str | None = None) -> dict[str, Any]:
    error = {"type": error_type, "message": "..."} if error_type else None
    return {"job_id": "job-old", "status": status, "output": None, "error": error}


def nightly_job(store: JobStore, backlog: dict[str, Any], run_id: str) -> str:
    return create_job(
        store,
        {"filter": backlog, "limit": 5000},
        dag_id="llm_batch_nightly",
        run_id=run_id,
        source="scheduled",
    ).job_id


def test_the_nightly_leaves_tasks_awaiting_review_failed_for_good_or_at_the_cap_and_says_so(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    nightly = load_nightly(monkeypatch, max_attempts=2)
    ids = seed(store, 14)
    states = {
        0: last_result("succeeded"),
        1: last_result("needs_review"),
        2: last_result("needs_review"),
        3: last_result("failed", "invalid_input"),
        4: last_result("failed", "output_too_large"),
        5: last_result("failed", "content_filtered"),
        6: last_result("failed", "not_processed"),
        7: last_result("failed", "http_503"),
        8: last_result("cancelled", "budget_exhausted"),
    }
    for i, result in states.items():
        store.tasks.update_one({"_id": ids[i]}, {"$set": {"last_result": result}})
    store.tasks.update_one({"_id": ids[6]}, {"$set": {"auto_attempts": ["job-a", "job-b"]}})
    store.tasks.update_one({"_id": ids[7]}, {"$set": {"auto_attempts": ["job-a"]}})

    job_id = nightly_job(store, nightly.BACKLOG_FILTER, "scheduled__1")

    job = store.get_job(job_id, with_task_ids=True)
    assert job is not None
    assert job["task_ids"] == [ids[i] for i in (7, 8, 9, 10, 11, 12, 13)]
    assert job["backlog"] == {
        "max_attempts": 2,
        "skipped": {"awaiting_review": 2, "failed_permanently": 3, "attempts_cap": 1},
    }
    summary = reconcile_job(store, job_id)
    assert summary.backlog_skipped == job["backlog"]["skipped"]
    assert "2 awaiting review, 3 failed permanently, 1 attempts cap" in summary.render()


def test_each_backlog_job_that_fails_a_task_counts_once_toward_its_cap(
    store: JobStore,
    start_simulator: Callable[..., Simulator],
    make_client: Callable[..., LLMClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = start_simulator(latency_ms=0, error_5xx_rate=1.0)
    client = make_client(sim, max_attempts=1, max_rounds=1)
    ids = seed(store, 10)
    backlog = load_nightly(monkeypatch, max_attempts=2).BACKLOG_FILTER

    for night in (1, 2):
        job_id = nightly_job(store, backlog, f"scheduled__{night}")
        with pytest.raises(BatchIncomplete):
            process_batch(store, client, job_id, 0)
        reconcile_job(store, job_id)
        reconcile_job(store, job_id)  # a retried reconcile counts nothing twice
        task = store.tasks.find_one({"_id": ids[0]})
        assert task is not None and len(task["auto_attempts"]) == night

    with pytest.raises(Exception, match="matched no tasks"):
        nightly_job(store, backlog, "scheduled__3")
    manual = create_job(store, {"filter": {}}, dag_id="d", run_id="m1", source="ui")
    assert manual.task_count == 10, "a person's job still takes them"
