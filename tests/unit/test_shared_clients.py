"""What the triggerer's batches share: one value per key among threads, reread after a TTL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from llm_batch.orchestration.shared_clients import Fresh, Shared


class Resource:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False


def test_threads_leasing_one_key_at_once_share_one_value_built_once() -> None:
    built: list[Resource] = []
    shared: Shared[Resource] = Shared(lambda r: None)
    together = threading.Barrier(16)

    def build() -> Resource:
        built.append(Resource("a"))
        return built[-1]

    def lease(_: int) -> Resource:
        together.wait(5)
        with shared.lease("a", build) as value:
            return value

    with ThreadPoolExecutor(16) as threads:
        leased = list(threads.map(lease, range(16)))

    assert len(built) == 1
    assert all(value is built[0] for value in leased)


def test_a_value_replaced_under_a_lease_is_closed_when_that_lease_ends() -> None:
    shared: Shared[Resource] = Shared(lambda r: setattr(r, "closed", True))
    with shared.lease("old", lambda: Resource("old")) as old:
        with shared.lease("new", lambda: Resource("new")) as new:
            assert new is not old
        assert not old.closed, "closed under the batch still using it"
        assert not new.closed
    assert old.closed
    with shared.lease("new", lambda: Resource("newer")) as again:
        assert again is new
    shared.close()
    assert new.closed


def test_a_value_is_read_once_per_ttl_and_at_once_after_expire() -> None:
    now = [0.0]
    reads: list[float] = []

    def read() -> float:
        reads.append(now[0])
        return now[0]

    fresh = Fresh(read, 30.0, clock=lambda: now[0])
    assert fresh.get() == 0.0
    now[0] = 29.9
    assert fresh.get() == 0.0
    now[0] = 30.0
    assert fresh.get() == 30.0
    now[0] = 31.0
    fresh.expire()
    assert fresh.get() == 31.0
    assert reads == [0.0, 30.0, 31.0]


def test_a_failed_read_is_tried_again_by_the_next_get() -> None:
    answers: list[object] = [LookupError("connection not found"), "settings"]

    def read() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    fresh = Fresh(read, 30.0, clock=lambda: 0.0)
    with pytest.raises(LookupError):
        fresh.get()
    assert fresh.get() == "settings"
