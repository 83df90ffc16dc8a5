"""Access log: one structured JSON line per request, written once from the core's finish path.

A dedicated logger (``serving.access``), so that operators route or silence it apart from the application log.
Fields: time, request id, partner id (never the API key or its id), model, operation, final status, latency,
fair-queue wait, tokens, the caller's address and its correlation id (``x-request-id``).
"""

from __future__ import annotations

import datetime
import json
import logging
import queue
import sys
from logging.handlers import QueueHandler, QueueListener
from typing import TextIO

ACCESS_LOGGER = "serving.access"


def write(
    logger: logging.Logger,
    *,
    request_id: str,
    partner_id: str | None,
    model: str,
    operation: str,
    status: str,
    latency_s: float,
    queue_s: float,
    input_tokens: int,
    output_tokens: int,
    peer: str | None,
    finished_at: float,
    correlation_id: str | None = None,
) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    line = {
        "ts": datetime.datetime.fromtimestamp(finished_at, datetime.UTC).isoformat(timespec="milliseconds"),
        "request_id": request_id or None,
        "partner_id": partner_id,
        "model": model,
        "operation": operation,
        "status": status,
        "latency_ms": round(latency_s * 1000, 3),
        "queue_ms": round(queue_s * 1000, 3),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "peer": peer,
        "correlation_id": correlation_id,  # the caller's x-request-id, when it sent one
    }
    logger.info(json.dumps(line, separators=(",", ":")))


def configure(enabled: bool, stream: TextIO = sys.stderr) -> QueueListener:
    """At process start: access lines go to ``stream`` (stderr: stdout carries the READY line) as bare JSON,
    without a log prefix, and not to the root logger. The event loop only enqueues each line; a listener
    thread writes it, so a slow stderr never stalls requests. Stop the returned listener at exit (it flushes)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    logger.addHandler(QueueHandler(lines))
    listener = QueueListener(lines, handler)
    listener.start()
    return listener
