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
import threading
import time
from typing import TextIO

ACCESS_LOGGER = "serving.access"
_GATHER_S = 0.02  # the writer thread wakes at most this often under load


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
    text = json.dumps(line, separators=(",", ":"))
    for handler in logger.handlers:
        if isinstance(handler, _Lines):  # configured for serving: straight onto the writer's queue, no LogRecord
            handler.put(text)
            return
    logger.info(text)


class _Lines(logging.Handler):
    """Puts each access line (the record's message is the finished JSON) on a queue, as it is: none of
    QueueHandler's formatting and record copying on the event loop. A thread writes the lines."""

    def __init__(self, lines: queue.SimpleQueue[str | None]) -> None:
        super().__init__()
        self._lines = lines

    def put(self, line: str) -> None:
        self._lines.put(line)

    def handle(self, record: logging.LogRecord) -> bool:  # no handler lock, no filters: only the put
        self._lines.put(str(record.msg))
        return True

    def emit(self, record: logging.LogRecord) -> None:
        self.handle(record)


class LineWriter:
    """The thread that writes queued access lines to the stream; ``stop()`` writes what is queued, then ends."""

    def __init__(self, lines: queue.SimpleQueue[str | None], stream: TextIO) -> None:
        self._lines = lines
        self._stream = stream
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._lines.get()]
            while not self._lines.empty():
                batch.append(self._lines.get_nowait())
            done = None in batch
            lines = [line for line in batch if line is not None]
            if lines:
                self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
            if done:
                return
            # Lines gather meanwhile: a put then wakes no thread, so the event loop keeps the GIL.
            time.sleep(_GATHER_S)

    def stop(self) -> None:
        self._lines.put(None)
        self._thread.join()


def configure(enabled: bool, stream: TextIO = sys.stderr) -> LineWriter:
    """At process start: access lines go to ``stream`` (stderr: stdout carries the READY line) as bare JSON,
    without a log prefix, and not to the root logger. The event loop only enqueues each line; a writer thread
    writes it, so a slow stderr never stalls requests. Stop the returned writer at exit (it flushes)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.WARNING)
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    logger.addHandler(_Lines(lines))
    return LineWriter(lines, stream)
