"""The release gate (``loadtests/gate.py``) for real but briefly: locust headless for a few seconds against the
session's gateway, partners created through its admin API (on the ops listener), outcomes compared with the real
usage ledger. A config any healthy run meets gives GO (exit 0); the same with unreachable thresholds gives NO-GO
(exit 1) naming exactly those checks. Latency ceilings here are configuration, not assertions about speed."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from conftest import ADMIN_TOKEN, ROOT

from serving.gateway.app import Gateway
from serving.settings import Settings

GATE = ROOT / "loadtests" / "gate.py"

# Every user acts for one partner whose plan admits 20 requests a minute: the first 20 are served, the rest
# are expected 429s (counted apart), so both kinds of outcome meet the ledger in a few seconds. Embeddings
# dominate the mix, so the entries whose p99 is configured always have samples among the 20 served.
CONFIG = """
[load]
users = 4
spawn_rate = 4
run_time_s = {run_time}
stop_timeout_s = 30
wait_min_s = 0.02
wait_max_s = 0.1
grpc_weight = 1
http_weight = 1

[[plans]]
name = "loadtest-test-tight"
requests_per_minute = 20

[[partners]]
name = "lt-test"
plan = "loadtest-test-tight"
expect_429 = true

[mix]
max_tokens = 4

[mix.grpc]
embed = 6
classify = 1
generate_stream = 0.5

[mix.http]
embed = 6
openai_embeddings = 1
openai_chat_stream = 0.5

[thresholds]
max_error_rate = {max_error_rate}
min_throughput_rps = {min_throughput}

[thresholds.p99_ms]
"grpc embed" = {p99_ms}
"http embed" = {p99_ms}
"""

REACHABLE: dict[str, float] = {"max_error_rate": 0.0, "min_throughput": 0.01, "p99_ms": 600_000}
UNREACHABLE: dict[str, float] = {"max_error_rate": 0.0, "min_throughput": 1e9, "p99_ms": 0.001}


def write_config(out: Path, run_time: int, values: dict[str, float]) -> Path:
    out.mkdir(parents=True)
    config = out / "gate.toml"
    config.write_text(CONFIG.format(run_time=run_time, **values))
    return config


async def run_gate(
    settings: Settings, gateway: Gateway, out: Path, run_time: int, values: dict[str, float], ledger: bool = True
) -> int:
    """The gate against the session's gateway; with ``ledger`` it reads the ledger database (per request id),
    without it compares per-partner totals from the admin usage API."""
    config = write_config(out, run_time, values)
    ledger_args = ["--ledger-db", settings.ledger_db_url] if ledger else []
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(GATE), "--config", str(config), "--out", str(out),
        "--grpc-target", f"127.0.0.1:{gateway.grpc_port}", "--http-base", f"http://127.0.0.1:{gateway.http_port}",
        "--ops-base", f"http://127.0.0.1:{gateway.ops_port}", "--admin-token", ADMIN_TOKEN, *ledger_args,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    return await asyncio.wait_for(process.wait(), timeout=120)


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def checks_of(out: Path) -> dict[str, Any]:
    verdict = read_json(out / "verdict.json")
    assert {"report.html", "locust_stats.csv", "outcomes.json"} <= {p.name for p in out.iterdir()}
    return {"go": verdict["go"], "checks": {c["name"]: c for c in verdict["checks"]}, "verdict": verdict}


async def test_gate_go_on_a_healthy_run_then_no_go_on_unreachable_thresholds(
    settings: Settings, gateway: Gateway, tmp_path: Path
) -> None:
    passing = tmp_path / "go"
    assert await run_gate(settings, gateway, passing, 6, REACHABLE) == 0
    result = checks_of(passing)
    assert result["go"] is True
    metering = result["verdict"]["metering"]
    assert metering["method"].startswith("per request id")
    assert metering["served"] >= 1 and metering["records"] >= metering["served"]
    assert (metering["unmetered"], metering["double_metered"], metering["token_mismatches"]) == (0, 0, 0)
    outcomes = read_json(passing / "outcomes.json")["outcomes"]
    codes = {o["code"] for o in outcomes}
    assert "OK" in codes and codes & {"RESOURCE_EXHAUSTED", "429"}, codes  # served and rate-limited both seen
    assert int(result["checks"]["expected 429s (rate-limited plans)"]["measured"]) > 0

    failing = tmp_path / "no-go"
    assert await run_gate(settings, gateway, failing, 2, UNREACHABLE) == 1
    result = checks_of(failing)
    assert result["go"] is False
    failed = {name for name, check in result["checks"].items() if check["passed"] is False}
    assert failed == {"p99 grpc embed", "p99 http embed", "throughput (successful req/s)"}


async def test_gate_without_ledger_access_compares_partner_totals(
    settings: Settings, gateway: Gateway, tmp_path: Path
) -> None:
    out = tmp_path / "totals"
    assert await run_gate(settings, gateway, out, 3, REACHABLE, ledger=False) == 0
    metering = checks_of(out)["verdict"]["metering"]
    assert metering["method"].startswith("per partner totals")
    assert metering["served"] >= 1 and metering["records"] >= metering["served"]
    assert (metering["unmetered"], metering["double_metered"], metering["token_mismatches"]) == (0, 0, 0)


async def test_gate_sets_up_through_the_ops_listener_never_the_partner_port(gateway: Gateway, tmp_path: Path) -> None:
    """The admin API lives on the ops listener: ``--ops-base`` pointed at the partner port cannot set up (404, the
    gate exits 2), and without ``--ops-base`` it is the ``--http-base`` host on port 8090."""
    config = write_config(tmp_path / "setup", 2, REACHABLE)
    common = ["--config", str(config), "--grpc-target", f"127.0.0.1:{gateway.grpc_port}", "--admin-token", ADMIN_TOKEN]
    partner_port = f"http://127.0.0.1:{gateway.http_port}"

    async def gate(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(GATE), *common, "--out", str(tmp_path / "setup"), "--setup-only", *args,
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
        return await process.wait(), stderr.decode()

    code, stderr = await gate("--http-base", partner_port, "--ops-base", partner_port)
    assert code == 2 and "HTTP 404" in stderr, stderr
    code, _ = await gate("--http-base", partner_port, "--ops-base", f"http://127.0.0.1:{gateway.ops_port}")
    assert code == 0
    assert read_json(tmp_path / "setup" / "run.json")["http_base"] == partner_port

    probe = "import sys; sys.path.insert(0, sys.argv[1]); import gate; print(gate.parse_args(sys.argv[2:]).ops_base)"
    for http_base, ops_base in (
        ("http://gw.example:8000", "http://gw.example:8090"),
        ("http://[::1]:80/", "http://[::1]:8090"),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", probe, str(GATE.parent), "--grpc-target", "h:50051", "--http-base", http_base,
            "--admin-token", "t", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, _ = await process.communicate()
        assert stdout.decode().strip() == ops_base
