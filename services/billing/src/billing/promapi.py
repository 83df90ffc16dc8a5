"""At-scale mode: read the usage counters from a Prometheus server's HTTP API.

Billing needs every increase exactly, so it does not use ``increase()`` (which extrapolates to the range
edges and returns fractions). It reads the raw samples with range-vector instant queries
(``{__name__=~"serving_partner_(tokens|requests)_total"}[1h]`` evaluated at the end of each hour-long chunk)
and applies the reset rules of ``billing.counters`` itself: a value that went down is a reset, and the
increase is the new value. Each replica's series is told apart by Prometheus' target labels
(``job``, ``instance``); a replica restarted under the same ``instance`` is the same series with a reset.
A reset that the value alone cannot show (the restarted counter already above the old value) is caught by
the counter's ``_created`` series; without it (an exporter that omits ``_created``) such a reset is
undercounted, and reconciliation reports it as drift.
"""

from __future__ import annotations

import math
import time
from typing import Any

import httpx

from billing.counters import CounterError, Sample, Series, counter_value, unit_of
from billing.metrics import BillingMetrics
from billing.retry import RetryableError, RetryPolicy, SourceError

_CHUNK_S = 3600
_USAGE_LABELS = frozenset({"__name__", "partner", "model", "direction", "operation", "status"})


class PrometheusClient:
    def __init__(
        self, base_url: str, http: httpx.Client, retry: RetryPolicy, metrics: BillingMetrics, job: str = ""
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = http
        self._retry = retry
        self._metrics = metrics
        self._job = job

    def _selector(self, name: str) -> str:
        job = f',job="{self._job}"' if self._job else ""
        return f'{{__name__=~"{name}"{job}}}'

    def _get(self, promql: str, at: float) -> list[dict[str, Any]]:
        response = self._http.get(f"{self.base_url}/api/v1/query", params={"query": promql, "time": f"{at:.3f}"})
        if response.status_code >= 500 or response.status_code == 429:
            response.raise_for_status()
        try:
            body = response.json()
        except ValueError as exc:
            raise RetryableError(f"prometheus: not JSON (HTTP {response.status_code})") from exc
        if body.get("status") != "success":
            text = f"prometheus: {body.get('errorType')}: {body.get('error')}"
            if body.get("errorType") in ("timeout", "canceled", "unavailable", "internal", "execution"):
                raise RetryableError(text)
            raise SourceError(text)
        result = body.get("data", {}).get("result")
        if not isinstance(result, list):
            raise SourceError("prometheus: answer without data.result")
        return result

    def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        """One instant query, retried; every attempt is counted in ``billing_scrapes_total``."""
        return self._retry.run(
            f"prometheus query {promql!r}",
            lambda: self._get(promql, at),
            lambda ok: self._metrics.scrape("prometheus", ok, time.time() if ok else None),  # answered now
        )

    def series(self, start: float, end: float, lookback_s: float) -> list[Series]:
        """Every usage counter series with its raw samples in ``[start - lookback_s, end]``.

        The ``_created`` gauges Prometheus ingests beside each counter come from the same scrapes: a changed
        value at a sample marks a reset even when the restarted counter already exceeds the old value.
        """
        found: dict[tuple[str, str, str, str, tuple[tuple[str, str], ...]], dict[float, int]] = {}
        created: dict[tuple[str, str, str, str, tuple[tuple[str, str], ...]], dict[float, float]] = {}
        selector = self._selector("serving_partner_(tokens|requests)_(total|created)")
        chunk_end = start - lookback_s
        while chunk_end < end:
            chunk_end = min(chunk_end + _CHUNK_S, end)
            for item in self.query(f"{selector}[{_CHUNK_S}s]", chunk_end):
                labels = {str(k): str(v) for k, v in item.get("metric", {}).items()}
                name = labels.get("__name__", "")
                is_created = name.endswith("_created")
                mapped = unit_of(name.removesuffix("_created") + "_total" if is_created else name, labels)
                if mapped is None:
                    continue
                unit, identity = mapped
                source = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in _USAGE_LABELS)
                key = (source, labels.get("partner", ""), labels.get("model", ""), unit, identity)
                for ts, raw in item.get("values", []):
                    try:
                        if is_created:
                            created.setdefault(key, {})[float(ts)] = float(raw)
                        else:
                            found.setdefault(key, {})[float(ts)] = counter_value(float(raw))
                    except (ValueError, CounterError) as exc:
                        raise SourceError(f"prometheus: bad sample {raw!r} for {labels}: {exc}") from exc
        return [
            Series(*key, samples=[Sample(ts, value, created.get(key, {}).get(ts)) for ts, value in sorted(v.items())])
            for key, v in found.items()
        ]

    def scraped_through(self, at: float) -> tuple[float, list[str]]:
        """The oldest latest-scrape time over the gateway targets Prometheus knows now, and the targets down."""
        up = self.query(self._selector("up"), at)
        down = [str(i["metric"].get("instance", "?")) for i in up if float(i["value"][1]) != 1.0]
        stamps = self.query(f"timestamp({self._selector('up')})", at)
        oldest = min((float(i["value"][1]) for i in stamps), default=-math.inf)
        return oldest, sorted(down)
