"""The Grafana dashboards against a real Prometheus: a Prometheus server (own directory, free port, 1 s scrapes
and rule evaluations) scrapes the session gateway while it serves real traffic, then every panel query must parse
and return data.

The billing dashboard has its own test: it also runs the billing service (services/billing, scrape mode) against
the gateway, closes a short period through its API, and checks the billing panels. Asserted to parse only:
panels whose description says "Requires a GPU" (this machine has none).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
import yaml
from conftest import ADMIN_TOKEN

from serving.domain import ClassifyRequest, EmbedRequest, GenerateRequest
from serving.gateway.app import Gateway
from serving.gateway.core import CallContext
from serving.settings import Settings

K8S = Path(__file__).resolve().parent.parent / "k8s"
DASHBOARDS = sorted((K8S / "base" / "dashboards").glob("*.json"))
BILLING_DASHBOARD = K8S / "base" / "dashboards" / "billing-health.json"
VARIABLES = {"$__rate_interval": "1m", "$partner": ".*", "$model": ".*"}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.extend(panel.get("panels", []))
        if panel["type"] != "row":
            found.append(panel)
    return found


def queries(dashboards: list[Path]) -> list[tuple[str, str, str, bool]]:
    """(dashboard file, panel title, PromQL with variables substituted, whether it must return data)."""
    out = []
    for path in dashboards:
        for panel in panels(json.loads(path.read_text())):
            needs_data = "Requires a GPU" not in panel.get("description", "")
            for target in panel["targets"]:
                expr = target["expr"]
                for name, value in VARIABLES.items():
                    expr = expr.replace(name, value)
                assert "$" not in expr, f"{path.name} / {panel['title']}: unknown variable in {expr}"
                out.append((path.name, panel["title"], expr, needs_data))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def running_prometheus(workdir: Path, targets: dict[str, str]) -> AsyncIterator[httpx.AsyncClient]:
    """A real Prometheus (own directory, free port) scraping ``targets`` (job → host:port) every second and
    evaluating the alert rules file every second; yields an API client once every target has been scraped."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: scripts/test-services.sh installs it (Debian package prometheus)"
    groups = yaml.safe_load((K8S / "base" / "prometheusrule.yaml").read_text())["spec"]["groups"]
    for group in groups:
        group["interval"] = "1s"  # the same rules, evaluated every second so the test needs not wait 30 s
    (workdir / "alerts.yml").write_text(yaml.safe_dump({"groups": groups}))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(workdir / "alerts.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
        ],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (workdir / "prometheus.log").open("w") as log:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
                await until(client, lambda: ready(client), "Prometheus did not become ready")
                # Every target has been scraped once: what the test sends next shows as a rate.
                for job in targets:
                    query = f'up{{job="{job}"}} == 1'
                    await until(client, functools.partial(has_data, client, query), f"{job} was never scraped")
                yield client
        finally:
            process.terminate()
            await process.wait()


