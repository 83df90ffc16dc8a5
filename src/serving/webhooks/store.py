"""Webhook endpoints, events, deliveries and attempts in the partner database (migration 5).

Several gateway replicas share these tables, and the database alone keeps them apart:

- an event is unique per partner, metric, period and threshold (``ON CONFLICT DO NOTHING``): whichever replica sees
  a crossing first creates it, the others find it;
- a delivery is unique per event and endpoint;
- a replica sends a delivery only after a conditional ``UPDATE`` gave it the lease (``lease_owner``,
  ``lease_until``): one statement on one row, atomic on SQLite and PostgreSQL alike, so two replicas never send the
  same delivery at the same time. A lease outlives an attempt (its timeout plus a margin); a replica that dies
  mid-attempt leaves a lease that expires, and another replica tries that delivery again.

Statuses: ``pending`` (waiting for its next attempt), ``delivered`` (a 2xx answer), ``failed`` (every attempt of its
series failed; a replay starts a new series) and ``cancelled`` (its endpoint was deleted before it was delivered).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from serving.errors import InvalidInput, NotFound, RequestInProgress
from serving.storage.database import Database
from serving.storage.migrations import migrate

PENDING, DELIVERED, FAILED, CANCELLED = "pending", "delivered", "failed", "cancelled"
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Endpoint:
    id: str
    partner_id: str
    url: str
    thresholds: tuple[int, ...]
    created_at: float


@dataclass(frozen=True)
class Subscription:
    """A partner with active endpoints, and its plan's budget."""

    partner_id: str
    plan: str
    monthly_tokens: int
    endpoints: list[Endpoint]
    prepaid: bool = False


@dataclass(frozen=True)
class Claimed:
    """A delivery this replica holds the lease of: everything one attempt needs."""

    delivery_id: str
    event_id: str
    url: str
    secret: str
    payload: str
    attempt: int  # this attempt's number, counting every attempt of the delivery (replays included)
    series_start: int  # attempts made before the current series (a replay starts a new one)


@dataclass(frozen=True)
class Attempt:
    number: int
    started_at: float
    duration_ms: float
    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class Delivery:
    id: str
    event_id: str
    endpoint_id: str
    status: str
    attempts: int
    next_attempt_at: float | None  # only while pending
    last_status_code: int | None
    last_error: str | None
    created_at: float
    delivered_at: float | None
    event: dict[str, Any]
    attempt_log: list[Attempt] = field(default_factory=list)


def _endpoint(row: tuple[Any, ...]) -> Endpoint:
    """From ``id, partner_id, url, thresholds, created_at``."""
    return Endpoint(str(row[0]), str(row[1]), str(row[2]), tuple(json.loads(row[3])), float(row[4]))


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _in(values: list[str]) -> str:
    return ", ".join("?" for _ in values)


_ENDPOINT_COLUMNS = "e.id, e.partner_id, e.url, e.thresholds, e.created_at"
_DELIVERY_COLUMNS = (
    "d.id, d.event_id, d.endpoint_id, d.status, d.attempts, d.next_attempt_at, d.last_status_code, d.last_error,"
    " d.created_at, d.delivered_at, ev.payload"
)


class WebhookStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        migrate(db)

    # --- endpoints ------------------------------------------------------------------------------------

    def create_endpoint(
        self, partner_id: str, url: str, thresholds: tuple[int, ...], secret: str, max_endpoints: int, now: float
    ) -> Endpoint:
        endpoint = Endpoint(f"wh_{uuid.uuid4().hex[:16]}", partner_id, url, thresholds, now)
        with self.db.transaction():
            if self.db.is_postgres:  # two registrations at once must not both pass the count (SQLite: one writer)
                self.db.query("SELECT id FROM partners WHERE id = ? FOR UPDATE", (partner_id,))
            row = self.db.one(
                "SELECT COUNT(*) FROM webhook_endpoints WHERE partner_id = ? AND deleted_at IS NULL", (partner_id,)
            )
            if row is not None and int(row[0]) >= max_endpoints:
                raise InvalidInput(
                    f"you have {max_endpoints} webhook endpoints, the most a partner may have; delete one first",
                    param="url",
                )
            self.db.execute(
                "INSERT INTO webhook_endpoints (id, partner_id, url, thresholds, secret, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (endpoint.id, partner_id, url, json.dumps(list(thresholds)), secret, now),
            )
        return endpoint

    def endpoints(self, partner_id: str) -> list[Endpoint]:
        rows = self.db.query(
            f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints e WHERE e.partner_id = ? AND e.deleted_at IS NULL"
            " ORDER BY e.created_at, e.id",
            (partner_id,),
        )
        return [_endpoint(row) for row in rows]

    def endpoint(self, partner_id: str, endpoint_id: str) -> Endpoint:
        """The partner's active endpoint; ``NotFound`` for another partner's as for one that does not exist."""
        row = self.db.one(
            f"SELECT {_ENDPOINT_COLUMNS} FROM webhook_endpoints e WHERE e.id = ? AND e.partner_id = ?"
            " AND e.deleted_at IS NULL",
            (endpoint_id, partner_id),
        )
        if row is None:
            raise NotFound(f"you have no webhook endpoint {endpoint_id!r}", param="endpoint_id")
        return _endpoint(row)

    def delete_endpoint(self, partner_id: str, endpoint_id: str, now: float) -> None:
        """Deletes the endpoint (its secret is wiped; the row stays for its deliveries' history) and cancels its
        deliveries still pending."""
        with self.db.transaction():
            changed = self.db.execute(
                "UPDATE webhook_endpoints SET deleted_at = ?, secret = '' WHERE id = ? AND partner_id = ?"
                " AND deleted_at IS NULL",
                (now, endpoint_id, partner_id),
            )
            if not changed:
                raise NotFound(f"you have no webhook endpoint {endpoint_id!r}", param="endpoint_id")
            self.db.execute(
                "UPDATE webhook_deliveries SET status = ?, lease_owner = NULL, lease_until = NULL"
                " WHERE endpoint_id = ? AND status = ?",
                (CANCELLED, endpoint_id, PENDING),
            )

    def subscriptions(self) -> list[Subscription]:
        """Every partner with active endpoints, with its plan's monthly budget."""
        rows = self.db.query(
            f"SELECT {_ENDPOINT_COLUMNS}, pl.name, pl.monthly_tokens, pl.prepaid FROM webhook_endpoints e"
            " JOIN partners p ON p.id = e.partner_id JOIN plans pl ON pl.name = p.plan"
            " WHERE e.deleted_at IS NULL ORDER BY e.partner_id, e.created_at, e.id"
        )
        subscriptions: dict[str, Subscription] = {}
        for row in rows:
            endpoint = _endpoint(row)
            partner_id = endpoint.partner_id
            if partner_id not in subscriptions:
                subscriptions[partner_id] = Subscription(partner_id, str(row[5]), int(row[6]), [], bool(row[7]))
            subscriptions[partner_id].endpoints.append(endpoint)
        return list(subscriptions.values())

    # --- events and deliveries ------------------------------------------------------------------------

    def events(self, partner_id: str, metric: str, period: str) -> dict[int, str]:
        """The partner's events of one metric and period: threshold → event id."""
        rows = self.db.query(
            "SELECT threshold, id FROM webhook_events WHERE partner_id = ? AND metric = ? AND period = ?",
            (partner_id, metric, period),
        )
        return {int(row[0]): str(row[1]) for row in rows}

    def add_event(
        self,
        event_id: str,
        partner_id: str,
        type_: str,
        metric: str,
        period: str,
        threshold: int,
        payload: str,
        now: float,
    ) -> bool:
        """Creates the event unless one exists for its partner, metric, period and threshold; True if created."""
        return (
            self.db.execute(
                "INSERT INTO webhook_events (id, partner_id, type, metric, period, threshold, payload, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (partner_id, metric, period, threshold) DO NOTHING",
                (event_id, partner_id, type_, metric, period, threshold, payload, now),
            )
            > 0
        )

    def delivery_pairs(self, event_ids: list[str]) -> set[tuple[str, str]]:
        """(event id, endpoint id) of the deliveries these events already have."""
        if not event_ids:
            return set()
        rows = self.db.query(
            f"SELECT event_id, endpoint_id FROM webhook_deliveries WHERE event_id IN ({_in(event_ids)})", event_ids
        )
        return {(str(row[0]), str(row[1])) for row in rows}

    def add_delivery(self, event_id: str, endpoint_id: str, partner_id: str, now: float) -> bool:
        """A delivery of the event to the endpoint, due now, unless it exists; True if created."""
        return (
            self.db.execute(
                "INSERT INTO webhook_deliveries (id, event_id, endpoint_id, partner_id, status, attempts, series_start,"
                " next_attempt_at, created_at) VALUES (?, ?, ?, ?, ?, 0, 0, ?, ?)"
                " ON CONFLICT (event_id, endpoint_id) DO NOTHING",
                (f"whd_{uuid.uuid4().hex[:20]}", event_id, endpoint_id, partner_id, PENDING, now, now),
            )
            > 0
        )

    # --- sending --------------------------------------------------------------------------------------

    def claim(self, owner: str, now: float, lease_s: float, limit: int) -> list[Claimed]:
        """Takes the lease of up to ``limit`` due deliveries and counts their attempt. A delivery another replica
        claimed between the read and the update is skipped (the update's condition no longer holds)."""
        due = self.db.query(
            "SELECT id FROM webhook_deliveries WHERE status = ? AND next_attempt_at <= ?"
            " AND (lease_until IS NULL OR lease_until < ?) ORDER BY next_attempt_at LIMIT ?",
            (PENDING, now, now, limit),
        )
        claimed: list[str] = []
        for (delivery_id,) in due:
            if self.db.execute(
                "UPDATE webhook_deliveries SET lease_owner = ?, lease_until = ?, attempts = attempts + 1"
                " WHERE id = ? AND status = ? AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until < ?)",
                (owner, now + lease_s, delivery_id, PENDING, now, now),
            ):
                claimed.append(str(delivery_id))
        if not claimed:
            return []
        rows = self.db.query(
            "SELECT d.id, d.event_id, e.url, e.secret, ev.payload, d.attempts, d.series_start"
            " FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id"
            f" JOIN webhook_events ev ON ev.id = d.event_id WHERE d.id IN ({_in(claimed)}) AND d.lease_owner = ?",
            [*claimed, owner],
        )
        return [Claimed(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), int(r[6])) for r in rows]

    def finish(self, claimed: Claimed, owner: str, attempt: Attempt, status: str, next_attempt_at: float) -> bool:
        """Records the attempt and the delivery's new state, and gives the lease back. The state changes only while
        this replica still holds the lease and the delivery is pending (not cancelled meanwhile); False otherwise."""
        error = None if attempt.error is None else attempt.error[:MAX_ERROR_CHARS]
        delivery_id, code = claimed.delivery_id, attempt.status_code
        with self.db.transaction():
            self.db.execute(
                "INSERT INTO webhook_attempts (delivery_id, number, started_at, duration_ms, status_code, error)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (delivery_id, number) DO NOTHING",
                (delivery_id, attempt.number, attempt.started_at, attempt.duration_ms, code, error),
            )
            delivered_at = attempt.started_at + attempt.duration_ms / 1000 if status == DELIVERED else None
            changed = self.db.execute(
                "UPDATE webhook_deliveries SET status = ?, next_attempt_at = ?, lease_owner = NULL, lease_until = NULL,"
                " last_status_code = ?, last_error = ?, delivered_at = COALESCE(?, delivered_at)"
                " WHERE id = ? AND lease_owner = ? AND status = ?",
                (status, next_attempt_at, code, error, delivered_at, delivery_id, owner, PENDING),
            )
        return changed > 0

    # --- what a partner sees --------------------------------------------------------------------------

    def deliveries(self, partner_id: str, endpoint_id: str, limit: int) -> list[Delivery]:
        """The endpoint's deliveries, newest first, each with its attempts."""
        self.endpoint(partner_id, endpoint_id)
        rows = self.db.query(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id"
            " WHERE d.endpoint_id = ? AND d.partner_id = ? ORDER BY d.created_at DESC, d.id LIMIT ?",
            (endpoint_id, partner_id, limit),
        )
        return self._with_attempts(rows)

    def delivery(self, partner_id: str, delivery_id: str) -> Delivery:
        """One delivery of the partner's, to an endpoint still registered."""
        rows = self.db.query(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id"
            " JOIN webhook_endpoints e ON e.id = d.endpoint_id"
            " WHERE d.id = ? AND d.partner_id = ? AND e.deleted_at IS NULL",
            (delivery_id, partner_id),
        )
        if not rows:
            raise NotFound(f"you have no webhook delivery {delivery_id!r}", param="delivery_id")
        return self._with_attempts(rows)[0]

    def replay(self, partner_id: str, delivery_id: str, now: float) -> Delivery:
        """Makes the delivery due now as a new series of attempts (the same event id and body); any status but
        cancelled. Refused while an attempt is in flight."""
        self.delivery(partner_id, delivery_id)
        changed = self.db.execute(
            "UPDATE webhook_deliveries SET status = ?, next_attempt_at = ?, series_start = attempts"
            " WHERE id = ? AND partner_id = ? AND status <> ? AND (lease_until IS NULL OR lease_until < ?)",
            (PENDING, now, delivery_id, partner_id, CANCELLED, now),
        )
        if not changed:
            raise RequestInProgress(
                f"an attempt of delivery {delivery_id!r} is in flight; replay it once that attempt has finished",
                param="delivery_id",
                retry_after_s=1.0,
            )
        return self.delivery(partner_id, delivery_id)

    def _with_attempts(self, rows: list[tuple[Any, ...]]) -> list[Delivery]:
        ids = [str(row[0]) for row in rows]
        log: dict[str, list[Attempt]] = {delivery_id: [] for delivery_id in ids}
        if ids:
            attempts = self.db.query(
                "SELECT delivery_id, number, started_at, duration_ms, status_code, error FROM webhook_attempts"
                f" WHERE delivery_id IN ({_in(ids)}) ORDER BY delivery_id, number",
                ids,
            )
            for a in attempts:
                log[str(a[0])].append(Attempt(int(a[1]), float(a[2]), float(a[3]), _optional_int(a[4]), a[5]))
        return [
            Delivery(
                id=str(r[0]),
                event_id=str(r[1]),
                endpoint_id=str(r[2]),
                status=str(r[3]),
                attempts=int(r[4]),
                next_attempt_at=float(r[5]) if r[3] == PENDING else None,
                last_status_code=_optional_int(r[6]),
                last_error=r[7],
                created_at=float(r[8]),
                delivered_at=None if r[9] is None else float(r[9]),
                event=json.loads(r[10]),
                attempt_log=log[str(r[0])],
            )
            for r in rows
        ]
