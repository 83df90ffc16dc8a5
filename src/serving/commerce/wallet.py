"""The prepaid wallet: per partner and grant, the money units used and held, changed only by reserve and settle.

``reserve`` takes the grants a request may draw from (in draw order, with their amounts and floors), how far closed
invoices account for the partner (``closed_through``), and the request's maximum cost. In one atomic step it frees
holds whose lease expired; raises each grant's use to its floor when the wallet's state is older than
``closed_through`` or missing (a new partner, a restarted process, a Redis that lost its data, a period closed since:
see ``serving.commerce.prepaid``); computes each grant's free amount (amount - used - held); and either refuses (the
free total cannot cover the cost) or holds the cost on the grants in order. ``settle`` turns a hold
into use for the actual cost, drawn from the held grants in the same order, and releases the rest. Both are
idempotent per hold id.

Two implementations share these semantics: ``MemoryWallet`` for one gateway process, ``RedisWallet``
(``serving.commerce.redis_wallet``) for replicas that share Redis. Nothing in between can let two replicas both
spend the last of a balance: the check and the hold are one step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class WalletGrant:
    """What reserve needs about a grant: its id, its amount and the floor of its use, in money units."""

    id: str
    amount: int
    floor: int = 0


@dataclass(frozen=True)
class Reserved:
    """A reserve's answer: held or refused; the free balance after it (refused: the free balance); what requests in
    flight hold on these grants; whether this call started the partner's use from the floors."""

    ok: bool
    balance: int
    held: int = 0
    seeded: bool = False


@dataclass(frozen=True)
class GrantUse:
    used: int = 0
    held: int = 0


class Wallet(Protocol):
    async def reserve(
        self, partner_id: str, hold_id: str, cost: int, grants: Sequence[WalletGrant], closed_through: int = 0
    ) -> Reserved: ...

    async def settle(self, partner_id: str, hold_id: str, cost: int) -> None:
        """Uses ``cost`` (at most what was held) from the hold's grants and releases the hold; a second settle of
        the same hold, or one after its lease expired, changes nothing."""
        ...

    async def usage(self, partner_id: str) -> dict[str, GrantUse] | None:
        """Use and holds per grant; None when the wallet holds nothing for the partner."""
        ...

    async def raise_floors(self, partner_id: str, floors: Sequence[WalletGrant]) -> None:
        """Raises each grant's use to its floor (after a reserve found the wallet empty with stale floors)."""
        ...

    async def close(self) -> None: ...


@dataclass
class _Partner:
    mark: int = -1  # the closed_through its floors were last applied for
    used: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    holds: dict[str, tuple[float, list[tuple[str, int]]]] = field(default_factory=dict)  # id -> (expiry, parts)


class MemoryWallet:
    """One process's wallet (the embedded default). Its state lives as long as the process: a restart starts
    every grant from its floor, what closed invoices drew (use in the open period is forgotten)."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._lease_s = lease_s
        self._clock = clock
        self._partners: dict[str, _Partner] = {}

    async def reserve(
        self, partner_id: str, hold_id: str, cost: int, grants: Sequence[WalletGrant], closed_through: int = 0
    ) -> Reserved:
        state = self._partners.setdefault(partner_id, _Partner())
        seeded = state.mark < closed_through
        if seeded:
            state.mark = closed_through
            for grant in grants:
                state.used[grant.id] = max(state.used.get(grant.id, 0), grant.floor)
        now = self._clock()
        for expired in [h for h, (until, _) in state.holds.items() if until <= now]:
            self._release(state, expired)
        left, balance, inflight, parts = cost, 0, 0, []
        for grant in grants:
            held = state.held.get(grant.id, 0)
            inflight += held
            free = grant.amount - state.used.get(grant.id, 0) - held
            if free <= 0:
                continue
            balance += free
            if left > 0:
                take = min(free, left)
                parts.append((grant.id, take))
                left -= take
        if hold_id in state.holds:
            return Reserved(True, balance, inflight, seeded)
        if left > 0:
            return Reserved(False, balance, inflight, seeded)
        for grant_id, take in parts:
            state.held[grant_id] = state.held.get(grant_id, 0) + take
        state.holds[hold_id] = (now + self._lease_s, parts)
        return Reserved(True, balance - cost, inflight + cost, seeded)

    def settle_now(self, partner_id: str, hold_id: str, cost: int) -> None:
        state = self._partners.get(partner_id)
        if state is None or hold_id not in state.holds:
            return
        left = cost
        for grant_id, held in state.holds[hold_id][1]:
            take = min(held, left)
            state.used[grant_id] = state.used.get(grant_id, 0) + take
            left -= take
        self._release(state, hold_id)

    async def settle(self, partner_id: str, hold_id: str, cost: int) -> None:
        self.settle_now(partner_id, hold_id, cost)

    @staticmethod
    def _release(state: _Partner, hold_id: str) -> None:
        for grant_id, held in state.holds.pop(hold_id)[1]:
            state.held[grant_id] -= held

    async def usage(self, partner_id: str) -> dict[str, GrantUse] | None:
        state = self._partners.get(partner_id)
        if state is None:
            return None
        now = self._clock()
        for expired in [h for h, (until, _) in state.holds.items() if until <= now]:
            self._release(state, expired)
        ids = set(state.used) | set(state.held)
        return {g: GrantUse(state.used.get(g, 0), state.held.get(g, 0)) for g in ids}

    async def raise_floors(self, partner_id: str, floors: Sequence[WalletGrant]) -> None:
        state = self._partners.setdefault(partner_id, _Partner())
        for grant in floors:
            state.used[grant.id] = max(state.used.get(grant.id, 0), grant.floor)

    async def close(self) -> None:
        return None
