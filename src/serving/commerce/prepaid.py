"""Prepaid admission: a request of a prepaid plan holds its maximum cost in money before it runs and draws its
actual cost after, from the partner's credit grants, through the wallet (atomic across replicas with Redis).

The maximum cost is the price book's price for (plan, model, now) applied to the request's input tokens and the
most output it may produce (``max_tokens``); the actual cost applies the same price to what it used. Both are
exact integers of money units, and billing prices the same usage with the same book, so the invoice for a prepaid
partner equals what its balance was drawn, to the unit.

The grants a request may draw from are the partner's active grants (cached per partner for ``ttl_s``, like API
keys), each with its floor (what closed invoices drew), preceded by the plan's monthly allowance from the price
book as a grant of its own (``allowance-YYYY-MM``): an invoice credits the allowance before any grant, so the
wallet draws it first too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from serving.commerce.credits import CreditGrant, CreditStore
from serving.commerce.money import from_units, money, to_units
from serving.commerce.pricebook import Price, PriceBook
from serving.commerce.wallet import GrantUse, Wallet, WalletGrant
from serving.domain import Caller, Usage
from serving.errors import InsufficientCredit
from serving.quota.limiter import month_of

log = logging.getLogger("serving.prepaid")

_STALE_IF_ERROR_S = 300.0  # grants answered from an expired cache entry while the database is unreachable


@dataclass(frozen=True)
class Hold:
    """A request's held maximum cost: settled with the same price."""

    partner_id: str
    hold_id: str
    units: int
    price: Price


@dataclass(frozen=True)
class _Grants:
    loaded_at: float
    grants: list[CreditGrant]
    drawn: dict[str, Decimal]  # by closed invoices: the floor of each grant's use


def _month_bounds(at: float) -> tuple[float, float]:
    year, month = time.gmtime(at)[:2]
    start = time.mktime((year, month, 1, 0, 0, 0, 0, 0, 0)) - time.timezone
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return start, time.mktime((year, month, 1, 0, 0, 0, 0, 0, 0)) - time.timezone


class Prepaid:
    def __init__(
        self,
        book: PriceBook,
        credits: CreditStore,
        wallet: Wallet,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.book = book
        self.wallet = wallet
        self._credits = credits
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, _Grants] = {}
        self._loading: dict[str, asyncio.Future[_Grants]] = {}

    async def hold(self, caller: Caller, model: str, input_tokens: int, max_output_tokens: int, hold_id: str) -> Hold:
        """Holds the request's maximum cost or raises ``InsufficientCredit`` naming the balance."""
        now = self._clock()
        price = self.book.price(caller.plan.name, model, now)
        units = price.cost_units(input_tokens, max_output_tokens)
        grants = await self._wallet_grants(caller, now)
        reserved = await self.wallet.reserve(caller.partner_id, hold_id, units, grants)
        if not reserved.ok:
            balance, required = money(from_units(reserved.balance)), money(from_units(units))
            currency = self.book.currency
            raise InsufficientCredit(
                f"your prepaid balance of {balance} {currency} cannot cover this request's maximum cost of"
                f" {required} {currency} ({input_tokens} input tokens and up to {max_output_tokens} output tokens on"
                f" {model}); add credit, or lower max_tokens or the input",
                balance=balance,
                required=required,
                currency=currency,
            )
        return Hold(caller.partner_id, hold_id, units, price)

    async def settle(self, hold: Hold, usage: Usage) -> None:
        cost = hold.price.cost_units(usage.input_tokens, usage.output_tokens)
        if cost > hold.units:  # cannot happen (usage never exceeds what was reserved); never draw beyond the hold
            log.error(
                "hold %s: actual cost %d units above the %d held; drawing the hold", hold.hold_id, cost, hold.units
            )
            cost = hold.units
        await self.wallet.settle(hold.partner_id, hold.hold_id, cost)

    async def _wallet_grants(self, caller: Caller, now: float) -> list[WalletGrant]:
        state = await self._grants(caller.partner_id)
        grants = []
        allowance = self.book.terms_for(caller.plan.name, _month_bounds(now)[0]).monthly_allowance
        if allowance > 0:
            grants.append(WalletGrant(f"allowance-{month_of(now)}", to_units(allowance)))
        for grant in state.grants:
            if grant.active(now):
                floor = to_units(state.drawn.get(grant.id, Decimal(0)))
                grants.append(WalletGrant(grant.id, to_units(grant.amount), floor))
        return grants

    async def _grants(self, partner_id: str) -> _Grants:
        now = time.monotonic()
        cached = self._cache.get(partner_id)
        if cached is not None and now - cached.loaded_at < self._ttl_s:
            return cached
        loading = self._loading.get(partner_id)
        if loading is None:  # concurrent misses share one database read
            loading = asyncio.ensure_future(asyncio.to_thread(self._load, partner_id))
            self._loading[partner_id] = loading
            loading.add_done_callback(lambda _: self._loading.pop(partner_id, None))
        try:
            fresh = await asyncio.shield(loading)
        except Exception:
            if cached is not None and now - cached.loaded_at < _STALE_IF_ERROR_S:
                log.warning(
                    "credit grants of %s unreadable; using those read %.0f s ago", partner_id, now - cached.loaded_at
                )
                return cached
            raise
        self._cache[partner_id] = fresh
        return fresh

    def _load(self, partner_id: str) -> _Grants:
        return _Grants(time.monotonic(), self._credits.grants(partner_id), self._credits.drawn(partner_id))

    async def statement(self, caller: Caller) -> dict[str, Any]:
        """What ``GET /v1/credits`` shows: every grant with what is left, and the balance (active grants).

        Prepaid: what is left is the wallet's live state (use and holds in flight). Postpaid: what closed invoices
        drew; usage of the open period is drawn when its invoice closes."""
        now = self._clock()
        state = await asyncio.to_thread(self._load, caller.partner_id)
        live: dict[str, GrantUse] = await self.wallet.usage(caller.partner_id) if caller.plan.prepaid else {}
        rows, balance, held_total = [], Decimal(0), Decimal(0)
        for grant in state.grants:
            drawn = state.drawn.get(grant.id, Decimal(0))
            use = live.get(grant.id, GrantUse())
            used = max(from_units(use.used), drawn)
            held = from_units(use.held)
            remaining = max(grant.amount - used - held, Decimal(0))
            status = "active" if grant.active(now) else ("expired" if grant.granted_at <= now else "scheduled")
            if status == "active":
                balance += remaining
                held_total += held
            rows.append(
                {
                    "id": grant.id,
                    "kind": grant.kind.value,
                    "amount": money(grant.amount),
                    "used": money(used),
                    "held": money(held),
                    "remaining": money(remaining),
                    "priority": grant.priority,
                    "granted_at": int(grant.granted_at),
                    "expires_at": None if grant.expires_at is None else int(grant.expires_at),
                    "status": status,
                }
            )
        return {
            "object": "credit_balance",
            "partner": caller.partner_id,
            "currency": self.book.currency,
            "prepaid": caller.plan.prepaid,
            "balance": money(balance),
            "held": money(held_total),
            "grants": rows,
        }
