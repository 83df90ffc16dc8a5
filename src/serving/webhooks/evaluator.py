"""Threshold crossings: compares each subscribed partner's month-to-date tokens (from the usage ledger) with its
plan's ``monthly_tokens``, and the money used of its active credit grants with what they granted, and creates the
events and deliveries that are missing.

Idempotent and safe to run on every replica at once: an event is unique per partner, metric, period and threshold
and a delivery per event and endpoint, so running it twice, or on two replicas, creates nothing twice. A run that
finds everything in place only reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from serving.webhooks.events import (
    CREDIT_BALANCE,
    MONTHLY_TOKENS,
    USAGE_THRESHOLD_CROSSED,
    CreditSnapshot,
    Period,
    balance_payload,
    new_event_id,
    periods_to_check,
    threshold_payload,
)
from serving.webhooks.store import Endpoint, Subscription, WebhookStore

# Tokens a partner used between two days, both inclusive ("YYYY-MM-DD", UTC): input plus output, every status.
PeriodUsage = Callable[[str, str, str], int]

PREVIOUS_PERIOD_LOOKBACK_S = 86_400.0  # last month's crossings are still found during the first day of a month


class Evaluator:
    def __init__(self, store: WebhookStore, usage: PeriodUsage, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._usage = usage
        self._clock = clock

    def run(self, balances: Mapping[str, CreditSnapshot] | None = None) -> int:
        """One evaluation of every subscribed partner (blocking: database reads); returns the deliveries created.
        ``balances``: per partner with active credit grants, what they granted and what is used of them."""
        now = self._clock()
        created = 0
        for sub in self._store.subscriptions():
            if sub.monthly_tokens > 0:  # an unlimited plan has no budget to take a percentage of
                for period in periods_to_check(now, PREVIOUS_PERIOD_LOOKBACK_S):
                    created += self._evaluate(sub, period, now)
            snapshot = (balances or {}).get(sub.partner_id)
            if snapshot is not None and snapshot.granted > 0:
                created += self._evaluate_balance(sub, snapshot, now)
        return created

    def _evaluate_balance(self, sub: Subscription, snapshot: CreditSnapshot, now: float) -> int:
        wanted = sorted({t for e in sub.endpoints for t in e.thresholds})
        crossed = [t for t in wanted if snapshot.used * 100 >= t * snapshot.granted]

        def payload(event_id: str, threshold: int) -> str:
            return balance_payload(event_id, sub.partner_id, sub.plan, snapshot, threshold, now)

        return self._raise(sub, sub.endpoints, CREDIT_BALANCE, snapshot.period, crossed, payload, now)

    def _evaluate(self, sub: Subscription, period: Period, now: float) -> int:
        # An endpoint hears of the periods that ended after it was registered, never of older ones.
        endpoints = [e for e in sub.endpoints if e.created_at < period.end_ts]
        wanted = sorted({t for e in endpoints for t in e.thresholds})
        if not wanted:
            return 0
        used = self._usage(sub.partner_id, period.first_day, period.last_day)
        budget = sub.monthly_tokens
        crossed = [t for t in wanted if used * 100 >= t * budget]

        def payload(event_id: str, threshold: int) -> str:
            return threshold_payload(
                event_id, sub.partner_id, sub.plan, MONTHLY_TOKENS, period, threshold, used, budget, now
            )

        return self._raise(sub, endpoints, MONTHLY_TOKENS, period.name, crossed, payload, now)

    def _raise(
        self,
        sub: Subscription,
        endpoints: list[Endpoint],
        metric: str,
        period: str,
        crossed: list[int],
        payload: Callable[[str, int], str],
        now: float,
    ) -> int:
        """The events of the crossed thresholds that are missing, and their deliveries to ``endpoints``."""
        if not crossed:
            return 0
        events = self._store.events(sub.partner_id, metric, period)
        missing = [t for t in crossed if t not in events]
        for threshold in missing:
            event_id = new_event_id()
            body = payload(event_id, threshold)
            self._store.add_event(
                event_id, sub.partner_id, USAGE_THRESHOLD_CROSSED, metric, period, threshold, body, now
            )
        if missing:  # another replica may have created some of them first: its ids count
            events = self._store.events(sub.partner_id, metric, period)
        have = self._store.delivery_pairs([events[t] for t in crossed])
        created = 0
        for endpoint in endpoints:
            for threshold in endpoint.thresholds:
                if threshold in crossed and (events[threshold], endpoint.id) not in have:
                    created += self._store.add_delivery(events[threshold], endpoint.id, sub.partner_id, now)
        return created
