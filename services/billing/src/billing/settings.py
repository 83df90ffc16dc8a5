"""Every billing setting, typed, read once from the environment (prefix ``BILLING_``) and validated at startup.

Nothing else in the package reads the environment; components get the values they need passed in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
CRASH_POINTS = ("", "close_before_commit")


class SettingsError(ValueError):
    """A setting has a value that cannot be used; raised at startup."""


@dataclass(frozen=True)
class BillingSettings:
    data_dir: Path = Path("var")
    # None: SQLite file ``billing.db`` under data_dir; "postgresql://..." at scale.
    database_url: str | None = None
    # The gateway's usage ledger (read-only here) and its partner store (for plans); None: files under data_dir.
    ledger_database_url: str | None = None
    partners_database_url: str | None = None
    # Input mode: "scrape" (embedded default: billing scrapes the gateways' /metrics) or "prometheus".
    mode: str = "scrape"
    scrape_targets: str = "http://127.0.0.1:8090/metrics"  # comma-separated /metrics URLs (gateways' ops listeners)
    scrape_targets_file: Path | None = None  # Prometheus file_sd JSON, re-read before every scrape
    scrape_interval_s: float = 15.0
    prometheus_url: str = "http://127.0.0.1:9090"
    prometheus_job: str = ""  # optional: only series with this job label
    prometheus_lookback_s: float = 3600.0  # how far before a period start to look for each series' baseline
    http_timeout_s: float = 10.0
    retry_attempts: int = 4
    retry_backoff_s: float = 0.2  # doubles per attempt
    price_book: Path | None = None  # TOML; None: the book shipped with the package
    default_plan: str = "standard"  # for partners the partner store does not know
    drift_threshold_tokens: int = 100
    drift_threshold_ratio: Decimal = Decimal("0.01")
    host: str = "127.0.0.1"
    port: int = 8100
    # Bearer token for the /v1 API (invoices, periods, reconciliation); the gateway's admin token in the embedded
    # default. None: the /v1 API refuses every call (403). /metrics and /healthz need no token.
    admin_token: str | None = None
    log_level: str = "INFO"
    # Test seam (documented in the README): "close_before_commit" SIGKILLs the process inside the close
    # transaction, after every invoice row was written and before the commit. Never set it in production.
    crash_point: str = ""

    @property
    def db_url(self) -> str:
        return self.database_url or str(self.data_dir / "billing.db")

    @property
    def ledger_db_url(self) -> str:
        return self.ledger_database_url or str(self.data_dir / "ledger.db")

    @property
    def partners_db_url(self) -> str:
        return self.partners_database_url or str(self.data_dir / "serving.db")

    def targets(self) -> list[str]:
        return [t.strip() for t in self.scrape_targets.split(",") if t.strip()]

    def validate(self) -> BillingSettings:
        if self.mode not in ("scrape", "prometheus"):
            raise SettingsError(f"mode must be 'scrape' or 'prometheus'; got {self.mode!r}")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be in 0..65535; got {self.port}")
        if self.scrape_interval_s <= 0 or self.http_timeout_s <= 0 or self.prometheus_lookback_s < 0:
            raise SettingsError("scrape_interval_s and http_timeout_s must be > 0, prometheus_lookback_s >= 0")
        if self.retry_attempts < 1 or self.retry_backoff_s < 0:
            raise SettingsError("retry_attempts must be >= 1 and retry_backoff_s >= 0")
        if self.drift_threshold_tokens < 0 or self.drift_threshold_ratio < 0:
            raise SettingsError("drift thresholds must be >= 0")
        if not re.fullmatch(r"[A-Za-z0-9_.:/-]*", self.prometheus_job):  # it is spliced into PromQL selectors
            raise SettingsError(f"prometheus_job must be a plain label value; got {self.prometheus_job!r}")
        if self.crash_point not in CRASH_POINTS:
            raise SettingsError(f"crash_point must be one of {CRASH_POINTS}; got {self.crash_point!r}")
        return self


def _parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name} must be one of 1/0, true/false, yes/no, on/off; got {raw!r}")


def _convert(name: str, raw: str, kind: str) -> Any:
    try:
        if "bool" in kind:
            return _parse_bool(name, raw)
        if "Decimal" in kind:
            return Decimal(raw)
        if "int" in kind:
            return int(raw)
        if "float" in kind:
            return float(raw)
        if "Path" in kind:
            return Path(raw) if raw else None
        if "None" in kind and raw == "":
            return None
    except (ValueError, InvalidOperation) as exc:
        raise SettingsError(f"{name}: cannot parse {raw!r} as {kind}") from exc
    return raw


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> BillingSettings:
    """Reads ``BILLING_<FIELD>`` variables from ``env`` (default: the process environment), then applies overrides."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(BillingSettings):
        name = f"BILLING_{f.name.upper()}"
        if name in source:
            values[f.name] = _convert(name, source[name], str(f.type))
    return replace(BillingSettings(**values), **overrides).validate()
