"""The workspace's server-side charts and latency histograms (pure functions, no servers)."""

from __future__ import annotations

import random
import re
from collections import Counter
from datetime import UTC, date, datetime, timedelta

from llm_batch.workspace import charts, latency

DAYS = [date(2030, 3, 1) + timedelta(days=i) for i in range(3)]


def test_histogram_percentiles_stay_within_the_buckets_precision() -> None:
    rng = random.Random(3)
    values = sorted(rng.lognormvariate(6.5, 0.6) for _ in range(5000))
    histogram = Counter(latency.bucket_of(v) for v in values)
    for q in (0.5, 0.95):
        exact = values[int(q * len(values)) - 1]
        approx = latency.percentile(histogram, q)
        assert approx is not None and abs(approx - exact) / exact < 0.05
    assert latency.percentile(Counter(), 0.5) is None


def test_merging_histograms_picks_only_the_jobs_asked_for() -> None:
    per_job = {"a": Counter({latency.bucket_of(100): 3}), "b": Counter({latency.bucket_of(900): 1})}
    assert latency.merged(per_job, {"a"}) == Counter({latency.bucket_of(100): 3})
    assert sum(latency.merged(per_job, None).values()) == 4


def test_bar_chart_draws_a_bar_per_day_with_a_readable_title() -> None:
    svg = charts.bar_chart("Cost per day", DAYS, [0.5, 0.0, 2.0], charts.usd)
    assert svg.count('<rect class="bar"') == 3
    assert 'role="img"' in svg and "<title>Cost per day</title>" in svg
    assert "2030-03-03: $2.00" in svg


def test_line_chart_breaks_the_line_on_days_without_data() -> None:
    svg = charts.line_chart("Failure rate", DAYS, {"rate": [0.1, None, 0.3]}, charts.percent)
    assert svg.count("<circle") == 2 and "<polyline" not in svg
    svg = charts.line_chart("Failure rate", DAYS, {"rate": [0.1, 0.2, None]}, charts.percent)
    assert svg.count("<polyline") == 1


def test_histogram_marks_the_review_threshold_and_colours_the_bins_below_it() -> None:
    svg = charts.histogram("Confidence", [1] * 20, 0.5)
    assert "review below 0.5" in svg
    below = re.findall(r'fill="#c98d00"', svg)
    assert len(below) == 10


def test_timeline_puts_overlapping_batches_in_separate_lanes() -> None:
    t0 = datetime(2030, 3, 1, tzinfo=UTC)
    spans = [
        charts.Span("batch 0", t0, t0 + timedelta(seconds=2), "done"),
        charts.Span("batch 1", t0 + timedelta(seconds=1), t0 + timedelta(seconds=3), "retried"),
        charts.Span("batch 2", t0 + timedelta(seconds=2), t0 + timedelta(seconds=4), "done"),
    ]
    svg = charts.timeline("Timeline", spans)
    assert "in up to 2 at once; 1 retried" in svg
    assert svg.count('<rect class="span"') == 3


def test_text_in_charts_is_escaped() -> None:
    svg = charts.stacked_bar_chart("<b>", DAYS, {"<x>": [1, 2, 3]})
    assert "&lt;b&gt;" in svg and "<b>" not in svg
    assert "&lt;x&gt;" in svg and "<x>" not in svg