@pytest_asyncio.fixture(loop_scope="session")
async def prometheus(gateway: Gateway, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running_prometheus(tmp_path, {"gateway": f"127.0.0.1:{gateway.ops_port}"}) as client:
        yield client


async def ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/-/ready")).status_code == 200
    except httpx.TransportError:
        return False


async def until(client: httpx.AsyncClient, check: Any, message: str, deadline_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not await check():
        assert loop.time() < deadline, message
        await asyncio.sleep(0)


async def query(client: httpx.AsyncClient, expr: str) -> dict[str, Any]:
    body: dict[str, Any] = (await client.get("/api/v1/query", params={"query": expr})).json()
    return body


async def has_data(client: httpx.AsyncClient, expr: str) -> bool:
    body = await query(client, expr)
    return body["status"] == "success" and bool(body["data"]["result"])


async def scraped_after(client: httpx.AsyncClient, moment: float, job: str = "gateway") -> bool:
    """Whether Prometheus has scraped ``job`` since ``moment`` (Unix time; the same clock on one machine)."""
    return await has_data(client, f'max(timestamp(up{{job="{job}"}})) > {moment}')


async def check_panels(client: httpx.AsyncClient, dashboards: list[Path], parse_only: Sequence[Path] = ()) -> None:
    failures = []
    for dashboard, title, expr, needs_data in queries([*dashboards, *parse_only]):
        body = await query(client, expr)
        if body["status"] != "success":
            failures.append(f"{dashboard} / {title}: does not parse: {body.get('error')} ({expr})")
        elif needs_data and dashboard not in {p.name for p in parse_only} and not body["data"]["result"]:
            failures.append(f"{dashboard} / {title}: no data ({expr})")
    assert not failures, "\n".join(failures)


async def drive_traffic(gateway: Gateway, api_key: str) -> None:
    ctx = CallContext(api_key)
    await asyncio.gather(
        *(gateway.core.embed(ctx, EmbedRequest("minilm-l6", [f"sentence {i}", "another"])) for i in range(6)),
        gateway.core.classify(ctx, ClassifyRequest("zero-shot", ["Stocks fell sharply."], ["sports", "finance"])),
        gateway.core.generate(
            ctx, GenerateRequest("smollm2-135m-instruct", prompt="Say hello.", max_tokens=8, temperature=0.0)
        ),
    )


async def test_every_panel_query_parses_and_returns_data(
    prometheus: httpx.AsyncClient, gateway: Gateway, api_key: str
) -> None:
    # A series appears with its first scrape; a second round of traffic, scraped later, makes every rate nonzero.
    for round_ in ("first", "second"):
        await drive_traffic(gateway, api_key)
        done = time.time()
        await until(
            prometheus, functools.partial(scraped_after, prometheus, done), f"no scrape after the {round_} round"
        )
    await until(
        prometheus,
        lambda: has_data(prometheus, "serving:request_errors:ratio_rate1h >= 0"),
        "the recording rules never produced a value",
    )

    # The billing dashboard's queries must parse here too; their data is checked with the billing service below.
    await check_panels(prometheus, [p for p in DASHBOARDS if p != BILLING_DASHBOARD], [BILLING_DASHBOARD])

    for path in DASHBOARDS:  # template variables list values
        for variable in json.loads(path.read_text())["templating"]["list"]:
            if variable["type"] == "query":
                metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"]).groups()  # type: ignore[union-attr]
                assert await has_data(prometheus, f"count by ({label}) ({metric})"), variable["name"]


def test_dashboards_are_well_formed() -> None:
    uids = set()
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        uids.add(dashboard["uid"])
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in panels(dashboard):
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])
    assert len(uids) == len(DASHBOARDS) == 4


@asynccontextmanager
async def billing_service(settings: Settings, gateway: Gateway, data_dir: Path) -> AsyncIterator[str]:
    """``billing serve`` in scrape mode (1 s) against the session gateway, reading its ledger and partner store."""
    env = {
        **os.environ,
        "BILLING_DATA_DIR": str(data_dir),
        "BILLING_MODE": "scrape",
        "BILLING_SCRAPE_TARGETS": f"http://127.0.0.1:{gateway.ops_port}/metrics",
        "BILLING_ADMIN_TOKEN": ADMIN_TOKEN,
        "BILLING_SCRAPE_INTERVAL_S": "1",
        "BILLING_LEDGER_DATABASE_URL": settings.ledger_db_url,
        "BILLING_PARTNERS_DATABASE_URL": settings.partners_db_url,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "billing.cli", "serve", "--host", "127.0.0.1", "--port", "0",
        env=env, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    try:
        while line := await process.stdout.readline():  # the service's own readiness line
            if line.startswith(b"READY "):
                break
        else:
            raise AssertionError(f"billing exited before it was ready (code {await process.wait()})")
        yield str(json.loads(line[6:])["url"])
    finally:
        process.terminate()
        await process.wait()


async def test_billing_panels_return_data_with_the_billing_service(
    settings: Settings, gateway: Gateway, api_key: str, tmp_path: Path
) -> None:
    (tmp_path / "billing").mkdir()
    (tmp_path / "prometheus").mkdir()
    async with billing_service(settings, gateway, tmp_path / "billing") as billing_url:
        billing_address = billing_url.removeprefix("http://").rstrip("/")
        targets = {"gateway": f"127.0.0.1:{gateway.ops_port}", "billing": billing_address}
        async with running_prometheus(tmp_path / "prometheus", targets) as prom:
            start = int(time.time()) - 1
            await drive_traffic(gateway, api_key)
            traffic_done = time.time()
            end = int(traffic_done) + 1
            period = f"{_iso(start)}..{_iso(end)}"
            admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
            async with httpx.AsyncClient(base_url=billing_url, timeout=30.0, headers=admin) as billing:

                async def closed() -> bool:  # 409 until the period has ended and billing scraped past its end
                    return (await billing.post(f"/v1/periods/{period}/close")).status_code == 200

                await until(prom, closed, f"billing never closed {period}")
            closed_at = time.time()
            await until(prom, functools.partial(scraped_after, prom, closed_at, "billing"), "billing not scraped")
            # A rate needs two samples of a series, and a partner's series appear with its first request: two
            # scrapes of the gateway after the traffic (on a busy machine the period can close before them).
            since = traffic_done
            for _ in range(2):
                await until(prom, functools.partial(scraped_after, prom, since, "gateway"), "gateway not scraped")
                since = time.time()
            await check_panels(prom, [BILLING_DASHBOARD])


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
