"""Embedded mode: scrape the gateway replicas' ``/metrics`` and keep their usage counter samples.

The exposition is parsed with ``prometheus_client``'s parser; a malformed page fails the whole scrape of
that target (nothing from it is stored). Only samples that changed are stored; a target's
``last_success`` tells when its counters were last known (a period closes only after every target was
scraped past its end).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from billing.counters import CounterError, Sample, Series, counter_value, unit_of
from billing.metrics import BillingMetrics
from billing.retry import RetryableError, RetryPolicy, SourceError
from billing.store import BillingStore

log = logging.getLogger("billing.scrape")
# The gateway's gauge: when its counters became final (a graceful stop drained every request); 0 while serving.
_FINAL_AT = re.compile(r"^serving_gateway_drained_timestamp_seconds ([0-9.eE+]+)$", re.MULTILINE)


class ExpositionError(RetryableError):
    """A /metrics page that is not valid text exposition (retried: a proxy may have cut it), or bad counters."""


@dataclass(frozen=True)
class Target:
    source: str  # the series' identity: an explicit ``instance`` label, else the URL
    url: str


def load_targets(urls: list[str], targets_file: Path | None) -> list[Target]:
    """Targets from the settings plus a Prometheus ``file_sd`` JSON file (re-read at every scrape)."""
    targets = [Target(url, url) for url in urls]
    if targets_file is not None and targets_file.exists():
        for group in json.loads(targets_file.read_text()):
            labels = group.get("labels", {})
            for address in group.get("targets", []):
                url = f"http://{address}/metrics"
                targets.append(Target(labels.get("instance", address), url))
    return targets


def parse_exposition(text: str, source: str, ts: float) -> list[Series]:
    """The usage counter series in one exposition, each with one sample at ``ts``."""
    found: dict[tuple[str, str, str, str, tuple[tuple[str, str], ...]], Series] = {}
    created: dict[tuple[str, str, str, str, tuple[tuple[str, str], ...]], float] = {}
    try:
        for family in text_string_to_metric_families(text):
            # A counter family is named without ``_total``; an untyped page keeps the full sample name.
            base = family.name.removesuffix("_total").removesuffix("_created")
            for sample in family.samples:
                mapped = unit_of(base + "_total", sample.labels)
                if mapped is None:
                    continue
                unit, labels = mapped
                key = (source, sample.labels.get("partner", ""), sample.labels.get("model", ""), unit, labels)
                if sample.name == base + "_created":
                    created[key] = float(sample.value)
                elif sample.name == base + "_total":
                    found[key] = Series(*key, samples=[Sample(ts, counter_value(sample.value))])
    except (ValueError, CounterError, IndexError, KeyError) as exc:
        raise ExpositionError(f"{source}: malformed exposition: {exc}") from exc
    for key, series in found.items():
        if key in created:
            series.samples = [Sample(ts, series.samples[0].value, created[key])]
    return list(found.values())


class Scraper:
    def __init__(
        self,
        store: BillingStore,
        metrics: BillingMetrics,
        http: httpx.Client,
        urls: list[str],
        targets_file: Path | None,
        retry: RetryPolicy,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._http = http
        self._urls = urls
        self._targets_file = targets_file
        self._retry = retry
        self._last = store.last_samples()
        self._last_ts: dict[str, float] = {}  # per target (source), the newest sample timestamp stored
        for key, sample in self._last.items():
            self._last_ts[key[0]] = max(self._last_ts.get(key[0], 0.0), sample.ts)
        self._lock = threading.Lock()

    def targets(self) -> list[Target]:
        return load_targets(self._urls, self._targets_file)

    def _fetch(self, target: Target) -> tuple[list[Series], float]:
        """The target's usage series and when they were read. A gateway that drained for a graceful stop says
        when its counters became final; its samples carry that time (they cannot have changed since), so a
        period that ended between its drain and this, its last scrape, gets every token it served."""
        response = self._http.get(target.url)
        response.raise_for_status()
        fetched = time.time()
        final = _FINAL_AT.search(response.text)
        at = min(fetched, float(final.group(1))) if final and float(final.group(1)) > 0 else fetched
        # Never before (or at) a sample already stored for this target: samples stay in time order (a drop would
        # read as a counter reset) and two scrapes after one drain keep distinct timestamps.
        at = max(at, self._last_ts.get(target.source, 0.0) + 0.001)
        self._last_ts[target.source] = at
        return parse_exposition(response.text, target.source, at), fetched

    def scrape_target(self, target: Target) -> bool:
        """One target, with retries; True when its samples were stored."""
        try:
            series, fetched = self._retry.run(
                f"scrape {target.url}",
                lambda: self._fetch(target),
                lambda ok: self._metrics.scrape(target.url, ok, time.time() if ok else None),
            )
        except SourceError as exc:
            log.error("%s", exc)
            self._store.scrape_failed(target.source, target.url, time.time(), str(exc))
            return False
        ts = fetched
        changed: dict[tuple[str, str, str, str, str], Series] = {}
        for one in series:
            key = (one.source, one.partner, one.model, one.unit, json.dumps(list(one.labels), separators=(",", ":")))
            sample = one.samples[0]
            last = self._last.get(key)
            if last is None or last.value != sample.value or last.created != sample.created:
                changed[key] = one
        self._store.add_samples(target.source, target.url, list(changed.values()), ts)
        self._last.update({key: one.samples[0] for key, one in changed.items()})  # only once stored
        return True

    def scrape_once(self) -> dict[str, bool]:
        """Scrapes every target once; returns each target URL's outcome."""
        with self._lock:
            return {target.url: self.scrape_target(target) for target in self.targets()}

    def run(self, stop: threading.Event, interval_s: float) -> None:
        while not stop.is_set():
            try:
                self.scrape_once()
            except Exception:  # a bug or the store away: log, keep scraping on the next tick
                log.exception("scrape cycle failed")
            stop.wait(interval_s)
