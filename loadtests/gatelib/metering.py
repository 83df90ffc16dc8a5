"""Zero unmetered, zero double-metered: the usage ledger compared with what locust saw, request id by request
id when the gate can read the ledger database (the stack it started, or ``--ledger-db``), else per partner
through the admin usage API (``GET /admin/v1/usage``), which only gives totals.

Per request id (all ids carry the run id, so this run's records are found by prefix):
- a served request (OK) must have exactly one record, status ``ok``, with the tokens of its response;
- a request rejected before admission (429, 4xx) must have none;
- a request shed or failed after admission, or cut off, may have zero or one;
- a record whose id locust never saw an outcome for was in flight when locust stopped: at most one per user.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from gatelib.outcomes import Expect, Observed, Outcome, PartnerRun
from serving.storage.database import Database


@dataclass
class Metering:
    method: str  # "per request id (ledger database)" or "per partner totals (admin usage API)"
    records: int = 0
    served: int = 0  # outcomes expecting exactly one record
    unmetered: int = 0
    double_metered: int = 0
    token_mismatches: int = 0
    in_flight: int = 0  # records without an outcome: requests cut off at the end
    examples: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)


LedgerRow = tuple[str, str, str, int, int]  # partner_id, request_id, status, input_tokens, output_tokens


def read_ledger(url: str, run_id: str) -> list[LedgerRow]:
    db = Database(url)
    try:
        rows = db.query(
            "SELECT partner_id, request_id, status, input_tokens, output_tokens FROM usage_records"
            " WHERE request_id LIKE ?",
            (f"{run_id}-%",),
        )
    finally:
        db.close()
    return [(str(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4])) for r in rows]


def settled_ledger(url: str, run_id: str, expected: int, timeout_s: float = 15.0) -> list[LedgerRow]:
    """The gateway's ledger writer stores records every 50 ms: read until the count reaches ``expected`` and
    stops changing, or the timeout passes (then the last read is judged as it is)."""
    deadline = time.monotonic() + timeout_s
    previous = -1
    while True:
        rows = read_ledger(url, run_id)
        if (len(rows) >= expected and len(rows) == previous) or time.monotonic() > deadline:
            return rows
        previous = len(rows)
        time.sleep(0.25)


def compare_by_id(observed: Observed, rows: list[LedgerRow], partners: list[PartnerRun]) -> Metering:
    ids = {p.partner_id: p.name for p in partners}
    result = Metering("per request id (ledger database)", records=len(rows))
    by_id: dict[tuple[str, str], list[LedgerRow]] = {}
    for row in rows:
        by_id.setdefault((ids.get(row[0], row[0]), row[1]), []).append(row)
    seen: set[tuple[str, str]] = set()
    for outcome in observed.outcomes:
        key = (outcome.partner, outcome.request_id)
        seen.add(key)
        found = by_id.get(key, [])
        _judge(result, outcome, found)
    for key, found in by_id.items():
        if key not in seen:
            result.in_flight += len(found)
    return result


def _judge(result: Metering, outcome: Outcome, found: list[LedgerRow]) -> None:
    expect = outcome.expect
    if len(found) > 1 or (expect is Expect.NONE and found):
        result.double_metered += 1
        result.note(f"{outcome.request_id} ({outcome.name}, {outcome.code}): {len(found)} record(s)")
    if expect is not Expect.ONE:
        return
    result.served += 1
    if not found:
        result.unmetered += 1
        result.note(f"{outcome.request_id} ({outcome.name}): served, no ledger record")
        return
    _, _, status, input_tokens, output_tokens = found[0]
    if status != "ok" or (input_tokens, output_tokens) != (outcome.input_tokens, outcome.output_tokens):
        result.token_mismatches += 1
        result.note(
            f"{outcome.request_id} ({outcome.name}): ledger {status} {input_tokens}/{output_tokens} tokens,"
            f" response {outcome.input_tokens}/{outcome.output_tokens}"
        )


def partner_totals(
    ops_base: str, admin_token: str, partners: list[PartnerRun], start_day: str
) -> dict[str, tuple[int, int]]:
    """Per partner name: (records, billed tokens) from ``GET /admin/v1/usage`` on the ops listener."""
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    totals: dict[str, tuple[int, int]] = {}
    headers = {"authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=f"{ops_base}/admin/v1", headers=headers, timeout=30.0) as admin:
        for partner in partners:
            params = {"partner": partner.partner_id, "start_day": start_day, "end_day": day}
            response = admin.get("/usage", params=params)
            response.raise_for_status()
            rows = response.json()
            records = sum(int(r["requests"]) for r in rows)
            billed = sum(int(r["input_tokens"]) + int(r["output_tokens"]) for r in rows)
            totals[partner.name] = (records, billed)
    return totals


def compare_by_partner(
    observed: Observed, ops_base: str, admin_token: str, partners: list[PartnerRun], timeout_s: float = 15.0
) -> Metering:
    """Totals only: every partner is new in this run, so all its usage is this run's. A shortfall against the
    served requests is unmetered; records beyond served + shed/failed count as in flight at the stop (the
    verdict allows one per user); the ledger's tokens must equal the responses' when nothing ended in between.
    Read until the totals reach the served count and stop changing (the ledger writer lags by ~50 ms)."""
    result = Metering("per partner totals (admin usage API)")
    served = Counter(o.partner for o in observed.outcomes if o.expect is Expect.ONE)
    either = Counter(o.partner for o in observed.outcomes if o.expect is Expect.EITHER)
    tokens = Counter[str]()
    for o in observed.outcomes:
        if o.expect is Expect.ONE:
            tokens[o.partner] += o.input_tokens + o.output_tokens
    start = datetime.fromtimestamp(observed.started_at, UTC).strftime("%Y-%m-%d")
    deadline = time.monotonic() + timeout_s
    previous: dict[str, tuple[int, int]] = {}
    while True:
        totals = partner_totals(ops_base, admin_token, partners, start)
        enough = sum(r for r, _ in totals.values()) >= sum(served.values())
        if (enough and totals == previous) or time.monotonic() > deadline:
            break
        previous = totals
        time.sleep(0.25)
    for name, (records, billed) in totals.items():
        result.records += records
        result.served += served[name]
        slack = either[name]
        if records < served[name]:
            result.unmetered += served[name] - records
            result.note(f"{name}: {records} records for {served[name]} served requests")
        elif records > served[name] + slack:
            result.in_flight += records - served[name] - slack
        if slack == 0 and records == served[name] and billed != tokens[name]:
            result.token_mismatches += 1
            result.note(f"{name}: ledger {billed} tokens, responses {tokens[name]}")
    return result
