"""The gRPC user: a custom locust ``User`` over the partner SDK (``serving_sdk.Client``), reporting each
call to locust's request events. gRPC runs cooperatively under gevent (``grpc.experimental.gevent``, set up by
the locustfile's init hook before any channel exists)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from locust import User, task

from gatelib.actor import Actor, Usage
from gatelib.outcomes import RunFile
from gatelib.texts import SYSTEM_PROMPT
from serving_sdk import ApiError, ChatMessage, Client, GenerateResult, RetryPolicy, TextDelta


class GrpcApiUser(User):
    """Embeddings, zero-shot classification, generation and streamed generation over gRPC."""

    weight = 3

    def on_start(self) -> None:
        run = RunFile.read(Path(self.environment.parsed_options.run_file))
        self.actor = Actor(self.environment, run, "gRPC", run.grpc_mix)
        # One attempt per request id: the SDK's retry of UNAVAILABLE would resend a used (single-use) id.
        self.client = Client(run.grpc_target, self.actor.partner.api_key, timeout_s=60.0, retry=RetryPolicy(1))

    def on_stop(self) -> None:
        self.client.close()

    def wait_time(self) -> float:
        return self.actor.wait_s()

    @task
    def call(self) -> None:
        op = self.actor.next_op()
        if op is not None:
            self.timed(f"grpc {op}", getattr(self, op))

    def timed(self, name: str, send: Callable[[str, str, float], Usage]) -> None:
        request_id = self.actor.request_id()
        started = time.perf_counter()
        try:
            usage = send(name, request_id, started)
        except ApiError as exc:
            self.actor.report(name, started, exc.code, request_id, error=exc)
        except Exception as exc:  # a client-side failure: reported, so the run goes on
            self.actor.report(name, started, "CLIENT_ERROR", request_id, error=exc)
        else:
            self.actor.report(name, started, "OK", request_id, usage)

    def embed(self, _name: str, request_id: str, _started: float) -> Usage:
        result = self.client.embed(self.actor.texts.batch(), request_id=request_id)
        return Usage(result.usage.input_tokens, result.usage.output_tokens)

    def classify(self, _name: str, request_id: str, _started: float) -> Usage:
        texts = self.actor.texts
        result = self.client.classify(texts.batch(), texts.labels(), request_id=request_id)
        return Usage(result.usage.input_tokens, result.usage.output_tokens)

    def sampling(self) -> dict[str, Any]:
        return {"max_tokens": self.actor.run.max_tokens, "temperature": 0.7, "seed": self.actor.rng.randrange(2**31)}

    def chat(self) -> list[ChatMessage]:
        return [ChatMessage("system", SYSTEM_PROMPT), ChatMessage("user", self.actor.texts.question())]

    def generate(self, _name: str, request_id: str, _started: float) -> Usage:
        result = self.client.generate(self.chat(), request_id=request_id, **self.sampling())
        return Usage(result.usage.input_tokens, result.usage.output_tokens)

    def generate_stream(self, name: str, request_id: str, started: float) -> Usage:
        final: GenerateResult | None = None
        first = True
        for event in self.client.generate_stream(self.chat(), request_id=request_id, **self.sampling()):
            if isinstance(event, TextDelta):
                if first:
                    self.actor.report_ttft(name, started)
                    first = False
            else:
                final = event
        if final is None:
            raise ApiError("INTERNAL", "the stream ended without its final event")
        return Usage(final.usage.input_tokens, final.usage.output_tokens)
