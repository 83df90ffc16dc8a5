"""Prepaid money budgets, end to end on the real stack: two gateway replicas share Redis, concurrent generations of
a prepaid partner on both draw one small credit grant, the balance is never overspent, refusals name the balance
(HTTP 402 ``insufficient_quota``, gRPC RESOURCE_EXHAUSTED with a QuotaFailure), balance alerts reach a real
receiver, and billing, scraping both replicas, closes an invoice whose charges equal what the balance was drawn, to
the cent.

Costs are computed here from the shipped price book's numbers, independently of the pricing code."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from conftest import ADMIN_TOKEN, REDIS_URL, running_gateway
from webhook_support import receiver

from billing.periods import Period, iso
from billing.service import BillingService
from billing.settings import BillingSettings
from serving.gateway.app import Gateway
from serving.models.registry import ModelSpec
from serving.partners.store import PartnerStore
from serving.plans import Plan
from serving.settings import Settings, Webhooks
from serving_sdk import ApiError, AsyncClient

GENERATE = "smollm2-135m-instruct"
# src/serving/commerce/pricebook.toml for the generation model, per 1,000 tokens and per request.
INPUT_PER_1K, OUTPUT_PER_1K, PER_REQUEST = Decimal("0.1000"), Decimal("0.3000"), Decimal("0.0005")
GRANT = Decimal("0.0500")
MAX_TOKENS = 16
BURST = 24  # concurrent generations, alternating replicas: far more than the grant covers
ALERTS = Webhooks(evaluate_interval_s=0.05, dispatch_interval_s=0.05, timeout_s=5.0)


def cost(input_tokens: int, output_tokens: int) -> Decimal:
    return input_tokens * INPUT_PER_1K / 1000 + output_tokens * OUTPUT_PER_1K / 1000 + PER_REQUEST


async def _grpc_generate(gateway: Gateway, key: str, i: int) -> Decimal | ApiError:
    async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}", key) as client:
        try:
            result = await client.generate(f"Name a fruit, number {i}.", temperature=0.0, max_tokens=MAX_TOKENS)
        except ApiError as exc:
            return exc
    return cost(result.usage.input_tokens, result.usage.output_tokens)


async def _http_generate(http: httpx.AsyncClient, gateway: Gateway, i: int) -> Decimal | httpx.Response:
    body = {
        "model": GENERATE,
        "messages": [{"role": "user", "content": f"Name a colour, number {i}."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    reply = await http.post(f"http://127.0.0.1:{gateway.http_port}/v1/chat/completions", json=body)
    if reply.status_code != 200:
        return reply
    usage = reply.json()["usage"]
    return cost(usage["prompt_tokens"], usage["completion_tokens"])


def _billing(settings: Settings, work: Path, gateways: list[Gateway]) -> BillingService:
    targets = ",".join(f"http://127.0.0.1:{gw.ops_port}/metrics" for gw in gateways)
    billing = BillingSettings(
        data_dir=work, scrape_targets=targets, ledger_database_url=settings.ledger_db_url,
        partners_database_url=settings.partners_db_url, retry_attempts=2, retry_backoff_s=0.05,
    ).validate()  # fmt: skip
    return BillingService(billing)


async def test_prepaid_generations_on_two_replicas_never_overspend_and_the_invoice_equals_the_draw(
    settings: Settings,
    specs: list[ModelSpec],
    ray_models: dict[str, Any],
    store: PartnerStore,
    tmp_path: Path,
) -> None:
    plan = f"prepaid-{uuid.uuid4().hex[:6]}"
    store.put_plan(Plan(plan, prepaid=True))
    partner = store.create_partner(f"prepaid-{uuid.uuid4().hex[:8]}", plan=plan)
    key = store.issue_key(partner.id)
    auth = {"authorization": f"Bearer {key}"}
    async with (
        running_gateway(
            settings, specs, ray_models, store, redis_url=REDIS_URL, gateway_id="prepaid-1", webhooks=ALERTS
        ) as one,
        running_gateway(
            settings, specs, ray_models, store, redis_url=REDIS_URL, gateway_id="prepaid-2", webhooks=ALERTS
        ) as two,
        httpx.AsyncClient(timeout=120) as http,
        receiver(fail_first=0) as alerts,
    ):
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        granted = await http.post(
            f"http://127.0.0.1:{one.ops_port}/admin/v1/partners/{partner.id}/credits",
            json={"kind": "purchased", "amount": str(GRANT), "priority": 10, "note": "prepaid test"},
            headers=admin,
        )
        assert granted.status_code == 201, granted.text
        grant_id = granted.json()["id"]
        billing = _billing(settings, tmp_path / "billing", [one, two])
        try:
            assert set((await asyncio.to_thread(billing.scraper.scrape_once)).values()) == {True}  # type: ignore[union-attr]
            start = time.time()

            # 1. A concurrent burst over both replicas, half gRPC (SDK) and half HTTP (OpenAI route).
            http.headers.update(auth)
            hook = await http.post(
                f"http://127.0.0.1:{one.http_port}/v1/webhooks",
                json={"url": alerts.url("/balance"), "thresholds": [50, 80]},
            )
            assert hook.status_code == 201, hook.text
            alerts.secrets["/balance"] = hook.json()["secret"]
            burst = await asyncio.gather(
                *(
                    _grpc_generate((one, two)[i % 2], key, i)
                    if i % 4 < 2
                    else _http_generate(http, (one, two)[i % 2], i)
                    for i in range(BURST)
                )
            )
            served = [c for c in burst if isinstance(c, Decimal)]
            refused = [c for c in burst if not isinstance(c, Decimal)]
            # 2. Then one at a time until the balance cannot cover one more request.
            last: ApiError | None = None
            for i in range(BURST, BURST + 40):
                outcome = await _grpc_generate((one, two)[i % 2], key, i)
                if isinstance(outcome, ApiError):
                    last = outcome
                    break
                served.append(outcome)
            spent = sum(served, Decimal(0))
            print(f"prepaid grant {GRANT}: {len(served)} generations cost {spent}; burst refusals {len(refused)}")

            assert served and refused and last is not None
            assert spent <= GRANT  # overshoot 0
            # A refusal says 402 when the balance cannot cover the request, or a retryable 429 while the partner's
            # own requests in flight hold what would cover it once they settle.
            for reply in refused:
                if isinstance(reply, ApiError):
                    assert reply.code == "RESOURCE_EXHAUSTED" and reply.subject is not None
                    assert reply.subject == "balance_held" or reply.subject.startswith("balance:"), reply.subject
                else:
                    error = reply.json()["error"]
                    assert (reply.status_code, error["code"]) in {
                        (402, "insufficient_quota"),
                        (429, "rate_limit_exceeded"),
                    }
                    assert "prepaid balance" in error["message"]
            # The last refusal names the balance left: exactly the grant minus what was served.
            assert last.code == "RESOURCE_EXHAUSTED" and last.reason == "insufficient_quota"
            left = GRANT - spent
            assert last.subject is not None and Decimal(last.subject.split(":")[1].split()[0]) == left

            for gw in (one, two):  # every settlement has reached Redis, every record the ledger
                await gw.admission.drain()
                await asyncio.to_thread(gw.ledger.flush)
            statement = (await http.get(f"http://127.0.0.1:{two.http_port}/v1/credits")).json()
            [grant] = statement["grants"]
            assert statement["prepaid"] is True and statement["currency"] == "USD"
            assert (grant["id"], Decimal(grant["used"]), Decimal(grant["held"])) == (grant_id, spent, 0)
            assert Decimal(statement["balance"]) == left
            async with AsyncClient(f"127.0.0.1:{one.grpc_port}", key) as client:  # the same over gRPC (SDK)
                balance = await client.get_credits()
            assert (balance.partner_id, balance.prepaid, balance.balance, balance.held) == (partner.id, True, left, 0)
            assert [(g.id, g.used, g.remaining) for g in balance.grants] == [(grant_id, spent, left)]

            # Balance alerts: 50 % and 80 % of the grant used, each event once, signed (both replicas evaluate).
            def crossed() -> bool:
                return {r.threshold for r in alerts.accepted("/balance")} == {50, 80}

            await alerts.wait_for("the balance alerts", crossed)
            for alert in alerts.accepted("/balance"):
                data = alert.body["data"]
                assert alert.signature_ok and (data["metric"], data["grants"]) == ("credit_balance", [grant_id])
                assert Decimal(data["used"]) * 100 >= alert.threshold * GRANT and Decimal(data["limit"]) == GRANT
            assert len(alerts.accepted("/balance")) == 2

            # 3. Billing scrapes both replicas and closes the period: the charges equal the draw, to the cent.
            await asyncio.to_thread(billing.scraper.scrape_once)  # type: ignore[union-attr]
            end = time.time()
            assert set((await asyncio.to_thread(billing.scraper.scrape_once)).values()) == {True}  # type: ignore[union-attr]
            period = Period.parse(f"{iso(start)}..{iso(end)}")
            invoices = await asyncio.to_thread(billing.close_period, period.id)
        finally:
            billing.shutdown()
        [stored] = [i for i in invoices if i.partner == partner.id]
        invoice = json.loads(stored.document)
        assert Decimal(invoice["subtotal"]) == spent
        assert [(c["grant"], Decimal(c["applied"])) for c in invoice["credits"]] == [(grant_id, spent)]
        assert Decimal(invoice["credits_applied"]) == spent and invoice["total"] == "0.00"
        assert invoice["usage"]["requests"] == len(served)

        # After the close the draw is on record in the partner database; the live balance does not count it twice.
        after = (await http.get(f"http://127.0.0.1:{one.http_port}/v1/credits")).json()
        assert Decimal(after["balance"]) == left and Decimal(after["grants"][0]["used"]) == spent
