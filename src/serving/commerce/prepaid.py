"""Prepaid admission: a request of a prepaid plan holds its maximum cost in money before it runs and draws its
actual cost after, from the partner's credit grants, through the wallet (atomic across replicas with Redis).

The maximum cost is the price book's price for (plan, model, now) applied to the request's input tokens and the
most output it may produce (``max_tokens``); the actual cost applies the same price to what it used. Both are
exact integers of money units, and billing prices the same usage with the same book, so the invoice for a prepaid
partner equals what its balance was drawn, to the unit. A request refused before it ran (shed by the fair queue,
turned away by the model) draws nothing: it is not metered or invoiced either.

The grants a request may draw from are the partner's active grants (cached per partner for ``ttl_s``, like API
keys), preceded by the plan's monthly allowance from the price book as a grant of its own (``allowance-YYYY-MM``):
an invoice credits the allowance before any grant, so the wallet draws it first too.

Each grant goes with a floor: what closed invoices drew from it, plus the ledger's usage since the last period
closed for the partner, month by month (that month's allowance first, then the grants usable in that month, in
order). The wallet raises its use to the floors when it has no state for the partner (the in-process wallet after a
restart, a Redis that lost its data) or a period has closed since it last did (invoices also draw credits for
what the wallet never saw: a postpaid month, the commitment top-up), so it resumes from the durable ledger and the
invoices instead of handing spend back. Floors are computed once per partner and close, per process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from serving.commerce.credits import CreditGrant, CreditStore, allocate
from serving.commerce.money import from_units, money, to_units
from serving.commerce.pricebook import Price, PriceBook, PricingError
from serving.commerce.wallet import GrantUse, Wallet, WalletGrant
from serving.domain import Caller, Usage
from serving.errors import InsufficientCredit, PermissionDenied, QuotaExceeded
from serving.metering.usage import SpendRow
from serving.plans import Plan
from serving.quota.limiter import month_of

log = logging.getLogger("serving.prepaid")

# The partner's ledger usage finished at or after a time, per month and model.
LedgerSpend = Callable[[str, float], list[SpendRow]]

_STALE_IF_ERROR_S = 300.0  # grants answered from an expired cache entry while the database is unreachable
_RESEED_AFTER_S = 10.0  # floors older than this are recomputed when a wallet is found empty


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
    drawn: dict[str, Decimal]  # by closed invoices
    closed_through: float  # closed invoices account for the partner's usage up to here


@dataclass(frozen=True)
class _Floors:
    computed_at: float  # monotonic
    closed_through: float
    units: dict[str, int]


def _month_start(at: float) -> float:
    year, month = time.gmtime(at)[:2]
    return time.mktime((year, month, 1, 0, 0, 0, 0, 0, 0)) - time.timezone


def _month_bounds(month: str) -> tuple[float, float]:
    """``"2026-12"`` → its start and the next month's, Unix seconds (UTC)."""
    year, number = (int(part) for part in month.split("-"))
    start = time.mktime((year, number, 1, 0, 0, 0, 0, 0, 0)) - time.timezone
    year, number = (year + 1, 1) if number == 12 else (year, number + 1)
    return start, time.mktime((year, number, 1, 0, 0, 0, 0, 0, 0)) - time.timezone


