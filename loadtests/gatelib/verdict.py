"""The verdict: locust's own final statistics and the metering comparison, each checked against the config's
thresholds, printed as one GO / NO-GO table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from gatelib.config import GateConfig
from gatelib.metering import Metering
from gatelib.outcomes import EXPECTED_429, Entry, Observed


@dataclass(frozen=True)
class Check:
    name: str
    measured: str
    threshold: str
    passed: bool | None  # None: reported, not judged


def evaluate(config: GateConfig, observed: Observed, metering: Metering) -> list[Check]:
    t = config.thresholds
    by_name = {e.name: e for e in observed.entries}
    checks: list[Check] = []
    for name, ceiling in t.p99_ms.items():
        entry = by_name.get(name)
        if entry is None or entry.requests == 0:
            checks.append(Check(f"p99 {name}", "no samples", f"≤ {ceiling:g} ms", False))
        else:
            checks.append(
                Check(f"p99 {name}", f"{entry.p99_ms:.0f} ms (n={entry.requests})", f"≤ {ceiling:g} ms",
                      entry.p99_ms <= ceiling)
            )  # fmt: skip
    # Counts from every request event locust fired with an outcome (its CSV is written at the stop, before
    # the requests users finish during the stop timeout are counted).
    requests = [o for o in observed.outcomes if not o.name.endswith(EXPECTED_429)]
    total = len(requests)
    failures = sum(1 for o in requests if o.code != "OK")
    rate = failures / total if total else 1.0
    checks.append(Check("error rate (429s apart)", f"{rate:.2%} ({failures}/{total})", f"≤ {t.max_error_rate:.2%}",
                        total > 0 and rate <= t.max_error_rate))  # fmt: skip
    limited = len(observed.outcomes) - total
    checks.append(Check("expected 429s (rate-limited plans)", f"{limited}", "counted apart", None))
    throughput = (total - failures) / observed.seconds
    checks.append(Check("throughput (successful req/s)", f"{throughput:.1f} over {observed.seconds:.0f} s",
                        f"≥ {t.min_throughput_rps:g}", throughput >= t.min_throughput_rps))  # fmt: skip
    users = config.load.users
    excess = max(0, metering.in_flight - users)
    checks += [
        Check("metering: records checked", f"{metering.records} ({metering.method})", "-", None),
        Check("unmetered requests", f"{metering.unmetered} of {metering.served} served", f"≤ {t.max_unmetered}",
              metering.unmetered <= t.max_unmetered),
        Check("double-metered requests", f"{metering.double_metered + excess}", f"≤ {t.max_double_metered}",
              metering.double_metered + excess <= t.max_double_metered),
        Check("billed tokens ≠ response usage", f"{metering.token_mismatches}", f"≤ {t.max_token_mismatches}",
              metering.token_mismatches <= t.max_token_mismatches),
        Check("records of requests cut off at stop", f"{metering.in_flight}", f"≤ {users} (one per user)",
              metering.in_flight <= users),
    ]  # fmt: skip
    return checks


def go(checks: list[Check]) -> bool:
    return all(c.passed is not False for c in checks)


def table(checks: list[Check]) -> str:
    rows = [("check", "measured", "threshold", "verdict")]
    rows += [(c.name, c.measured, c.threshold, {True: "PASS", False: "FAIL", None: "-"}[c.passed]) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    verdict = "GO" if go(checks) else "NO-GO: " + ", ".join(c.name for c in checks if c.passed is False)
    return "\n".join([*lines, "", f"RELEASE GATE: {verdict}"])


def write_verdict(path: Path, checks: list[Check], metering: Metering, entries: list[Entry]) -> None:
    payload = {
        "go": go(checks),
        "checks": [asdict(c) for c in checks],
        "metering": asdict(metering),
        "entries": [asdict(e) for e in entries],
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
