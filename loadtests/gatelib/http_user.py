"""The HTTP user: locust's ``HttpUser`` on the native routes (``/v1/embed``, ``/v1/classify``) and the
OpenAI-compatible ones (``/v1/embeddings``, ``/v1/chat/completions``, streamed too, with time to first token
as its own entry). Every request carries its own id as its ``Idempotency-Key`` (the ledger records it); each is
reported once, with its outcome, through locust's ``catch_response`` context."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

from locust import HttpUser, task
from locust.clients import ResponseContextManager

from gatelib.actor import Actor, Usage
from gatelib.outcomes import RunFile
from gatelib.texts import SYSTEM_PROMPT

EMBED_MODEL = "minilm-l6"
CLASSIFY_MODEL = "zero-shot"
GENERATE_MODEL = "smollm2-135m-instruct"


class HttpApiUser(HttpUser):
    """The host is the gateway's HTTP base URL (locust's ``--host``)."""

    weight = 2

    def on_start(self) -> None:
        run = RunFile.read(Path(self.environment.parsed_options.run_file))
        self.actor = Actor(self.environment, run, "HTTP", run.http_mix)

    def wait_time(self) -> float:
        return self.actor.wait_s()

    @task
    def call(self) -> None:
        op = self.actor.next_op()
        if op is not None:
            getattr(self, op)(f"http {op}")

    def post(self, name: str, path: str, body: dict[str, Any], stream: bool = False) -> None:
        request_id = self.actor.request_id()
        headers = {"authorization": f"Bearer {self.actor.partner.api_key}", "idempotency-key": request_id}
        started = time.perf_counter()
        with self.client.post(
            path, json=body, headers=headers, name=name, catch_response=True, stream=stream, timeout=60
        ) as response:
            assert isinstance(response, ResponseContextManager)
            code = "OK" if response.status_code == 200 else str(response.status_code)
            usage, error = Usage(), None
            if code == "OK":
                try:
                    usage = self.read_stream(name, response, started) if stream else usage_of(response.json())
                except (ValueError, KeyError) as exc:
                    code, error = "BAD_RESPONSE", RuntimeError(f"{name}: {exc}")
            meta = self.actor.event(name, started, code, request_id, usage, error)
            request_meta = cast(dict[str, Any], response.request_meta)  # a dict, typed as a Mapping
            request_meta.update(meta)
            if meta["exception"] is None:
                response.success()
            else:
                response.failure(meta["exception"])

    def read_stream(self, name: str, response: ResponseContextManager, started: float) -> Usage:
        """Server-sent chunks until ``data: [DONE]``; the first content delta is the first token."""
        usage: Usage | None = None
        first = True
        for raw in response.iter_lines():
            line = raw.decode() if isinstance(raw, bytes) else str(raw)
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise ValueError(f"stream error: {chunk['error']}")
            choices = chunk.get("choices") or []
            if first and choices and choices[0].get("delta", {}).get("content"):
                self.actor.report_ttft(name, started)
                first = False
            if chunk.get("usage"):
                usage = usage_of(chunk)
        if usage is None:
            raise ValueError("the stream ended without its usage chunk")
        return usage

    def chat_body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": GENERATE_MODEL,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": self.actor.texts.question()},
            ],
            "max_tokens": self.actor.run.max_tokens,
            "temperature": 0.7,
            "seed": self.actor.rng.randrange(2**31),
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        return body

    def embed(self, name: str) -> None:
        self.post(name, "/v1/embed", {"model": EMBED_MODEL, "texts": self.actor.texts.batch()})

    def classify(self, name: str) -> None:
        texts = self.actor.texts
        self.post(name, "/v1/classify", {"model": CLASSIFY_MODEL, "texts": texts.batch(), "labels": texts.labels()})

    def openai_embeddings(self, name: str) -> None:
        body = {"model": EMBED_MODEL, "input": self.actor.texts.batch(), "encoding_format": "base64"}
        self.post(name, "/v1/embeddings", body)

    def openai_chat(self, name: str) -> None:
        self.post(name, "/v1/chat/completions", self.chat_body(stream=False))

    def openai_chat_stream(self, name: str) -> None:
        self.post(name, "/v1/chat/completions", self.chat_body(stream=True), stream=True)


def usage_of(payload: dict[str, Any]) -> Usage:
    """Native ``{input_tokens, output_tokens}`` or OpenAI ``{prompt_tokens, completion_tokens}``."""
    usage = payload["usage"]
    if "prompt_tokens" in usage:
        return Usage(int(usage["prompt_tokens"]), int(usage.get("completion_tokens") or 0))
    return Usage(int(usage["input_tokens"]), int(usage["output_tokens"]))
