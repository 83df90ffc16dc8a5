"""The OpenAI-compatible routes' logic in-process: the error table's OpenAI codes and headers, and the routes over a
fake core (body checks, shapes, token ids, dimensions). The real stack is in test_openai_compat.py."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from serving.domain import (
    ChatMessage,
    EmbedRequest,
    EmbedResult,
    FinishReason,
    GenerateRequest,
    GenerateResult,
    ModelInfo,
    StreamEvent,
    Task,
    TextDelta,
    Usage,
)
from serving.errors import (
    ContextLengthExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    QuotaExceeded,
    Unauthenticated,
    describe,
    openai_type_code,
)
from serving.gateway import validation
from serving.gateway.core import CallContext, Core
from serving.gateway.http_common import HttpConfig, error_response, install_error_handlers
from serving.gateway.http_openai import FINISH_REASONS, openai_error, openai_router
from serving.gateway.stream import EventStream
from serving.models.registry import ModelSpec
from serving.settings import Limits

OPENAI_FINISH = {"stop", "length", "content_filter", "tool_calls", "function_call"}


# --- in-process: the error table, the route logic over a fake core --------------------------------------------


def test_openai_codes_for_quota_model_and_key_errors() -> None:
    per_minute = QuotaExceeded("requests per minute limit reached", param="requests")
    assert openai_type_code(per_minute) == ("rate_limit_error", "rate_limit_exceeded")
    assert openai_type_code(QuotaExceeded("big", param="tokens_request")) == ("rate_limit_error", "rate_limit_exceeded")
    monthly = QuotaExceeded("monthly budget used up", param="monthly_tokens")
    assert openai_type_code(monthly) == ("insufficient_quota", "insufficient_quota")
    assert openai_type_code(ModelNotFound("no")) == ("invalid_request_error", "model_not_found")
    assert openai_type_code(Unauthenticated("no")) == ("authentication_error", "invalid_api_key")
    assert openai_type_code(ContextLengthExceeded("long")) == ("invalid_request_error", "context_length_exceeded")
    # The native routes and gRPC keep their codes.
    assert describe(per_minute).code == describe(monthly).code == "quota_exceeded"
    assert describe(ContextLengthExceeded("long")).code == "invalid_argument"


def test_retry_after_headers_in_seconds_and_milliseconds() -> None:
    limited = error_response(QuotaExceeded("slow down", param="tokens", retry_after_s=12.3401), openai=True)
    assert limited.status_code == 429
    assert (limited.headers["retry-after"], limited.headers["retry-after-ms"]) == ("13", "12341")
    assert "x-should-retry" not in limited.headers
    assert json.loads(bytes(limited.body))["error"] == {
        "message": "slow down",
        "type": "rate_limit_error",
        "code": "rate_limit_exceeded",
        "param": "tokens",
    }
    overloaded = error_response(Overloaded("busy", retry_after_s=1.0), openai=True)
    assert overloaded.status_code == 503
    assert (overloaded.headers["retry-after"], overloaded.headers["retry-after-ms"]) == ("1", "1000")
    # A used-up month cannot pass by retrying: OpenAI's clients are told not to.
    monthly = error_response(QuotaExceeded("used up", param="monthly_tokens", retry_after_s=86_400.0), openai=True)
    assert monthly.headers["x-should-retry"] == "false"
    assert json.loads(bytes(monthly.body))["error"]["code"] == "insufficient_quota"


def test_finish_reasons_are_openais() -> None:
    assert set(FINISH_REASONS) == set(FinishReason)
    assert set(FINISH_REASONS.values()) <= OPENAI_FINISH
    assert FINISH_REASONS[FinishReason.CANCELLED] == "length"  # cut short, never "cancelled"


class CountingCodec:
    """Three tokens per word."""

    def count(self, texts: list[str]) -> list[int]:
        return [3 * len(text.split()) for text in texts]

    def encode_prompt(self, prompt: str) -> list[int]:
        return [0] * self.count([prompt])[0]


def test_over_long_input_is_context_length_exceeded() -> None:
    """Validation raises ContextLengthExceeded (native doors: INVALID_ARGUMENT / invalid_argument); the OpenAI routes
    name the embed request's ``texts`` ``input``."""
    spec = cast(ModelSpec, type("Spec", (), {"id": "tiny", "max_input_tokens": 10})())
    codec: Any = CountingCodec()
    with pytest.raises(InvalidInput) as caught:
        validation.texts(["fits", "one two three four"], Limits(), codec, spec)
    error = openai_error(caught.value)
    assert type(error) is ContextLengthExceeded and error.param == "input[1]"
    assert error.message.startswith("input[1] has 12 tokens; tiny accepts at most 10")
    with pytest.raises(InvalidInput) as caught:
        validation.prompt_ids(GenerateRequest("tiny", prompt="a b c d"), codec, spec, Limits())
    error = openai_error(caught.value)
    assert type(error) is ContextLengthExceeded and error.param == "prompt"
    empty = openai_error(InvalidInput("texts[0] is empty", param="texts[0]"))
    assert type(empty) is InvalidInput and (empty.message, empty.param) == ("input[0] is empty", "input[0]")


