"""Fair admission: a partner flooding a saturated model cannot starve a partner that sends its share."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from gateway_process import start_gateway_process

from serving.client import ApiError, AsyncClient
from serving.models.registry import DEFAULT_REGISTRY
from serving.partners.store import PartnerStore
from serving.settings import Settings

CAPACITY = 1  # requests in flight to the model per gateway; beyond it partners queue fairly
FLOODERS = 10  # A keeps ten requests outstanding: ten times a fair share of the one slot
B_REQUESTS = 60
# B's share: one request every 60 ms (about 17/s), below half of what the one slot serves (~40/s).
B_INTERVAL_S = 0.06
TEXT = "A partner backend asks for an embedding of this ordinary sentence."


async def _b_latencies(client: AsyncClient) -> tuple[list[float], int]:
    """B sends its share as an open-loop stream: one request every B_INTERVAL_S, whatever the replies do
    (each start is scheduled with call_at on the loop clock; nothing sleeps)."""
    loop = asyncio.get_running_loop()
    first = loop.time() + B_INTERVAL_S

    async def one(i: int) -> float | None:
        slot: asyncio.Future[None] = loop.create_future()
        loop.call_at(first + i * B_INTERVAL_S, slot.set_result, None)
        await slot
        started = time.perf_counter()
        try:
            await client.embed([f"{TEXT} ({i})"])
        except ApiError:
            return None
        return time.perf_counter() - started

    outcomes = await asyncio.gather(*(one(i) for i in range(B_REQUESTS)))
    latencies = [o for o in outcomes if o is not None]
    return latencies, len(outcomes) - len(latencies)


async def test_flooding_partner_does_not_starve_a_fair_one(
    settings: Settings, ray_models: dict[str, Any], store: PartnerStore, tmp_path: Path
) -> None:
    keys = [store.issue_key(store.create_partner(f"{who}-{uuid.uuid4().hex[:6]}", plan="unlimited").id) for who in "AB"]
    # A gateway process of its own (clients and gateway must not share one event loop), whose embedding
    # model admits CAPACITY requests at a time.
    registry = tmp_path / "models.toml"
    registry.write_text(
        DEFAULT_REGISTRY.read_text().replace(
            "admission = { max_concurrency = 64 }", f"admission = {{ max_concurrency = {CAPACITY} }}", 1
        )
    )
    process, ports = await start_gateway_process(
        settings, SERVING_MODEL_REGISTRY=str(registry), SERVING_GATEWAY_ID="fair-1"
    )
    try:
        target = f"127.0.0.1:{ports['grpc_port']}"
        async with AsyncClient(target, keys[0]) as a, AsyncClient(target, keys[1]) as b:
            unloaded, _ = await _b_latencies(b)
            stop = asyncio.Event()
            saturated = asyncio.Event()
            a_done: list[int] = []

            async def flood() -> None:
                while not stop.is_set():
                    try:
                        await a.embed([TEXT])
                        a_done.append(1)
                    except ApiError:
                        a_done.append(0)
                    if len(a_done) >= 2 * FLOODERS:
                        saturated.set()

            flooders = [asyncio.create_task(flood()) for _ in range(FLOODERS)]
            saturated.clear()
            await saturated.wait()  # A has completed a round of requests: the model is saturated by A
            loaded, failures = await _b_latencies(b)
            stop.set()
            await asyncio.gather(*flooders)
    finally:
        process.send_signal(signal.SIGTERM)
        await process.wait()
    base, busy = statistics.median(unloaded), statistics.median(loaded)
    success = (B_REQUESTS - failures) / B_REQUESTS
    print(
        f"B unloaded median {base * 1000:.1f} ms, under A's flood {busy * 1000:.1f} ms "
        f"(x{busy / base:.2f}); B success {success:.1%}; A served {sum(a_done)} of {len(a_done)}"
    )
    assert success >= 0.99
    assert busy <= 2 * base
