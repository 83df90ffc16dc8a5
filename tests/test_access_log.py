"""Access log: one JSON line per request from the core's finish path, with the partner id and never the key."""

from __future__ import annotations

import io
import json
import logging
import uuid

import httpx
import pytest

from serving.observability import access_log


def lines_for(caplog: pytest.LogCaptureFixture, request_id: str) -> list[dict[str, object]]:
    records = [r for r in caplog.records if r.name == access_log.ACCESS_LOGGER]
    parsed = [json.loads(r.getMessage()) for r in records]
    return [line for line in parsed if line["request_id"] == request_id]


async def test_one_line_per_request_with_partner_and_without_key(
    http_base: str, api_key: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=access_log.ACCESS_LOGGER)
    request_id = uuid.uuid4().hex
    async with httpx.AsyncClient(base_url=http_base) as http:
        ok = await http.post(
            "/v1/embed",
            json={"model": "minilm-l6", "texts": ["hello"], "request_id": request_id},
            headers={"authorization": f"Bearer {api_key}", "x-request-id": "trace-42"},
        )
        denied = await http.post(
            "/v1/embed", json={"model": "minilm-l6", "texts": ["hello"]}, headers={"authorization": "Bearer nope"}
        )
    assert ok.status_code == 200 and denied.status_code == 401

    [line] = lines_for(caplog, request_id)
    assert line["model"] == "minilm-l6" and line["operation"] == "embed" and line["status"] == "ok"
    assert isinstance(line["partner_id"], str) and line["partner_id"]
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] > 0
    assert line["input_tokens"] == ok.json()["usage"]["input_tokens"]
    assert str(line["peer"]).startswith("127.0.0.1")
    assert set(line) == {
        "ts", "request_id", "partner_id", "model", "operation", "status", "latency_ms", "queue_ms",
        "input_tokens", "output_tokens", "peer", "correlation_id",
    }  # fmt: skip
    assert line["correlation_id"] == "trace-42"

    texts = [r.getMessage() for r in caplog.records if r.name == access_log.ACCESS_LOGGER]
    assert not any(api_key in text or api_key.split("_")[-1] in text for text in texts)  # no key, no secret
    unauthenticated = [json.loads(t) for t in texts if json.loads(t)["status"] == "unauthenticated"]
    assert unauthenticated and all(u["partner_id"] is None for u in unauthenticated)


def test_configure_writes_bare_json_lines_off_the_root_logger() -> None:
    stream = io.StringIO()
    lines = access_log.configure(True, stream)
    logger = logging.getLogger(access_log.ACCESS_LOGGER)
    try:
        access_log.write(
            logger,
            request_id="r1",
            partner_id="p1",
            model="m",
            operation="embed",
            status="ok",
            latency_s=0.0125,
            queue_s=0.0,
            input_tokens=3,
            output_tokens=0,
            peer="10.0.0.1:5000",
            finished_at=0.0,
        )
        lines.stop()  # the listener thread has written everything queued
        assert json.loads(stream.getvalue()) == {
            "ts": "1970-01-01T00:00:00.000+00:00", "request_id": "r1", "partner_id": "p1", "model": "m",
            "operation": "embed", "status": "ok", "latency_ms": 12.5, "queue_ms": 0.0, "input_tokens": 3,
            "output_tokens": 0, "peer": "10.0.0.1:5000", "correlation_id": None,
        }  # fmt: skip
        assert logger.propagate is False
        lines = access_log.configure(False, stream)
        access_log.write(
            logger, request_id="r2", partner_id=None, model="m", operation="embed", status="ok", latency_s=0,
            queue_s=0, input_tokens=0, output_tokens=0, peer=None, finished_at=0.0,
        )  # fmt: skip
        lines.stop()
        assert stream.getvalue().count("\n") == 1  # disabled: nothing more
    finally:
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
