"""Continuous batching through the whole stack: batch-invariant output at temperature 0, and a stream that is
cancelled or whose client vanishes leaves the others alone and is metered for the tokens it was sent."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from serving.gateway.app import Gateway
from serving.partners.store import Partner, PartnerStore
from serving.settings import Settings
from serving.storage.database import Database
from serving_sdk import AsyncClient, GenerateResult, TextDelta

MODEL = "smollm2-135m-instruct"
TOPICS = ["the sea", "a violin", "winter", "bread", "a lighthouse", "trains", "bees", "a library"]


def _prompt(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]}."


async def _collect(
    client: AsyncClient, prompt: str, max_tokens: int, request_id: str = "", **sampling: Any
) -> list[TextDelta]:
    """Every delta of a finished stream (the final event checked against them); greedy unless told otherwise."""
    deltas: list[TextDelta] = []
    sampling = {"temperature": 0.0, **sampling}
    async for event in client.generate_stream(prompt, max_tokens=max_tokens, request_id=request_id, **sampling):
        if isinstance(event, TextDelta):
            deltas.append(event)
        else:
            assert isinstance(event, GenerateResult) and event.text == "".join(d.text for d in deltas)
    return deltas


def _new_partner(store: PartnerStore, name: str) -> tuple[Partner, str, str]:
    """A partner of this test's own (its ledger rows are only this test's), a key and a request id."""
    partner = store.create_partner(f"{name}-{uuid.uuid4().hex[:6]}", plan="unlimited")
    return partner, store.issue_key(partner.id), f"{name}-{uuid.uuid4().hex}"


async def _reference(grpc_target: str, key: str, prompt: str) -> list[TextDelta]:
    """The stream as a client that stays to the end receives it (temperature 0: the same every time)."""
    async with AsyncClient(grpc_target, key) as client:
        return await _collect(client, prompt, 40)


def _text(deltas: list[TextDelta]) -> str:
    return "".join(d.text for d in deltas)


def _billed_chunk(billed: int, reference: list[TextDelta], received: int) -> None:
    """The stream stopped after the client got ``received`` chunks. It is billed for the output tokens of the
    chunks the gateway handed to its transport: those the client got, plus at most one still in flight."""
    counts = [d.output_tokens for d in reference]
    assert billed in counts[received - 1 : received + 1], (billed, counts[received - 1 : received + 1])
    assert billed < counts[-1]


# Greedy probes of different lengths, a stop sequence, and seeded sampling: each keeps its own settings.
PROBES: list[dict[str, Any]] = [
    {"max_tokens": 24},
    {"max_tokens": 40},
    {"max_tokens": 48, "stop": ["."]},
    {"max_tokens": 32, "temperature": 0.9, "top_p": 0.9, "seed": 7},
]


async def test_output_is_the_same_alone_and_in_a_busy_batch(gateway: Gateway, grpc_target: str, api_key: str) -> None:
    route = gateway.router.routes[MODEL]
    async with AsyncClient(grpc_target, api_key) as client:
        alone = [_text(await _collect(client, _prompt(i), **probe)) for i, probe in enumerate(PROBES)]
        before = await route.batch_stats()
        # The probes among eight longer streams, all sharing the replica's running batch.
        background = [asyncio.create_task(_collect(client, _prompt(i + 3), 64)) for i in range(8)]
        busy = await asyncio.gather(*[_collect(client, _prompt(i), **probe) for i, probe in enumerate(PROBES)])
        await asyncio.gather(*background)
        after = await route.batch_stats()
    assert [_text(d) for d in busy] == alone
    assert "." not in alone[2]
    sizes: dict[int, int] = after["sizes"]
    grown = {size for size, count in sizes.items() if count > before["sizes"].get(size, 0)}
    assert max(grown) >= 4, f"the streams never shared a batch: step sizes {sorted(grown)}"
    exposition = gateway.metrics.exposition().decode()
    for name in ("time_to_first_token_seconds_count", "inter_token_seconds_count", "output_tokens_total"):
        assert _sample(exposition, f"serving_generation_{name}") > 0, name


def _sample(exposition: str, name: str) -> float:
    """The value of ``name`` for this model in a Prometheus text exposition."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model") == MODEL:
                return float(sample.value)
    raise AssertionError(f"{name} is not exported for {MODEL}")