class FakeCore:
    """What the OpenAI routes ask of the core, in memory: one key, one embed and one generation model."""

    KEY = "sk-test"

    def __init__(self, finish: FinishReason = FinishReason.STOP) -> None:
        self.finish = finish
        self.requests: list[EmbedRequest | GenerateRequest] = []
        self.scopes_checked: list[str | None] = []  # the scope each credential check asked for

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("emb", Task.EMBED, 4, 16, True), ModelInfo("gen", Task.GENERATE, 0, 64, True)]

    async def authenticate(self, ctx: CallContext, scope: str | None = None) -> None:
        if ctx.api_key != self.KEY:
            raise Unauthenticated("unknown API key", param="authorization")
        self.scopes_checked.append(scope)

    async def list_models(self, ctx: CallContext) -> list[ModelInfo]:
        await self.authenticate(ctx)
        return self.models()

    async def embed(self, ctx: CallContext, req: EmbedRequest) -> EmbedResult:
        await self.authenticate(ctx)
        self.requests.append(req)
        return EmbedResult(req.model, [[0.5, -0.5, 0.5, -0.5] for _ in req.texts], Usage(2 * len(req.texts)), "r1")

    def _result(self, req: GenerateRequest) -> GenerateResult:
        return GenerateResult(req.model, "Hello there", self.finish, Usage(5, 2), "r1", 1_700_000_000)

    async def generate(self, ctx: CallContext, req: GenerateRequest) -> GenerateResult:
        await self.authenticate(ctx)
        self.requests.append(req)
        return self._result(req)

    async def generate_stream(self, ctx: CallContext, req: GenerateRequest) -> EventStream:
        await self.authenticate(ctx)
        self.requests.append(req)
        ctx.meta.request_id = "r1"

        async def events() -> AsyncIterator[StreamEvent]:
            yield TextDelta("Hello", 1)
            yield TextDelta(" there", 2)
            yield self._result(req)

        async def nothing() -> None:
            pass

        return EventStream(events(), nothing)


def fake_app(core: FakeCore) -> httpx.AsyncClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(openai_router(cast(Core, core), HttpConfig(max_request_bytes=1 << 20, timeout_s=30.0)))
    headers = {"authorization": f"Bearer {FakeCore.KEY}"}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", headers=headers)


CHAT = {"model": "gen", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "gen", "prompt": "Once upon a time"}


@pytest.mark.parametrize(
    ("path", "extra", "code", "param"),
    [
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "unsupported_parameter", "tools"),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "unsupported_parameter", "tool_choice"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "unsupported_parameter", "functions"),
        ("/v1/chat/completions", {"function_call": "auto"}, "unsupported_parameter", "function_call"),
        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, "unsupported_value", "response_format"),
        ("/v1/chat/completions", {"logprobs": True}, "unsupported_parameter", "logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "unsupported_parameter", "top_logprobs"),
        ("/v1/chat/completions", {"n": 2}, "unsupported_value", "n"),
        ("/v1/chat/completions", {"presence_penalty": 0.5}, "unsupported_value", "presence_penalty"),
        ("/v1/chat/completions", {"frequency_penalty": -1}, "unsupported_value", "frequency_penalty"),
        ("/v1/chat/completions", {"logit_bias": {"50256": -100}}, "unsupported_parameter", "logit_bias"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "unsupported_value", "modalities"),
        ("/v1/completions", {"echo": True}, "unsupported_parameter", "echo"),
        ("/v1/completions", {"best_of": 2}, "unsupported_value", "best_of"),
        ("/v1/completions", {"logprobs": 0}, "unsupported_parameter", "logprobs"),
        ("/v1/completions", {"suffix": "The end."}, "unsupported_parameter", "suffix"),
        ("/v1/completions", {"n": 3}, "unsupported_value", "n"),
        ("/v1/completions", {"prompt": ["one", "two"]}, "unsupported_value", "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 3]}, "unsupported_value", "prompt"),
        ("/v1/completions", {"prompt": "  "}, "invalid_argument", "prompt"),
        ("/v1/completions", {"prompt": 7}, "invalid_argument", "prompt"),
        ("/v1/completions", {"max_tokens": 0}, "invalid_argument", "max_tokens"),
        ("/v1/chat/completions", {"max_completion_tokens": 0}, "invalid_argument", "max_completion_tokens"),
    ],
)
async def test_unsupported_features_get_a_clear_400(path: str, extra: dict[str, Any], code: str, param: str) -> None:
    core = FakeCore()
    async with fake_app(core) as http:
        reply = await http.post(path, json=(CHAT if "chat" in path else COMPLETION) | extra)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert param in error["message"]
    assert core.requests == []  # rejected before the core ran anything


