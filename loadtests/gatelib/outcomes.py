"""What locust saw, per request id: the run file the gate hands to locust, the outcome of every request the
users sent (kept by a listener on locust's ``request`` event, written out when locust quits), and how each
outcome should show in the usage ledger."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from locust.stats import RequestStats

# The suffixes of locust entries that are not requests served: expected 429s and time to first token.
EXPECTED_429 = " [429]"
TTFT = " [ttft]"

# Codes (gRPC names, HTTP statuses) of requests rejected before admission: the ledger must hold no record.
REJECTED_CODES = frozenset(
    {
        "RESOURCE_EXHAUSTED", "INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "NOT_FOUND",
        "ALREADY_EXISTS", "400", "401", "403", "404", "409", "413", "422", "429",
    }
)  # fmt: skip


class Expect(StrEnum):
    """How many ledger records a request should have left."""

    ONE = "one"  # served: exactly one record, its tokens equal the response's usage
    NONE = "none"  # rejected before admission (quota, validation, auth)
    EITHER = "either"  # shed, timed out, cut off or failed after admission: zero or one record


@dataclass
class Outcome:
    request_id: str
    partner: str
    name: str  # the locust entry
    code: str  # "OK", a gRPC status name or an HTTP status
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def expect(self) -> Expect:
        if self.code == "OK":
            return Expect.ONE
        return Expect.NONE if self.code in REJECTED_CODES else Expect.EITHER


@dataclass(frozen=True)
class PartnerRun:
    name: str
    partner_id: str
    api_key: str
    share: float
    expect_429: bool


@dataclass(frozen=True)
class RunFile:
    """Everything locust's users need, written by the gate (it holds API keys: mode 0600)."""

    run_id: str
    grpc_target: str
    http_base: str
    partners: list[PartnerRun]
    grpc_mix: dict[str, float]
    http_mix: dict[str, float]
    max_tokens: int
    wait_min_s: float
    wait_max_s: float
    grpc_weight: int
    http_weight: int

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> RunFile:
        raw = json.loads(path.read_text())
        raw["partners"] = [PartnerRun(**p) for p in raw["partners"]]
        return cls(**raw)


@dataclass
class Tracker:
    """Listens to locust's request events; keeps the outcome of every request that carried a request id."""

    path: Path
    outcomes: list[Outcome] = field(default_factory=list)
    started_at: float = 0.0

    def on_test_start(self, **_kwargs: Any) -> None:
        self.started_at = time.time()

    def on_request(self, name: str, context: dict[str, Any] | None = None, **_kwargs: Any) -> None:
        if context and "request_id" in context:
            self.outcomes.append(
                Outcome(
                    request_id=context["request_id"],
                    partner=context["partner"],
                    name=name,
                    code=context["code"],
                    input_tokens=context.get("input_tokens", 0),
                    output_tokens=context.get("output_tokens", 0),
                )
            )

    def write(self, stats: RequestStats) -> None:
        """On locust's ``quit`` event, after the users stopped: the outcomes and locust's final statistics
        (its CSV files are rewritten once a second and miss what ends in the stop timeout)."""
        stopped = time.time()  # the window ends when the last user finished (the stop timeout included)
        entries = [
            Entry(
                kind=str(e.method),
                name=e.name,
                requests=e.num_requests,
                failures=e.num_failures,
                p50_ms=float(e.get_response_time_percentile(0.5) or 0),
                p99_ms=float(e.get_response_time_percentile(0.99) or 0),
            )
            for e in stats.entries.values()
        ]
        payload = {
            "started_at": self.started_at,
            "stopped_at": stopped,
            "outcomes": [asdict(o) for o in self.outcomes],
            "entries": [asdict(e) for e in entries],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(payload) + "\n")


@dataclass(frozen=True)
class Entry:
    """One entry of locust's statistics (one name: an operation, its expected 429s, or its first tokens)."""

    kind: str
    name: str
    requests: int
    failures: int
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True)
class Observed:
    """The outcomes file, read back by the gate."""

    started_at: float
    stopped_at: float
    outcomes: list[Outcome]
    entries: list[Entry]

    @property
    def seconds(self) -> float:
        return max(self.stopped_at - self.started_at, 1e-9)

    @classmethod
    def read(cls, path: Path) -> Observed:
        raw = json.loads(path.read_text())
        outcomes = [Outcome(**o) for o in raw["outcomes"]]
        return cls(raw["started_at"], raw["stopped_at"], outcomes, [Entry(**e) for e in raw["entries"]])
