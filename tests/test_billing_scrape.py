"""Billing in the embedded default: the ``billing serve`` process scrapes a real gateway's /metrics itself,
closes a period over HTTP, and flags an invoice whose counters drift from the ledger."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from billing_support import http_server, wait_until
from conftest import ADMIN_TOKEN

from billing.periods import Period, iso
from billing.service import BillingService, PeriodIncomplete
from billing.settings import BillingSettings
from serving.gateway.app import Gateway
from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving.storage.database import Database
from serving_sdk import AsyncClient


@pytest_asyncio.fixture(loop_scope="session")
async def billing_process(
    settings: Settings, gateway: Gateway, tmp_path: Path
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    env = {
        **os.environ,
        "BILLING_DATA_DIR": str(tmp_path),
        "BILLING_MODE": "scrape",
        "BILLING_SCRAPE_TARGETS": f"http://127.0.0.1:{gateway.ops_port}/metrics",
        "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
        "BILLING_SCRAPE_INTERVAL_S": "0.2",
        "BILLING_LEDGER_DATABASE_URL": settings.ledger_db_url,
        "BILLING_PARTNERS_DATABASE_URL": settings.partners_db_url,
        "BILLING_PORT": "0",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "billing.cli", "serve", env=env, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    url = ""
    while line := await process.stdout.readline():  # the service's own readiness line
        if line.startswith(b"READY "):
            url = json.loads(line[6:])["url"]
            break
    assert url, f"billing exited before it was ready (code {await process.wait()})"
    yield url, env
    process.send_signal(signal.SIGTERM)
    assert await process.wait() == 0


async def last_scrape(client: httpx.AsyncClient, url: str) -> float:
    targets = (await client.get(f"{url}/healthz")).json()["targets"]
    return min((t["last_success"] or 0.0 for t in targets), default=0.0)


async def test_embedded_scrape_close_over_http_and_drift_needs_review(
    settings: Settings, gateway: Gateway, store: PartnerStore, billing_process: tuple[str, dict[str, str]]
) -> None:
    url, env = billing_process
    partner = store.create_partner(f"bill-scrape-{uuid.uuid4().hex[:6]}", plan="standard")
    key = store.issue_key(partner.id)
    async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as http:

        async def scraped_since(moment: float) -> bool:
            return await last_scrape(http, url) > moment

        # The first scrape is every series' baseline (earlier tests' partners included): the period starts after it.
        await wait_until(lambda: scraped_since(0.0), 30, "billing's first scrape of the gateway")
        start = time.time()
        await wait_until(lambda: scraped_since(start), 30, "billing to scrape the gateway")
        tokens = 0
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}", key) as client:
            for i in range(3):
                tokens += (await client.embed([f"scraped directly {i}"])).usage.input_tokens
        await asyncio.to_thread(gateway.ledger.flush)
        served = time.time()
        await wait_until(lambda: scraped_since(served), 30, "billing to scrape the traffic")  # counted when seen
        unseen = store.create_partner(f"bill-unseen-{uuid.uuid4().hex[:6]}", plan="standard")
        ledger = Database(settings.ledger_db_url)
        # Records the counters never saw (a replica that died before its last scrape): drift to review, also
        # for a partner with no counter usage at all.
        for who in (partner.id, unseen.id):
            now = time.time()
            ledger.execute(
                "INSERT INTO usage_records (partner_id, request_id, key_id, model, operation, input_tokens,"
                " output_tokens, status, queue_ms, latency_ms, started_at, finished_at, day)"
                " VALUES (?, ?, 'k', 'minilm-l6', 'embed', 5000, 0, 'ok', 0, 1, ?, ?, ?)",
                (who, f"lost-{uuid.uuid4().hex}", now, now, time.strftime("%Y-%m-%d", time.gmtime(now))),
            )
        ledger.close()
        end = time.time()
        await wait_until(lambda: scraped_since(end), 30, "billing to scrape past the period end")
        period = Period.parse(f"{iso(start)}..{iso(end)}").id

        async with httpx.AsyncClient() as anonymous:  # invoices name every partner: the API needs the admin token
            assert (await anonymous.post(f"{url}/v1/periods/{period}/close")).status_code == 401
            wrong = {"authorization": "Bearer not-the-admin-token"}
            assert (await anonymous.get(f"{url}/v1/invoices", headers=wrong)).status_code == 403
        closed = await http.post(f"{url}/v1/periods/{period}/close")
        assert closed.status_code == 200, closed.text
        assert closed.json()["invoices"] == [
            {"partner": who, "status": "needs_review"} for who in sorted((partner.id, unseen.id))
        ]
        found = (await http.get(f"{url}/v1/invoices", params={"partner": partner.id, "period": period})).json()
        [invoice] = [item["invoice"] for item in found["invoices"]]
        assert invoice["usage"] == {"input_tokens": tokens, "output_tokens": 0, "requests": 3}
        assert invoice["reconciliation"]["drift_tokens"] == -5000 and invoice["status"] == "needs_review"

        report = (await http.get(f"{url}/v1/periods/{period}/reconciliation")).json()
        [mine] = [p for p in report["partners"] if p["partner"] == partner.id]
        assert mine["needs_review"] and mine["ledger_tokens"] == tokens + 5000 and mine["counter_tokens"] == tokens

        exported = (await http.get(f"{url}/v1/invoices/{period}/{partner.id}")).content
        again = await http.post(f"{url}/v1/periods/{period}/close")
        assert again.status_code == 200
        assert (await http.get(f"{url}/v1/invoices/{period}/{partner.id}")).content == exported
        csv_text = (await http.get(f"{url}/v1/invoices/{period}/{partner.id}", params={"format": "csv"})).text
        assert f"{partner.id},{period},line,minilm-l6,input_tokens" in csv_text
        listed = await http.get(f"{url}/v1/invoices", params={"period": period, "format": "csv"})
        assert set(csv_text.splitlines()[1:]) <= set(listed.text.splitlines()[1:])
        empty = (await http.get(f"{url}/v1/invoices/{period}/{unseen.id}")).json()
        assert empty["lines"] == [] and empty["usage"]["input_tokens"] == 0 and empty["status"] == "needs_review"

        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "billing.cli", "invoices", "--period", period, "--partner", partner.id,
            "--format", "csv", env=env, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await cli.communicate()
        assert cli.returncode == 0 and out.decode() == csv_text  # the CLI reads the same stored invoice

        metrics = (await http.get(f"{url}/metrics")).text
        assert "billing_invoices_needing_review 2.0" in metrics
        assert f'billing_reconciliation_drift_tokens{{partner="{partner.id}"}} -5000.0' in metrics
        assert "billing_invoices_closed_total 2.0" in metrics
        assert 'billing_scrapes_total{result="success",source="http://127.0.0.1:' in metrics
        assert "billing_last_successful_scrape_timestamp_seconds{" in metrics


async def test_malformed_exposition_is_reported_retried_and_blocks_the_close(tmp_path: Path) -> None:
    page = b'serving_partner_tokens_total{partner="p",model="m",direction="input"} not-a-number\n'
    with http_server(lambda _: (200, "text/plain", page)) as base:
        settings = BillingSettings(
            data_dir=tmp_path, scrape_targets=f"{base}/metrics", retry_attempts=3, retry_backoff_s=0.01
        ).validate()
        service = BillingService(settings)
        assert service.scraper is not None
        assert await asyncio.to_thread(service.scraper.scrape_once) == {f"{base}/metrics": False}
        errors = service.metrics.registry.get_sample_value(
            "billing_scrapes_total", {"source": f"{base}/metrics", "result": "error"}
        )
        assert errors == 3
        [state] = service.store.targets()
        assert state.last_success is None and state.last_error and "malformed exposition" in state.last_error
        period = Period.parse(f"{iso(time.time() - 60)}..{iso(time.time() - 1)}")
        with pytest.raises(PeriodIncomplete, match="not scraped successfully"):
            await asyncio.to_thread(service.close_period, period.id)
        assert service.store.invoices() == [] and not service.store.is_closed(period.id)
        service.shutdown()