async def test_harmless_fields_are_accepted_and_ignored() -> None:
    core = FakeCore()
    harmless = {
        "user": "u-1",
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logit_bias": {},
        "metadata": {"team": "x"},
        "store": False,
        "service_tier": "auto",
        "parallel_tool_calls": True,
        "some_future_field": {"nested": [1, 2]},
    }
    chat_only = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logprobs": False}
    completion_only = {"echo": False, "best_of": 1, "suffix": None, "logprobs": None, "prompt": ["Once upon a time"]}
    async with fake_app(core) as http:
        chat = await http.post("/v1/chat/completions", json=CHAT | harmless | chat_only | {"max_tokens": 7})
        text = await http.post("/v1/completions", json=COMPLETION | harmless | completion_only | {"stop": "\n"})
    assert chat.status_code == text.status_code == 200, (chat.text, text.text)
    assert core.requests == [
        GenerateRequest("gen", messages=[ChatMessage("user", "Hi")], max_tokens=7),
        GenerateRequest("gen", prompt="Once upon a time", stop=["\n"]),
    ]


async def test_completion_shapes_streamed_and_not() -> None:
    async with fake_app(FakeCore()) as http:
        whole = (await http.post("/v1/completions", json=COMPLETION)).json()
        body = COMPLETION | {"stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = [line async for line in stream.aiter_lines() if line.startswith("data: ")]
    assert whole == {
        "id": "cmpl-r1",
        "object": "text_completion",
        "created": 1_700_000_000,
        "model": "gen",
        "choices": [{"index": 0, "text": "Hello there", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {(c["id"], c["object"], c["model"]) for c in chunks} == {("cmpl-r1", "text_completion", "gen")}
    assert [c["choices"] for c in chunks] == [
        [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": " there", "logprobs": None, "finish_reason": None}],
        [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}],
        [],
    ]
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


async def test_a_cancelled_generation_finishes_as_length() -> None:
    async with fake_app(FakeCore(FinishReason.CANCELLED)) as http:
        whole = (await http.post("/v1/chat/completions", json=CHAT)).json()
        async with http.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as stream:
            lines = [line async for line in stream.aiter_lines() if line.startswith("data: {")]
    assert whole["choices"][0]["finish_reason"] == "length"
    assert [json.loads(line[6:])["choices"][0]["finish_reason"] for line in lines] == [None, None, "length"]


async def test_embedding_inputs_token_ids_and_dimensions() -> None:
    core = FakeCore()
    async with fake_app(core) as http:
        one = await http.post("/v1/embeddings", json={"model": "emb", "input": "a"})
        many = await http.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b"], "dimensions": 4})
        packed = await http.post("/v1/embeddings", json={"model": "emb", "input": "a", "encoding_format": "base64"})
        # OpenAI's cl100k_base ids: "hello world" is [15339, 1917]; 100277 is past the vocabulary.
        ids = await http.post("/v1/embeddings", json={"model": "emb", "input": [15339, 1917]})
        id_lists = await http.post("/v1/embeddings", json={"model": "emb", "input": [[15339], [1917, 0]]})
        unknown_id = await http.post("/v1/embeddings", json={"model": "emb", "input": [[15339], [1917, 100277]]})
        empty_ids = await http.post("/v1/embeddings", json={"model": "emb", "input": [[15339], []]})
        narrower = await http.post("/v1/embeddings", json={"model": "emb", "input": "a", "dimensions": 2})
        anonymous = await http.post(
            "/v1/embeddings", json={"model": "emb", "input": "a", "dimensions": 2}, headers={"authorization": ""}
        )
    assert [r.status_code for r in (one, many, packed, ids, id_lists)] == [200] * 5
    assert core.requests == [
        EmbedRequest("emb", ["a"]),
        EmbedRequest("emb", ["a", "b"]),
        EmbedRequest("emb", ["a"]),
        EmbedRequest("emb", ["hello world"]),
        EmbedRequest("emb", ["hello", " world!"]),
    ]
    assert one.json()["data"] == [{"object": "embedding", "index": 0, "embedding": [0.5, -0.5, 0.5, -0.5]}]
    assert one.json()["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    decoded = np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == [0.5, -0.5, 0.5, -0.5]
    assert unknown_id.status_code == 400 and unknown_id.json()["error"]["param"] == "input[1][1]"
    assert "cl100k_base" in unknown_id.json()["error"]["message"]
    assert empty_ids.status_code == 400 and empty_ids.json()["error"]["param"] == "input[1]"
    assert narrower.status_code == 400
    assert (narrower.json()["error"]["code"], narrower.json()["error"]["param"]) == ("unsupported_value", "dimensions")
    assert "returns 4 dimensions" in narrower.json()["error"]["message"]
    assert "embed" in core.scopes_checked  # the embed scope is checked before the dimensions are refused
    assert anonymous.status_code == 401  # the key first, as for every invalid input


async def test_model_by_id_and_unknown_model() -> None:
    async with fake_app(FakeCore()) as http:
        found = await http.get("/v1/models/emb")
        missing = await http.get("/v1/models/nope")
    assert found.json() == {
        "id": "emb",
        "object": "model",
        "created": 0,
        "owned_by": "serving",
        "task": "embed",
        "dimensions": 4,
        "max_input_tokens": 16,
        "ready": True,
    }
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "model 'nope' does not exist; GET /v1/models lists the models",
        "type": "invalid_request_error",
        "code": "model_not_found",
        "param": "model",
    }
