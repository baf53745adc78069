from __future__ import annotations

from llm_batch.batching import batch_bounds, batch_count, split_into_batches


def test_5000_tasks_make_500_batches_of_10() -> None:
    batches = split_into_batches([f"t{i}" for i in range(5000)])
    assert len(batches) == batch_count(5000) == 500
    assert {len(b) for b in batches} == {10}


def test_a_partial_last_batch_keeps_every_task_once_in_order() -> None:
    ids = list(range(23))
    batches = split_into_batches(ids)
    assert [len(b) for b in batches] == [10, 10, 3]
    assert [t for b in batches for t in b] == ids
    assert batch_count(23) == 3


def test_batch_bounds_match_the_split() -> None:
    ids = list(range(35))
    for batch_no, batch in enumerate(split_into_batches(ids)):
        start, stop = batch_bounds(batch_no)
        assert ids[start:stop] == batch