class Prepaid:
    def __init__(
        self,
        book: PriceBook,
        credits: CreditStore,
        wallet: Wallet,
        ttl_s: float,
        ledger_spend: LedgerSpend | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``ledger_spend``: where a partner's use since the last closed period is re-derived from (None: closed
        draws alone are the floors)."""
        self.book = book
        self.wallet = wallet
        self._credits = credits
        self._ledger_spend = ledger_spend
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[str, _Grants] = {}
        self._loading: dict[str, asyncio.Future[_Grants]] = {}
        self._floors: dict[str, _Floors] = {}  # per partner, computed once per close (again after a wallet loss)
        self._computing: dict[str, asyncio.Future[_Floors]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._allowances: dict[tuple[str, str], WalletGrant | None] = {}

    def price(self, plan: Plan, model: str, now: float) -> Price:
        try:
            return self.book.price(plan.name, model, now)
        except PricingError as exc:
            raise PermissionDenied(
                f"model {model!r} has no price for plan {plan.name!r}, and a prepaid plan can only call priced models",
                param="model",
            ) from exc

    async def hold(self, caller: Caller, model: str, input_tokens: int, max_output_tokens: int, hold_id: str) -> Hold:
        """Holds the request's maximum cost. Refuses with ``InsufficientCredit`` (402, naming the balance) when the
        balance cannot cover it, or with a retryable ``QuotaExceeded`` when it could once requests in flight settle
        (they hold their maximum cost until then)."""
        now = self._clock()
        price = self.price(caller.plan, model, now)
        units = price.cost_units(input_tokens, max_output_tokens)
        grants, closed_through = await self._wallet_grants(caller, now)
        reserved = await self.wallet.reserve(caller.partner_id, hold_id, units, grants, closed_through)
        if reserved.seeded:
            self._reseed_if_stale(caller)
        if reserved.ok:
            return Hold(caller.partner_id, hold_id, units, price)
        balance, required, currency = money(from_units(reserved.balance)), money(from_units(units)), self.book.currency
        what = f"{input_tokens} input tokens and up to {max_output_tokens} output tokens on {model}"
        if reserved.balance + reserved.held >= units:
            raise QuotaExceeded(
                f"your prepaid balance of {balance} {currency} cannot cover this request's maximum cost of {required}"
                f" {currency} ({what}) while {money(from_units(reserved.held))} {currency} is held by your requests in"
                " flight; retry when they finish",
                param="balance_held",
                retry_after_s=1.0,
            )
        raise InsufficientCredit(
            f"your prepaid balance of {balance} {currency} cannot cover this request's maximum cost of {required}"
            f" {currency} ({what}); add credit, or lower max_tokens or the input",
            balance=balance,
            required=required,
            currency=currency,
        )

    async def settle(self, hold: Hold, usage: Usage, admitted: bool = True) -> None:
        """Draws the actual cost (``admitted`` False: the request was refused before it ran, it draws nothing)."""
        await self.wallet.settle(hold.partner_id, hold.hold_id, self._cost(hold, usage, admitted))

    def settle_now(self, hold: Hold, usage: Usage, admitted: bool = True) -> bool:
        """``settle`` without a task when the wallet is in-process; False: it is not, call ``settle``."""
        settle_now = getattr(self.wallet, "settle_now", None)
        if settle_now is None:
            return False
        settle_now(hold.partner_id, hold.hold_id, self._cost(hold, usage, admitted))
        return True

    @staticmethod
    def _cost(hold: Hold, usage: Usage, admitted: bool) -> int:
        cost = hold.price.cost_units(usage.input_tokens, usage.output_tokens) if admitted else 0
        if cost > hold.units:  # cannot happen (usage never exceeds what was reserved); never draw beyond the hold
            log.error("hold %s: cost %d units above the %d held; drawing the hold", hold.hold_id, cost, hold.units)
            cost = hold.units
        return cost

    async def release(self, partner_id: str, hold_id: str) -> None:
        """Frees a hold whose reserve may or may not have been applied (a lost reply, a cancel): idempotent."""
        await self.wallet.settle(partner_id, hold_id, 0)

    # --- grants and floors --------------------------------------------------------------------------------

    def _allowance(self, plan: Plan, now: float) -> WalletGrant | None:
        month = month_of(now)
        key = (plan.name, month)
        if key not in self._allowances:  # the terms in effect at the month's start: one lookup per plan and month
            allowance = self.book.terms_for(plan.name, _month_start(now)).monthly_allowance
            self._allowances[key] = WalletGrant(f"allowance-{month}", to_units(allowance)) if allowance > 0 else None
        return self._allowances[key]

    async def _wallet_grants(self, caller: Caller, now: float) -> tuple[list[WalletGrant], int]:
        """The grants the request may draw from, with their floors, and how far closed invoices go (whole seconds)."""
        state = await self._grants(caller.partner_id)
        floors = await self._floors_of(caller, state)
        allowance = self._allowance(caller.plan, now)
        grants = [] if allowance is None else [WalletGrant(allowance.id, allowance.amount, floors.get(allowance.id, 0))]
        for grant in state.grants:
            if grant.active(now):
                grants.append(WalletGrant(grant.id, to_units(grant.amount), floors.get(grant.id, 0)))
        return grants, int(state.closed_through)

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
                age = now - cached.loaded_at
                log.warning("credit grants of %s unreadable; using those read %.0f s ago", partner_id, age)
                return cached
            raise
        self._cache[partner_id] = fresh
        return fresh

    def _load(self, partner_id: str) -> _Grants:
        credits = self._credits
        grants, drawn, closed = (
            credits.grants(partner_id),
            credits.drawn(partner_id),
            credits.closed_through(partner_id),
        )
        return _Grants(time.monotonic(), grants, drawn, closed)

    async def _floors_of(self, caller: Caller, state: _Grants) -> dict[str, int]:
        """The floors for the partner's last close: computed once per close (concurrent first requests share it)."""
        partner_id = caller.partner_id
        known = self._floors.get(partner_id)
        if known is not None and known.closed_through == state.closed_through:
            return known.units
        computing = self._computing.get(partner_id)
        if computing is None:
            computing = asyncio.ensure_future(asyncio.to_thread(self._compute_floors, partner_id, caller.plan, state))
            self._computing[partner_id] = computing
            computing.add_done_callback(lambda _: self._computing.pop(partner_id, None))
        fresh = await asyncio.shield(computing)
        self._floors[partner_id] = fresh
        return fresh.units

    def _reseed_if_stale(self, caller: Caller) -> None:
        """The wallet had no state for this partner and started from the floors: when those were not computed just
        now (Redis lost its data while this process ran), compute them again and raise the wallet's use to them."""
        known = self._floors.get(caller.partner_id)
        if known is not None and time.monotonic() - known.computed_at < _RESEED_AFTER_S:
            return

        async def reseed() -> None:
            try:
                state = await self._grants(caller.partner_id)
                fresh = await asyncio.to_thread(self._compute_floors, caller.partner_id, caller.plan, state)
                raised = [WalletGrant(grant_id, 0, units) for grant_id, units in fresh.units.items()]
                await self.wallet.raise_floors(caller.partner_id, raised)
            except Exception:
                log.exception("prepaid floors of %s not raised after the wallet lost its state", caller.partner_id)
                return
            self._floors[caller.partner_id] = fresh  # only once the wallet has them

        task = asyncio.get_running_loop().create_task(reseed())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _compute_floors(self, partner_id: str, plan: Plan, state: _Grants) -> _Floors:
        """Closed draws, plus the ledger's usage since the last close, priced and drawn month by month as the wallet
        would: that month's allowance first, then the grants usable in that month, in order, as far as each goes."""
        floors = {grant_id: to_units(amount) for grant_id, amount in state.drawn.items()}
        if self._ledger_spend is None:
            return _Floors(time.monotonic(), state.closed_through, floors)
        now = self._clock()
        spent: dict[str, int] = {}
        for row in self._ledger_spend(partner_id, state.closed_through):
            try:
                price = self.book.price(plan.name, row.model, now)
            except PricingError:
                continue  # not priced: never admitted on a prepaid plan
            spent[row.month] = spent.get(row.month, 0) + price.cost_units(
                row.input_tokens, row.output_tokens, row.requests
            )
        left = {g.id: to_units(g.amount) - floors.get(g.id, 0) for g in state.grants}
        for month in sorted(spent):
            start, end = _month_bounds(month)
            amount = spent[month]
            allowance = self._allowance(plan, start)
            if allowance is not None:
                floors[allowance.id] = min(allowance.amount, amount)
                amount -= floors[allowance.id]
            usable = [(g.id, Decimal(left[g.id])) for g in state.grants if g.covers(start, end) and left[g.id] > 0]
            for grant_id, drawn in allocate(usable, Decimal(amount)):
                floors[grant_id] = floors.get(grant_id, 0) + int(drawn)
                left[grant_id] -= int(drawn)
        if spent:
            log.info("prepaid floors of %s from closed draws and the ledger: %s", partner_id, floors)
        return _Floors(time.monotonic(), state.closed_through, floors)

    async def close(self) -> None:
        """Waits for floors being raised in the background (before the databases close)."""
        await asyncio.gather(*self._background, return_exceptions=True)

    async def used_of_grants(self, caller: Caller) -> tuple[list[str], Decimal, Decimal] | None:
        """The partner's active grants (allowance aside): their ids, what is used of them and what they granted;
        None when it has none (what balance alerts compare)."""
        statement = await self.statement(caller)
        active = [g for g in statement["grants"] if g["status"] == "active" and g["kind"] != "allowance"]
        if not active:
            return None
        used = sum((Decimal(g["used"]) for g in active), Decimal(0))
        return [g["id"] for g in active], used, sum((Decimal(g["amount"]) for g in active), Decimal(0))

    # --- the partner's view -------------------------------------------------------------------------------

    async def statement(self, caller: Caller) -> dict[str, Any]:
        """What ``GET /v1/credits`` shows: every grant with what is left of it, and the balance (active grants).

        Prepaid: live from the wallet (use, and holds of requests in flight), the month's allowance included.
        Postpaid: as of the last closed invoice; the open period's usage is drawn when its invoice closes."""
        now = self._clock()
        state = await asyncio.to_thread(self._load, caller.partner_id)
        grants: list[tuple[str, str, Decimal, int, float, float | None]] = [
            (g.id, g.kind.value, g.amount, g.priority, g.granted_at, g.expires_at) for g in state.grants
        ]
        live: dict[str, GrantUse] | None = None
        floors = {grant_id: to_units(amount) for grant_id, amount in state.drawn.items()}
        if caller.plan.prepaid:
            allowance = self._allowance(caller.plan, now)
            if allowance is not None:
                grants.insert(0, (allowance.id, "allowance", from_units(allowance.amount), -1, _month_start(now), None))
            live = await self.wallet.usage(caller.partner_id)
            if live is None:  # the wallet has no state for the partner yet: it would start from the floors
                floors = await self._floors_of(caller, state)
        rows, balance, held_total = [], Decimal(0), Decimal(0)
        for grant_id, kind, amount, priority, granted_at, expires_at in grants:
            use = GrantUse(floors.get(grant_id, 0)) if live is None else live.get(grant_id, GrantUse())
            used, held = from_units(use.used), from_units(use.held)
            remaining = max(amount - used - held, Decimal(0))
            active = granted_at <= now and (expires_at is None or now < expires_at)
            status = "active" if active else ("expired" if granted_at <= now else "scheduled")
            if active:
                balance += remaining
                held_total += held
            rows.append(
                {
                    "id": grant_id,
                    "kind": kind,
                    "amount": money(amount),
                    "used": money(used),
                    "held": money(held),
                    "remaining": money(remaining),
                    "priority": priority,
                    "granted_at": int(granted_at),
                    "expires_at": None if expires_at is None else int(expires_at),
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
