"""Request latency per day, as mergeable histograms: p50/p95 over any set of jobs and days.

A day's `llm_calls` are read once the day is over (plus a margin for late writes) and kept as
one small document per day in `llm_calls_daily` (internal): per job, counts in log-spaced
buckets 5% wide. Percentiles merged from them are within 2.5% of the exact value; the charts of
a month then read 30 small documents instead of every request, and only today is read live.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

from llm_batch import config
from llm_batch.store import JobStore

BUCKET_BASE = 1.05
SETTLE_AFTER = timedelta(hours=1)
"""A day's requests are final this long after it ended (a request's `at` is its write time)."""

Histogram = Counter[int]


def bucket_of(latency_ms: float) -> int:
    """Return the bucket of a latency: 0 below 1 ms, else 1 + floor(log_1.05(ms))."""
    return 0 if latency_ms < 1 else int(math.log(latency_ms, BUCKET_BASE)) + 1


def bucket_value(bucket: int) -> float:
    """Return a bucket's representative latency (its geometric middle)."""
    return 0.5 if bucket == 0 else BUCKET_BASE ** (bucket - 0.5)


def percentile(histogram: Histogram, q: float) -> float | None:
    """Return the `q` quantile (nearest rank) of a histogram, None if it is empty."""
    total = sum(histogram.values())
    if not total:
        return None
    rank, seen = max(1, math.ceil(q * total)), 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return bucket_value(bucket)
    return None


def daily_histograms(
    store: JobStore, days: Iterable[date], now: datetime | None = None
) -> dict[date, dict[str, Histogram]]:
    """Return `{day: {job_id: histogram}}`, from the stored days or `llm_calls` (then stored)."""
    now = now or datetime.now(UTC)
    days = sorted(days)
    rollups = store.db[config.LLM_CALLS_DAILY]
    found: dict[date, dict[str, Histogram]] = {}
    for doc in rollups.find({"_id": {"$in": [d.isoformat() for d in days]}}):
        found[date.fromisoformat(doc["_id"])] = {
            entry["job_id"]: Counter({int(b): int(n) for b, n in entry["buckets"]})
            for entry in doc.get("jobs", [])
        }
    missing = [d for d in days if d not in found]
    if missing:
        computed = _from_calls(store, missing[0], missing[-1])
        for day in missing:
            found[day] = computed.get(day, {})
            if _start(day + timedelta(days=1)) + SETTLE_AFTER <= now:
                rollups.replace_one(
                    {"_id": day.isoformat()},
                    {
                        "jobs": [
                            {"job_id": job_id, "buckets": sorted(hist.items())}
                            for job_id, hist in found[day].items()
                        ],
                        "computed_at": now,
                    },
                    upsert=True,
                )
    return found


def merged(per_job: dict[str, Histogram], job_ids: Collection[str] | None) -> Histogram:
    """Merge the histograms of these jobs (all if None)."""
    total: Histogram = Counter()
    for job_id, hist in per_job.items():
        if job_ids is None or job_id in job_ids:
            total.update(hist)
    return total


def _from_calls(store: JobStore, first: date, last: date) -> dict[date, dict[str, Histogram]]:
    query: dict[str, Any] = {"at": {"$gte": _start(first), "$lt": _start(last + timedelta(days=1))}}
    per_day: dict[date, dict[str, Histogram]] = defaultdict(lambda: defaultdict(Counter))
    projection = {"_id": 0, "at": 1, "latency_ms": 1, "job_id": 1}
    for call in store.llm_calls.find(query, projection).batch_size(10_000):
        at, latency = call.get("at"), call.get("latency_ms")
        if at is None or latency is None:
            continue
        day = (at if at.tzinfo else at.replace(tzinfo=UTC)).date()
        per_day[day][str(call.get("job_id"))][bucket_of(float(latency))] += 1
    return {day: dict(jobs) for day, jobs in per_day.items()}


def _start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)
