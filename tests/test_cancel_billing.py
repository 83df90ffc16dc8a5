"""Cancelled streams on a busy gateway are billed at least what the client received, on all three stream routes.

A delta counts as sent once the core hands it to the front door, whatever cancellation does after: billed is the
``output_tokens`` of the last delta the client got, or of the one after it (in flight when the client left),
never less. Other traffic keeps the gateway's event loop busy so that cancels race the transport."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable

import httpx
from test_streaming import MODEL, _prompt, _reference, _wait_for_row

from serving.gateway.app import Gateway
from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving_sdk import AsyncClient, TextDelta

CANCEL_AFTER = (3, 5, 8)
REPEATS = 3
PROMPTS = 3


async def _grpc_stream(target: str, key: str, prompt: str, request_id: str, deltas: int) -> int:
    """Cancels after ``deltas`` deltas; returns the output tokens the client was told it received."""
    received = 0
    async with AsyncClient(target, key) as client:
        count = 0
        async for event in client.generate_stream(prompt, temperature=0.0, max_tokens=40, request_id=request_id):
            assert isinstance(event, TextDelta)
            received, count = event.output_tokens, count + 1
            if count == deltas:
                break  # leaving the loop cancels the call
    return received


async def _sse_lines(base: str, path: str, body: dict[str, object], headers: dict[str, str], deltas: int) -> list[str]:
    """The first ``deltas`` data lines carrying text; then the connection is closed under the stream."""
    lines: list[str] = []
    async with (
        httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http,
        http.stream("POST", path, json=body) as reply,
    ):
        assert reply.status_code == 200, await reply.aread()
        async for line in reply.aiter_lines():
            if line.startswith("data: {") and ('"delta"' in line or '"content"' in line):
                lines.append(line[6:])
                if len(lines) == deltas:
                    break  # leaving the block closes the connection mid-stream
    return lines


async def test_cancelled_streams_under_load_are_never_billed_less_than_received(
    gateway: Gateway, settings: Settings, store: PartnerStore, grpc_target: str
) -> None:
    partner = store.create_partner(f"cancel-load-{uuid.uuid4().hex[:6]}", plan="unlimited")
    key = store.issue_key(partner.id)
    base = f"http://127.0.0.1:{gateway.http_port}"
    auth = {"authorization": f"Bearer {key}"}
    references = [await _reference(grpc_target, key, _prompt(i)) for i in range(PROMPTS)]

    async def native(prompt: str, request_id: str, deltas: int) -> int:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        body |= {"max_tokens": 40, "request_id": request_id}
        lines = await _sse_lines(base, "/v1/generate/stream", body, auth, deltas)
        return int(json.loads(lines[-1])["output_tokens"])

    async def openai(prompt: str, request_id: str, deltas: int) -> int:
        body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
        body |= {"max_tokens": 40, "stream": True}
        lines = await _sse_lines(base, "/v1/chat/completions", body, auth | {"idempotency-key": request_id}, deltas)
        return len(lines)  # chunks: OpenAI's carry no token counts; the reference maps them to tokens

    def grpc_route(prompt: str, request_id: str, deltas: int) -> Awaitable[int]:
        return _grpc_stream(grpc_target, key, prompt, request_id, deltas)

    routes: dict[str, Callable[[str, str, int], Awaitable[int]]] = {"grpc": grpc_route, "sse": native, "openai": openai}
    stop = asyncio.Event()

    async def busy() -> None:  # other partners' traffic: the gateway's loop has other work when cancels land
        async with AsyncClient(grpc_target, key) as client:
            while not stop.is_set():
                await client.embed(["keeping the gateway busy"] * 8)

    background = [asyncio.create_task(busy()) for _ in range(6)]
    plan = [
        (route, n, f"{route}-{n}-{r}-{uuid.uuid4().hex[:8]}", r % PROMPTS)
        for route in routes
        for n in CANCEL_AFTER
        for r in range(REPEATS)
    ]
    try:
        received = await asyncio.gather(*(routes[route](_prompt(p), rid, n) for route, n, rid, p in plan))
    finally:
        stop.set()
        await asyncio.gather(*background)
    over = 0
    for (route, n, request_id, p), got in zip(plan, received, strict=True):
        counts = [d.output_tokens for d in references[p]]
        status, billed = await _wait_for_row(gateway, settings, partner.id, request_id)
        assert status == "cancelled", (route, request_id, status)
        told = counts[got - 1] if route == "openai" else got  # tokens in what the client received
        assert told == counts[n - 1], (route, n, told, counts)
        # Received, or more: the deltas handed to the transport before the cancel was seen (on a busy machine an
        # HTTP stream can have more than one in its socket buffers). Never less, and always a whole delta.
        assert billed in counts[n - 1 :], (route, n, billed, counts[n - 1 :])
        over += billed > told
    print(f"{len(plan)} cancelled streams over {len(routes)} routes: {len(plan) - over} billed exactly what the client"
          f" received, {over} more (deltas in flight at the cancel), 0 less")  # fmt: skip
