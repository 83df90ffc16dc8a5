"""Credit grants: money a partner may spend before paying, purchased or promotional, each with an amount, a priority
(lower is drawn first) and an optional expiry. They live in the partner database, written through the admin API or
CLI (audited) and read by the gateway (prepaid admission, ``GET /v1/credits``) and by billing (invoices).

Grants are drawn in one order everywhere: priority, then the soonest expiry (none last), then the oldest grant. A
postpaid partner's grants are drawn when an invoice closes (``credit_draws``, one row per period and grant); a
prepaid partner's are drawn request by request at the gateway (``serving.commerce.wallet``), and the closing
invoice records the same amounts.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from serving.storage.database import Database


class CreditKind(enum.StrEnum):
    PURCHASED = "purchased"
    PROMOTIONAL = "promotional"


class CreditError(ValueError):
    """A grant that cannot be made (bad kind, amount, priority or expiry)."""


@dataclass(frozen=True)
class CreditGrant:
    id: str
    partner_id: str
    kind: CreditKind
    amount: Decimal
    priority: int
    granted_at: float
    expires_at: float | None
    note: str = ""
    granted_by: str = ""

    def order(self) -> tuple[int, float, float, str]:
        """The draw order: priority, soonest expiry (none last), oldest, id."""
        return (self.priority, self.expires_at or float("inf"), self.granted_at, self.id)

    def active(self, at: float) -> bool:
        """Granted by ``at`` and not expired at ``at``."""
        return self.granted_at <= at and (self.expires_at is None or at < self.expires_at)

    def covers(self, start: float, end: float) -> bool:
        """Usable for usage in ``[start, end)``: granted before its end and not expired at its start."""
        return self.granted_at < end and (self.expires_at is None or self.expires_at > start)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "partner_id": self.partner_id,
            "kind": self.kind.value,
            "amount": str(self.amount),
            "priority": self.priority,
            "granted_at": self.granted_at,
            "expires_at": self.expires_at,
            "note": self.note,
            "granted_by": self.granted_by,
        }


_COLUMNS = "id, partner_id, kind, amount, priority, granted_at, expires_at, note, granted_by"


def _grant(row: Sequence[Any]) -> CreditGrant:
    expires = None if row[6] is None else float(row[6])
    return CreditGrant(
        str(row[0]), str(row[1]), CreditKind(row[2]), Decimal(row[3]), int(row[4]), float(row[5]), expires,
        str(row[7]), str(row[8]),
    )  # fmt: skip


def allocate(available: Iterable[tuple[str, Decimal]], amount: Decimal) -> list[tuple[str, Decimal]]:
    """Draws ``amount`` from ``(grant id, available)`` pairs in the order given: each grant as far as it goes.
    The result names only grants drawn from; their sum is ``min(amount, total available)``."""
    drawn: list[tuple[str, Decimal]] = []
    left = amount
    for grant_id, free in available:
        if left <= 0:
            break
        take = min(free, left)
        if take > 0:
            drawn.append((grant_id, take))
            left -= take
    return drawn


class CreditStore:
    """Blocking (database calls)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def grant(
        self,
        partner_id: str,
        kind: str,
        amount: Decimal,
        *,
        priority: int = 100,
        expires_at: float | None = None,
        note: str = "",
        granted_by: str = "",
        now: float | None = None,
    ) -> CreditGrant:
        """Records a grant (the caller checked the partner and the amount); ``priority`` lower is drawn first."""
        try:
            credit_kind = CreditKind(kind)
        except ValueError as exc:
            kinds = ", ".join(k.value for k in CreditKind)
            raise CreditError(f"kind must be one of {kinds}; got {kind!r}") from exc
        if not 0 <= priority <= 1_000_000:
            raise CreditError(f"priority must be in 0..1000000 (lower is drawn first); got {priority}")
        granted_at = time.time() if now is None else now
        if expires_at is not None and expires_at <= granted_at:
            raise CreditError("expires_at must be in the future")
        grant = CreditGrant(
            f"cg_{uuid.uuid4().hex[:16]}", partner_id, credit_kind, amount, priority, granted_at, expires_at,
            note, granted_by,
        )  # fmt: skip
        self.db.execute(
            f"INSERT INTO credit_grants ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (grant.id, partner_id, credit_kind.value, str(amount), priority, granted_at, expires_at, note, granted_by),
        )
        return grant

    def grants(self, partner_id: str | None = None) -> list[CreditGrant]:
        """A partner's grants (None: everyone's), in draw order."""
        if partner_id is None:
            rows = self.db.query(f"SELECT {_COLUMNS} FROM credit_grants")
        else:
            rows = self.db.query(f"SELECT {_COLUMNS} FROM credit_grants WHERE partner_id = ?", (partner_id,))
        return sorted((_grant(row) for row in rows), key=CreditGrant.order)

    def drawn(self, partner_id: str | None = None, *, except_period: str | None = None) -> dict[str, Decimal]:
        """Grant id → what closed invoices drew from it (``except_period``: leave that period's draws out)."""
        sql, params = "SELECT grant_id, amount FROM credit_draws WHERE period <> ?", [except_period or ""]
        if partner_id is not None:
            sql += " AND partner_id = ?"
            params.append(partner_id)
        totals: dict[str, Decimal] = {}
        for grant_id, amount in self.db.query(sql, params):
            totals[str(grant_id)] = totals.get(str(grant_id), Decimal(0)) + Decimal(amount)
        return totals

    def closed_through(self, partner_id: str) -> float:
        """The end of the latest closed period that invoiced the partner (0: none): closed invoices account for its
        usage up to there."""
        row = self.db.one("SELECT MAX(period_end) FROM credit_closes WHERE partner_id = ?", (partner_id,))
        return 0.0 if row is None or row[0] is None else float(row[0])

    def record_close(
        self, period: str, period_end: float, partners: Iterable[str], draws: Iterable[tuple[str, str, Decimal]]
    ) -> None:
        """The partners the invoices of ``period`` (ending at ``period_end``) covered, and ``(partner, grant,
        amount)`` they drew, replacing what an earlier, unfinished close of the same period wrote (a close retried
        after a crash computes its draws without this period's own rows: the same amounts unless grants changed)."""
        closes = [(period, partner_id, period_end) for partner_id in partners]
        rows = [(period, grant_id, partner_id, str(amount), period_end) for partner_id, grant_id, amount in draws]
        with self.db.transaction():
            self.db.execute("DELETE FROM credit_draws WHERE period = ?", (period,))
            self.db.execute("DELETE FROM credit_closes WHERE period = ?", (period,))
            self.db.executemany("INSERT INTO credit_closes (period, partner_id, period_end) VALUES (?, ?, ?)", closes)
            self.db.executemany(
                "INSERT INTO credit_draws (period, grant_id, partner_id, amount, period_end) VALUES (?, ?, ?, ?, ?)",
                rows,
            )
