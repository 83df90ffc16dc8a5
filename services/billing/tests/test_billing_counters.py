"""Counter arithmetic: resets, baselines, several replicas, late and missing scrapes, exposition parsing."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from billing.counters import (
    CounterError,
    Sample,
    Series,
    UsageKey,
    bucket_usage,
    counter_value,
    hour_boundaries,
    increases,
)
from billing.scrape import ExpositionError, parse_exposition


def series(source: str, values: list[tuple[float, int]], partner: str = "p1", unit: str = "input_tokens") -> Series:
    return Series(source, partner, "m", unit, (), [Sample(ts, v) for ts, v in values])


def test_reset_counts_the_new_value() -> None:
    samples = [Sample(1, 10), Sample(2, 25), Sample(3, 3), Sample(4, 9)]
    assert sum(d for _, d in increases(samples, None)) == 10 + 15 + 3 + 6


def test_baseline_before_the_range_is_not_billed() -> None:
    assert increases([Sample(2, 120), Sample(3, 130)], Sample(1, 100)) == [(2, 20), (3, 10)]


def test_a_changed_created_timestamp_is_a_reset_even_when_the_value_grew() -> None:
    samples = [Sample(1, 10, created=100.0), Sample(2, 40, created=200.0), Sample(3, 45, created=200.0)]
    assert [d for _, d in increases(samples, None)] == [10, 40, 5]


def test_a_series_that_existed_unseen_before_the_range_is_not_billed_for_its_past() -> None:
    # Created at 3, never scraped before the range [10, 30): its first value (500) is earlier usage.
    unseen = Series("gw-a", "p1", "m", "input_tokens", (), [Sample(12, 500, created=3.0), Sample(22, 540, created=3.0)])
    born = Series("gw-a", "p2", "m", "input_tokens", (), [Sample(12, 8, created=11.0)])
    assert bucket_usage([unseen, born], [10.0, 20.0, 30.0]) == {
        UsageKey("p1", "m", "input_tokens", 1): 40,
        UsageKey("p2", "m", "input_tokens", 0): 8,
    }


def test_replicas_are_summed_and_partners_may_appear_mid_period() -> None:
    a = series("gw-a", [(5, 100), (15, 150), (25, 20)])  # reset at 25 (restart)
    b = series("gw-b", [(5, 7), (15, 9)])
    late = series("gw-b", [(22, 30)], partner="p2")  # first seen mid-period: counted from zero
    usage = bucket_usage([a, b, late], [10.0, 20.0, 30.0])
    # Samples at 5 are the baselines; bucket 0 is [10, 20), bucket 1 is [20, 30).
    assert usage == {
        UsageKey("p1", "m", "input_tokens", 0): 50 + 2,
        UsageKey("p1", "m", "input_tokens", 1): 20,
        UsageKey("p2", "m", "input_tokens", 1): 30,
    }


def test_missing_scrapes_land_the_increase_at_the_next_sample() -> None:
    gap = series("gw-a", [(1, 0), (2, 10), (31, 70)])  # nothing scraped between 2 and 31
    assert bucket_usage([gap], [0.0, 30.0, 60.0]) == {
        UsageKey("p1", "m", "input_tokens", 0): 10,
        UsageKey("p1", "m", "input_tokens", 1): 60,
    }


def test_samples_at_or_after_the_end_are_ignored() -> None:
    assert bucket_usage([series("gw", [(1, 5), (10, 9)])], [0.0, 10.0]) == {UsageKey("p1", "m", "input_tokens", 0): 5}


def test_hour_boundaries() -> None:
    assert hour_boundaries(3000.0, 7300.0) == [3000.0, 3600.0, 7200.0, 7300.0]
    assert hour_boundaries(3600.0, 7200.0) == [3600.0, 7200.0]


@pytest.mark.parametrize("bad", [-1.0, 1.5, float("nan"), float("inf")])
def test_counter_values_must_be_whole_and_non_negative(bad: float) -> None:
    with pytest.raises(CounterError):
        counter_value(bad)


def test_parses_the_gateway_exposition() -> None:
    registry = CollectorRegistry()
    tokens = Counter("serving_partner_tokens_total", "t", ["partner", "model", "direction"], registry=registry)
    requests = Counter(
        "serving_partner_requests_total", "r", ["partner", "model", "operation", "status"], registry=registry
    )
    Counter("serving_requests_total", "other", ["model"], registry=registry).labels("m").inc()
    tokens.labels("p1", "m", "input").inc(12)
    tokens.labels("p1", "m", "output").inc(3)
    requests.labels("p1", "m", "embed", "ok").inc(2)
    page = generate_latest(registry).decode()
    parsed = {(s.partner, s.unit, s.labels): s.samples[0] for s in parse_exposition(page, "gw", 7.0)}
    assert {k: v.value for k, v in parsed.items()} == {
        ("p1", "input_tokens", ()): 12,
        ("p1", "output_tokens", ()): 3,
        ("p1", "requests", (("operation", "embed"), ("status", "ok"))): 2,
    }
    assert all(s.ts == 7.0 and s.created is not None for s in parsed.values())


@pytest.mark.parametrize(
    "page",
    [
        'serving_partner_tokens_total{partner="p1",model="m",direction="input"} twelve\n',
        'serving_partner_tokens_total{partner="p1",model="m",direction="input" 12\n',
        'serving_partner_tokens_total{partner="p1",model="m",direction="input"} -4\n',
        "<html>502 Bad Gateway</html>\n",
    ],
)
def test_malformed_exposition_is_an_error(page: str) -> None:
    with pytest.raises(ExpositionError):
        parse_exposition(page, "gw", 1.0)
