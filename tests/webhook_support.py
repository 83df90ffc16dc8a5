"""A real webhook receiver for the tests: an HTTP server (uvicorn) on 127.0.0.1, port 0, on the test's event loop.

It answers 500 to the first ``fail_first`` deliveries of each event at each path, then 200; it verifies every
signature with the secret registered for its path, and keeps what arrived. Tests wait on its condition for what
they expect, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn

from serving.webhooks.signer import ATTEMPT_HEADER, EVENT_ID_HEADER, SIGNATURE_HEADER, SignatureError, verify

BOUND_S = 60.0  # an upper bound on waits that end on an event; never reached when things work


@dataclass(frozen=True)
class Received:
    path: str
    event_id: str
    attempt: int
    signature_ok: bool
    body: dict[str, Any]
    answered: int

    @property
    def threshold(self) -> int:
        return int(self.body["data"]["threshold_percent"])


@dataclass
class Receiver:
    fail_first: int
    secrets: dict[str, str] = field(default_factory=dict)  # path → the endpoint's signing secret
    received: list[Received] = field(default_factory=list)
    base_url: str = ""
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def requests(self, path: str, event_id: str) -> list[Received]:
        return [r for r in self.received if r.path == path and r.event_id == event_id]

    def accepted(self, path: str | None = None) -> list[Received]:
        """Deliveries answered 200, in arrival order (the first of each event is the one that counts)."""
        return [r for r in self.received if r.answered == 200 and (path is None or r.path == path)]

    async def wait_for(self, what: str, check: Callable[[], bool]) -> None:
        """Until ``check()`` holds; re-checked whenever a request arrives."""
        try:
            async with asyncio.timeout(BOUND_S), self._changed:
                await self._changed.wait_for(check)
        except TimeoutError:
            seen = [(r.path, r.event_id, r.attempt, r.answered) for r in self.received]
            raise AssertionError(f"timed out waiting for {what}; received {seen}") from None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path = scope["path"]
        if scope["method"] == "GET":  # readiness
            await _answer(send, 200)
            return
        try:
            verify(self.secrets.get(path, ""), headers.get(SIGNATURE_HEADER.lower(), ""), body, time.time())
            signature_ok = True
        except SignatureError:
            signature_ok = False
        event_id = headers.get(EVENT_ID_HEADER.lower(), "")
        earlier = len(self.requests(path, event_id))
        status = 500 if earlier < self.fail_first else 200
        received = Received(
            path, event_id, int(headers.get(ATTEMPT_HEADER.lower(), "0")), signature_ok, json.loads(body), status
        )
        async with self._changed:
            self.received.append(received)
            self._changed.notify_all()
        await _answer(send, status)


class _Server(uvicorn.Server):
    """Leaves the test process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _answer(send: Any, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok" if status == 200 else b"try again"})


@contextlib.asynccontextmanager
async def receiver(fail_first: int) -> AsyncIterator[Receiver]:
    """A running receiver; ready (it answered a request) before the block starts."""
    recv = Receiver(fail_first)
    sock = socket.create_server(("127.0.0.1", 0))
    recv.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = _Server(uvicorn.Config(recv, log_level="warning", lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient() as http:  # the socket listens already: this waits until uvicorn serves
            assert (await http.get(recv.url("/ready"), timeout=BOUND_S)).status_code == 200
        yield recv
    finally:
        server.should_exit = True
        await task
