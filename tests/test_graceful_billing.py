"""A gateway that stops gracefully loses no usage to billing: after the drain its ops listener waits for one
more scrape, and billing scrapes every target once more on its own SIGTERM (what ``serving run`` does at
Ctrl-C). Billing's regular scrape interval here is an hour, so only those two mechanisms can carry the traffic
sent after its first scrape into the invoice."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from billing_support import wait_until
from conftest import ADMIN_TOKEN
from gateway_process import start_gateway_process

from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving.storage.database import Database
from serving_sdk import AsyncClient, GenerateResult


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def _billing(env: dict[str, str], *args: str) -> tuple[asyncio.subprocess.Process, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "billing.cli", *args, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    if args[0] == "serve":
        while line := await process.stdout.readline():  # the service's own readiness line
            if line.startswith(b"READY "):
                return process, line
        raise AssertionError(f"billing exited before it was ready (code {await process.wait()})")
    out, _ = await process.communicate()
    assert process.returncode == 0, out.decode()
    return process, out


async def test_sigterm_right_after_the_last_response_loses_no_usage(
    settings: Settings, ray_models: dict[str, Any], store: PartnerStore, tmp_path: Path
) -> None:
    partner = store.create_partner(f"graceful-{uuid.uuid4().hex[:6]}", plan="standard")
    key = store.issue_key(partner.id)
    gateway, ports = await start_gateway_process(
        settings, SERVING_GATEWAY_ID=f"graceful-{uuid.uuid4().hex[:6]}", SERVING_FINAL_SCRAPE_WAIT_S="60"
    )
    env = {
        **os.environ,
        "BILLING_DATA_DIR": str(tmp_path),
        "BILLING_SCRAPE_TARGETS": f"http://127.0.0.1:{ports['ops_port']}/metrics",
        "BILLING_SCRAPE_INTERVAL_S": "3600",  # one scrape at start; the rest must come from the stop handover
        "BILLING_LEDGER_DATABASE_URL": settings.ledger_db_url,
        "BILLING_PARTNERS_DATABASE_URL": settings.partners_db_url,
        "BILLING_DRIFT_THRESHOLD_TOKENS": "0",
        "BILLING_DRIFT_THRESHOLD_RATIO": "0",
        "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
        "BILLING_PORT": "0",
    }
    billing, ready = await _billing(env, "serve")
    status = json.loads(ready[6:])["url"] + "/healthz"

    async def first_scrape_done() -> bool:
        async with httpx.AsyncClient() as http:
            targets = (await http.get(status)).json()["targets"]
        return bool(targets) and all(t["last_success"] for t in targets)

    await wait_until(first_scrape_done, 30, "billing's first scrape of the gateway")
    start = time.time()
    received = {"requests": 0, "input_tokens": 0, "output_tokens": 0}
    async with AsyncClient(f"127.0.0.1:{ports['grpc_port']}", key) as client:
        for i in range(3):
            received["input_tokens"] += (await client.embed([f"billed at the stop {i}"])).usage.input_tokens
            received["requests"] += 1
        final = [e async for e in client.generate_stream("Name three colours.", temperature=0.0, max_tokens=24)][-1]
        assert isinstance(final, GenerateResult)
        received["input_tokens"] += final.usage.input_tokens
        received["output_tokens"] += final.usage.output_tokens
        received["requests"] += 1
    gateway.send_signal(signal.SIGTERM)  # right after the last response, long before billing's next scrape

    async def readiness() -> str:  # each poll is a real round trip to the stopping gateway
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['ops_port']}") as ops:
            return str((await ops.get("/readyz")).json()["status"])

    async def drained() -> bool:
        return await readiness() == "drained"

    await wait_until(drained, 30, "the gateway to drain")
    # The period ends after the drain (its counters are final) but before billing's exit scrape reads them: only
    # the drained timestamp the gateway exports can date that scrape's samples inside the period.
    end = math.ceil(time.time())  # periods have whole seconds

    async def past_the_period_end() -> bool:
        return await readiness() == "drained" and time.time() > end

    await wait_until(past_the_period_end, 30, "the period's end")
    billing.send_signal(signal.SIGTERM)  # billing's exit scrape reads the drained gateway's final counters
    assert await billing.wait() == 0
    assert await gateway.wait() == 0

    period = f"{_iso(start - 1)}..{_iso(end)}"
    await _billing(env, "close", period)
    _, out = await _billing(env, "invoices", "--period", period, "--partner", partner.id)
    [stored] = json.loads(out)
    invoice = stored["invoice"]
    ledger = Database(settings.ledger_db_url)
    try:
        rows = ledger.query(
            "SELECT COUNT(*), SUM(input_tokens), SUM(output_tokens) FROM usage_records WHERE partner_id = ?",
            (partner.id,),
        )
    finally:
        ledger.close()
    in_ledger = dict(zip(("requests", "input_tokens", "output_tokens"), rows[0], strict=True))
    print(f"clients received {received}; ledger {in_ledger}; invoice {invoice['usage']}, status {stored['status']}")
    assert invoice["usage"] == in_ledger == received
    assert stored["status"] != "needs_review"
    assert invoice["reconciliation"]["drift_tokens"] == 0
