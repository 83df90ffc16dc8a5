"""The gateway's event loop. uvloop by default: the gateway is bound by its one interpreter, and uvloop's loop,
futures' callbacks and socket transports cost less CPU per request than asyncio's (BENCHMARKS.md, CPU rows).
grpc.aio and Ray's DeploymentHandle both run on it (they hand results to the loop with call_soon_threadsafe)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], loop: str = "uvloop") -> T:
    """``asyncio.run`` on the chosen loop ("uvloop" or "asyncio")."""
    if loop == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
