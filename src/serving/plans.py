"""Plans: what a partner pays for. Zero means unlimited for the numeric limits."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field, replace
from typing import Any


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class Plan:
    name: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    max_concurrent: int = 0
    monthly_tokens: int = 0
    allowed_models: tuple[str, ...] = ()  # empty: every model
    weight: float = 1.0  # share of a saturated model under fair queuing
    ip_allowlist: tuple[str, ...] = ()  # CIDRs; empty: any address
    # Prepaid: every request reserves its maximum cost from the partner's credit balance at admission and is
    # refused (402) when the balance cannot cover it; postpaid (default): usage is invoiced, credits drawn then.
    prepaid: bool = False
    _networks: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.weight <= 0:
            raise PlanError(f"plan {self.name}: weight must be > 0")
        for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent", "monthly_tokens"):
            if getattr(self, name) < 0:
                raise PlanError(f"plan {self.name}: {name} must be >= 0")
        try:
            networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.ip_allowlist)
        except ValueError as exc:
            raise PlanError(f"plan {self.name}: bad CIDR in ip_allowlist: {exc}") from exc
        object.__setattr__(self, "_networks", networks)

    def allows_model(self, model: str) -> bool:
        return not self.allowed_models or model in self.allowed_models

    def allows_ip(self, address: str | None) -> bool:
        if not self._networks:
            return True
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._networks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "max_concurrent": self.max_concurrent,
            "monthly_tokens": self.monthly_tokens,
            "allowed_models": list(self.allowed_models),
            "weight": self.weight,
            "ip_allowlist": list(self.ip_allowlist),
            "prepaid": self.prepaid,
        }

    def row(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.requests_per_minute,
            self.tokens_per_minute,
            self.max_concurrent,
            self.monthly_tokens,
            json.dumps(list(self.allowed_models)),
            self.weight,
            json.dumps(list(self.ip_allowlist)),
            int(self.prepaid),
        )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Plan:
        return cls(
            name=row[0],
            requests_per_minute=int(row[1]),
            tokens_per_minute=int(row[2]),
            max_concurrent=int(row[3]),
            monthly_tokens=int(row[4]),
            allowed_models=tuple(json.loads(row[5])),
            weight=float(row[6]),
            ip_allowlist=tuple(json.loads(row[7])),
            prepaid=bool(row[8]),
        )

    def with_changes(self, **changes: Any) -> Plan:
        return replace(self, **changes)


# Seeded on first start; operators add or edit plans with `serving plans set`.
DEFAULT_PLANS = (
    Plan("free", requests_per_minute=60, tokens_per_minute=20_000, max_concurrent=4, monthly_tokens=1_000_000),
    Plan("standard", requests_per_minute=600, tokens_per_minute=200_000, max_concurrent=32, weight=2.0),
    Plan("unlimited", weight=4.0),
)
DEFAULT_PLAN = "standard"