async def test_cancelling_one_stream_leaves_the_others_alone_and_bills_what_it_was_sent(
    gateway: Gateway, settings: Settings, store: PartnerStore, grpc_target: str
) -> None:
    partner, key, request_id = _new_partner(store, "cancel")
    async with AsyncClient(grpc_target, key) as client:
        reference = await asyncio.gather(*[_collect(client, _prompt(i), 40) for i in range(8)])
        cancel_after = 5
        received: list[TextDelta] = []

        async def cancelled_stream() -> None:
            async for event in client.generate_stream(
                _prompt(0), temperature=0.0, max_tokens=40, request_id=request_id
            ):
                assert isinstance(event, TextDelta)
                received.append(event)
                if len(received) == cancel_after:
                    break  # leaving the loop cancels the call

        others = [asyncio.create_task(_collect(client, _prompt(i), 40)) for i in range(1, 8)]
        await cancelled_stream()
        rest = await asyncio.gather(*others)
    assert [_text(d) for d in rest] == [_text(d) for d in reference[1:]]
    assert _text(received) == _text(reference[0][:cancel_after])
    status, billed = await _wait_for_row(gateway, settings, partner.id, request_id)
    assert status == "cancelled"
    _billed_chunk(billed, reference[0], cancel_after)


async def _open_sse(port: int, key: str, request_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": _prompt(1)}],
            "temperature": 0,
            "max_tokens": 40,
            "stream": True,
        }
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {key}\r\n"
        f"idempotency-key: {request_id}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def test_a_vanished_http_client_is_detected_and_billed_for_what_it_was_sent(
    gateway: Gateway, settings: Settings, store: PartnerStore, grpc_target: str
) -> None:
    partner, key, request_id = _new_partner(store, "vanish")
    reference = await _reference(grpc_target, key, _prompt(1))
    reader, writer = await _open_sse(gateway.http_port, key, request_id)
    received = ""
    chunks = 0
    while chunks < 4:
        line = (await reader.readline()).decode()
        if line.startswith("data: {"):
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            received += delta
            chunks += 1
    writer.transport.abort()  # the connection drops: no cancel, no close handshake
    status, billed = await _wait_for_row(gateway, settings, partner.id, request_id)
    assert status == "cancelled"
    assert _text(reference).startswith(received)
    _billed_chunk(billed, reference, chunks)


async def _wait_for_row(gateway: Gateway, settings: Settings, partner_id: str, request_id: str) -> tuple[str, int]:
    """The gateway notices a dropped connection on its own schedule: wait until the stream's record exists."""
    while True:
        await asyncio.to_thread(gateway.ledger.flush)
        db = Database(settings.ledger_db_url)
        rows = db.query(
            "SELECT status, output_tokens FROM usage_records WHERE partner_id = ? AND request_id = ?",
            (partner_id, request_id),
        )
        db.close()
        if rows:
            return str(rows[0][0]), int(rows[0][1])
        await asyncio.sleep(0)


_VANISHING_GRPC_CLIENT = """
import asyncio, sys
from serving_sdk import AsyncClient
async def main():
    async with AsyncClient(sys.argv[1], sys.argv[2]) as client:
        async for event in client.generate_stream(sys.argv[3], temperature=0.0, max_tokens=40, request_id=sys.argv[4]):
            print(event.output_tokens, flush=True)
asyncio.run(main())
"""


async def test_a_killed_grpc_client_is_detected_and_billed_for_what_it_was_sent(
    gateway: Gateway, settings: Settings, store: PartnerStore, grpc_target: str
) -> None:
    partner, key, request_id = _new_partner(store, "killed")
    reference = await _reference(grpc_target, key, _prompt(2))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _VANISHING_GRPC_CLIENT, grpc_target, key, _prompt(2), request_id,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    for _ in range(4):
        await process.stdout.readline()
    process.kill()  # SIGKILL: the client process and its connection vanish without a cancel
    await process.wait()
    status, billed = await _wait_for_row(gateway, settings, partner.id, request_id)
    assert status == "cancelled"
    _billed_chunk(billed, reference, 4)
