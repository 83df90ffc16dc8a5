"""What the gRPC and the HTTP user share: the partner a user acts for, its request ids, its texts, its choice
of operation, and how a finished request is reported to locust (429s of a rate-limited partner apart)."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

from locust.env import Environment

from gatelib.outcomes import EXPECTED_429, TTFT, PartnerRun, RunFile
from gatelib.texts import Texts

RATE_LIMITED = frozenset({"RESOURCE_EXHAUSTED", "429"})


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


class Actor:
    """One locust user's identity and bookkeeping."""

    def __init__(self, environment: Environment, run: RunFile, request_type: str, mix: dict[str, float]) -> None:
        self.environment = environment
        self.run = run
        self.request_type = request_type
        self.rng = random.Random()
        self.texts = Texts(self.rng)
        weights = [p.share for p in run.partners]
        self.partner: PartnerRun = self.rng.choices(run.partners, weights=weights)[0]
        self.ops = [op for op, weight in mix.items() if weight > 0]
        self.op_weights = [mix[op] for op in self.ops]

    def wait_s(self) -> float:
        return self.rng.uniform(self.run.wait_min_s, self.run.wait_max_s)

    def next_op(self) -> str | None:
        return self.rng.choices(self.ops, weights=self.op_weights)[0] if self.ops else None

    def request_id(self) -> str:
        """Unique, and marked with the run id, so the gate finds this run's records in the ledger."""
        return f"{self.run.run_id}-{uuid.uuid4().hex}"

    def report(
        self,
        name: str,
        started: float,
        code: str,
        request_id: str,
        usage: Usage | None = None,
        length: int = 0,
        error: Exception | None = None,
    ) -> None:
        """One locust request event for a finished request; ``code`` is "OK", a gRPC status name or an HTTP
        status. The outcome rides in the event's context, for the gate's tracker."""
        self.environment.events.request.fire(
            response_length=length, **self.event(name, started, code, request_id, usage, error)
        )

    def event(
        self,
        name: str,
        started: float,
        code: str,
        request_id: str,
        usage: Usage | None = None,
        error: Exception | None = None,
    ) -> dict[str, Any]:
        """The fields of a request event: name (with " [429]" for an expected 429), time, outcome."""
        exception: Exception | None = None
        if code in RATE_LIMITED and self.partner.expect_429:
            name += EXPECTED_429
        elif code != "OK":
            exception = error or RuntimeError(f"{name}: {code}")
        usage = usage or Usage()
        context = {
            "request_id": request_id,
            "partner": self.partner.name,
            "code": code,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
        }
        return {
            "request_type": self.request_type,
            "name": name,
            "response_time": (time.perf_counter() - started) * 1000,
            "exception": exception,
            "context": context,
        }

    def report_ttft(self, name: str, started: float) -> None:
        """Time to first token, as its own locust entry (not a request: no request id, no outcome)."""
        self.environment.events.request.fire(
            request_type=self.request_type,
            name=name + TTFT,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=None,
            context={},
        )
