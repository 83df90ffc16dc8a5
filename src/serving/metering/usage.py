"""Usage queries for the partner-facing usage API; always scoped to one partner."""

from __future__ import annotations

from dataclasses import dataclass

from serving.storage.database import Database


@dataclass(frozen=True)
class UsageRow:
    day: str
    model: str
    operation: str
    requests: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class UsageReport:
    partner_id: str
    start_day: str
    end_day: str
    rows: list[UsageRow]


def usage_by_day(db: Database, partner_id: str, start_day: str, end_day: str) -> list[UsageRow]:
    rows = db.query(
        "SELECT day, model, operation, COUNT(*), SUM(input_tokens), SUM(output_tokens) FROM usage_records"
        " WHERE partner_id = ? AND day >= ? AND day <= ? GROUP BY day, model, operation ORDER BY day, model, operation",
        (partner_id, start_day, end_day),
    )
    return [UsageRow(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5])) for r in rows]


def tokens_between(db: Database, partner_id: str, start_day: str, end_day: str) -> int:
    """Input plus output tokens the partner used from ``start_day`` to ``end_day`` (inclusive, UTC): what the plan's
    monthly budget counts, read from the ledger (the usage alerts compare it with the budget)."""
    row = db.one(
        "SELECT COALESCE(SUM(input_tokens + output_tokens), 0) FROM usage_records"
        " WHERE partner_id = ? AND day >= ? AND day <= ?",
        (partner_id, start_day, end_day),
    )
    return 0 if row is None else int(row[0])


@dataclass(frozen=True)
class SpendRow:
    month: str  # "YYYY-MM" of the records' day
    model: str
    requests: int
    input_tokens: int
    output_tokens: int


def spend_since(db: Database, partner_id: str, since: float) -> list[SpendRow]:
    """The partner's usage finished at or after ``since``, per month and model (what a prepaid wallet that lost its
    state re-derives its use from)."""
    rows = db.query(
        "SELECT SUBSTR(day, 1, 7), model, COUNT(*), SUM(input_tokens), SUM(output_tokens) FROM usage_records"
        " WHERE partner_id = ? AND finished_at >= ? GROUP BY SUBSTR(day, 1, 7), model",
        (partner_id, since),
    )
    return [SpendRow(str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows]
