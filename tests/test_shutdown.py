"""SIGTERM during load: the gateway stops accepting, finishes every in-flight request, then exits."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
from gateway_process import start_gateway_process

from serving.settings import Settings
from serving_sdk import AsyncClient

IN_FLIGHT = 6


async def _in_flight(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("serving_requests_in_flight{")
    )


async def test_sigterm_finishes_in_flight_requests(
    settings: Settings, ray_models: dict[str, Any], api_key: str
) -> None:
    process, ports = await start_gateway_process(settings, SERVING_SHUTDOWN_GRACE_S="30")
    target = f"127.0.0.1:{ports['grpc_port']}"
    async with (
        AsyncClient(target, api_key) as client,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['ops_port']}") as http,
    ):
        calls = [
            asyncio.create_task(client.generate(f"Count from 1 to {20 + i}.", temperature=0.0, max_tokens=48))
            for i in range(IN_FLIGHT)
        ]
        while await _in_flight(http) < IN_FLIGHT:  # each poll is a real round trip: waits on state, not time
            assert not any(call.done() for call in calls), "a request finished before SIGTERM was sent"
        process.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures
    assert all(r.usage.output_tokens > 0 for r in results if not isinstance(r, BaseException))
    assert await asyncio.wait_for(process.wait(), timeout=60) == 0
