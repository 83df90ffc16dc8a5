"""From cumulative counter samples to usage per partner, model, unit and time bucket.

Both input modes (scraping the gateways directly, or querying Prometheus) produce the same thing: one
``Series`` per exported counter series and source (gateway replica), with its samples in time order. The
rules, written once here:

- **Increase between two samples** is ``value - previous``. A counter that went down, or whose
  ``_created`` timestamp changed (a restarted replica exporting the same series), was **reset**: the
  increase is the new value (the counter restarted from zero).
- **Baseline**: the last sample before the range start. A series without one was born inside the range
  (a partner appearing mid-period, a replica started mid-period): its first sample counts from zero --
  unless its ``_created`` timestamp says it existed before the range (nobody saw it then: Prometheus was
  down, or is new). Its first value holds usage from before the range, which cannot be split off, so that
  sample becomes the baseline: billing never charges a period for earlier usage, and reconciliation with the
  ledger shows what the first sample missed as drift.
- **Late or missing scrapes** need nothing special: the increase lands at the next sample that arrives,
  in the bucket that holds that sample's timestamp. What a replica counted after its last successful
  scrape and before it died is lost to the counters; reconciliation with the ledger shows it as drift.
- **Several replicas**: increases are computed per series and then summed per partner, model and unit.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

TOKENS_METRIC = "serving_partner_tokens_total"
REQUESTS_METRIC = "serving_partner_requests_total"
UNITS = ("input_tokens", "output_tokens", "requests")


class CounterError(ValueError):
    """A sample cannot be a usage counter (negative, fractional, not finite)."""


@dataclass(frozen=True, order=True)
class Sample:
    ts: float  # seconds since the epoch
    value: int
    created: float | None = None  # the counter's ``_created`` timestamp when the exposition carries it


@dataclass
class Series:
    """One counter series of one source: ``unit`` is input_tokens, output_tokens or requests."""

    source: str
    partner: str
    model: str
    unit: str
    labels: tuple[tuple[str, str], ...] = ()  # the remaining labels (operation, status), part of the identity
    samples: list[Sample] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str, tuple[tuple[str, str], ...]]:
        return (self.source, self.partner, self.model, self.unit, self.labels)


@dataclass(frozen=True, order=True)
class UsageKey:
    partner: str
    model: str
    unit: str
    bucket: int  # index into the boundaries: bucket i is [boundaries[i], boundaries[i + 1])


def counter_value(raw: float) -> int:
    """Usage counters count whole tokens and requests; anything else is a broken exposition."""
    if raw != raw or raw in (float("inf"), float("-inf")) or raw < 0 or raw != int(raw):
        raise CounterError(f"not a usage counter value: {raw!r}")
    return int(raw)


def unit_of(metric: str, labels: dict[str, str]) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    """Maps an exported series to its billing unit and identity labels; None for series billing ignores."""
    if metric == TOKENS_METRIC:
        direction = labels.get("direction")
        if direction not in ("input", "output"):
            return None
        return f"{direction}_tokens", ()
    if metric == REQUESTS_METRIC:
        return "requests", (("operation", labels.get("operation", "")), ("status", labels.get("status", "")))
    return None


def increases(
    samples: Sequence[Sample], baseline: Sample | None, start: float | None = None
) -> list[tuple[float, int]]:
    """``(timestamp, increase)`` at every sample after the baseline, with counter resets handled; ``start`` is
    the range start, for telling a series born inside the range from one that was not seen before it."""
    out: list[tuple[float, int]] = []
    previous = baseline
    for sample in samples:
        if previous is None and start is not None and sample.created is not None and sample.created < start:
            delta = 0  # existed before the range, never seen: its value so far is not this range's usage
        elif previous is None:
            delta = sample.value  # born after the baseline: counted from zero
        elif sample.value < previous.value or (
            sample.created is not None and previous.created is not None and sample.created != previous.created
        ):
            delta = sample.value  # reset: the counter restarted from zero
        else:
            delta = sample.value - previous.value
        if delta:
            out.append((sample.ts, delta))
        previous = sample
    return out


def bucket_usage(series: Iterable[Series], boundaries: Sequence[float]) -> dict[UsageKey, int]:
    """Sums each series' increases into buckets ``[boundaries[i], boundaries[i+1])``, summed over sources.

    Samples before ``boundaries[0]`` only serve as the series' baseline; samples at or after the last
    boundary are ignored.
    """
    if len(boundaries) < 2 or any(b >= a for a, b in zip(boundaries[1:], boundaries, strict=False)):
        raise ValueError("boundaries must be at least two strictly increasing timestamps")
    start, end = boundaries[0], boundaries[-1]
    totals: dict[UsageKey, int] = {}
    for one in series:
        ordered = sorted(one.samples)
        before = [s for s in ordered if s.ts < start]
        inside = [s for s in ordered if start <= s.ts < end]
        for ts, delta in increases(inside, before[-1] if before else None, start):
            key = UsageKey(one.partner, one.model, one.unit, bisect.bisect_right(boundaries, ts) - 1)
            totals[key] = totals.get(key, 0) + delta
    return totals


def hour_boundaries(start: float, end: float) -> list[float]:
    """``start``, every whole UTC hour strictly between, ``end``."""
    marks = [start]
    hour = float((int(start) // 3600 + 1) * 3600)
    while hour < end:
        marks.append(hour)
        hour += 3600.0
    return [*marks, end]
