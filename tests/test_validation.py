"""Every invalid input gets its documented code, over both front doors, and none is INTERNAL / 500."""

from __future__ import annotations

import grpc
import httpx
import pytest

from serving_sdk import ApiError, AsyncClient
from serving_sdk.v1 import inference_pb2

EMBED = "minilm-l6"
GEN = "smollm2-135m-instruct"
LONG_TEXT = "word " * 400


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/embed", {"model": EMBED, "texts": []}, 400, "texts"),
        ("/v1/embed", {"model": EMBED, "texts": ["ok", "  "]}, 400, "texts[1]"),
        ("/v1/embed", {"model": EMBED, "texts": ["x"] * 65}, 400, "texts"),
        ("/v1/embed", {"model": EMBED, "texts": [LONG_TEXT]}, 400, "texts[0]"),
        ("/v1/embed", {"model": EMBED, "texts": [1, 2]}, 400, "texts[0]"),
        ("/v1/embed", {"model": EMBED, "texts": "not a list"}, 400, "texts"),
        ("/v1/embed", {"texts": ["x"]}, 400, "model"),
        ("/v1/embed", {"model": "nope", "texts": ["x"]}, 404, "model"),
        ("/v1/embed", {"model": GEN, "texts": ["x"]}, 400, "model"),
        ("/v1/embed", {"model": EMBED, "texts": ["x"], "request_id": "bad id!"}, 400, "request_id"),
        ("/v1/classify", {"model": "zero-shot", "texts": ["x"]}, 400, "labels"),
        ("/v1/classify", {"model": "zero-shot", "texts": ["x"], "labels": ["a", "a"]}, 400, "labels"),
        ("/v1/generate", {"model": GEN}, 400, "messages"),
        ("/v1/generate", {"model": GEN, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        ("/v1/generate", {"model": GEN, "prompt": "hi", "temperature": 9}, 400, "temperature"),
        ("/v1/generate", {"model": GEN, "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("/v1/generate", {"model": GEN, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ("/v1/generate", {"model": GEN, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ("/v1/generate", {"model": GEN, "prompt": LONG_TEXT * 6}, 400, "prompt"),
        ("/v1/chat/completions", {"model": GEN, "messages": "hi"}, 400, "messages"),
        ("/v1/embeddings", {"model": EMBED, "input": [[1, 2, 100277]]}, 400, "input[0][2]"),
    ],
)
async def test_http_invalid_inputs(
    http_base: str, api_key: str, path: str, body: object, status: int, param: str
) -> None:
    async with httpx.AsyncClient(base_url=http_base, headers={"authorization": f"Bearer {api_key}"}) as http:
        reply = await http.post(path, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["param"] is not None and error["param"].startswith(param), error
    assert param.split("[")[0].split(".")[0] in error["message"]


async def test_http_auth_size_utf8_and_timeout(http_base: str, api_key: str) -> None:
    good = {"model": EMBED, "texts": ["hello"]}
    async with httpx.AsyncClient(base_url=http_base) as http:
        assert (await http.post("/v1/embed", json=good)).status_code == 401
        bad_key = {"authorization": "Bearer sk_000000000000_" + "x" * 43}
        assert (await http.post("/v1/embed", json=good, headers=bad_key)).status_code == 401
        auth = {"authorization": f"Bearer {api_key}", "content-type": "application/json"}
        huge = b'{"model": "minilm-l6", "texts": ["' + b"a" * 2_000_000 + b'"]}'
        too_big = await http.post("/v1/embed", content=huge, headers=auth)
        assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
        not_utf8 = await http.post("/v1/embed", content=b'{"model": "minilm-l6", "texts": ["\xff\xfe"]}', headers=auth)
        assert not_utf8.status_code == 400 and "UTF-8" in not_utf8.json()["error"]["message"]
        not_json = await http.post("/v1/embed", content=b"{not json", headers=auth)
        assert not_json.status_code == 400
        timed_out = await http.post(
            "/v1/generate",
            json={"model": GEN, "prompt": "Tell me a long story.", "max_tokens": 200},
            headers={**auth, "x-request-timeout": "0.001"},
        )
        assert timed_out.status_code == 504, timed_out.text
        assert (await http.get("/v1/nowhere", headers=auth)).status_code == 404


async def test_grpc_invalid_inputs(grpc_target: str, api_key: str) -> None:
    async with AsyncClient(grpc_target, api_key) as client:
        cases = [
            (client.embed([]), "INVALID_ARGUMENT", "texts"),
            (client.embed(["x"] * 65), "INVALID_ARGUMENT", "texts"),
            (client.embed([LONG_TEXT]), "INVALID_ARGUMENT", "texts[0]"),
            (client.embed(["x"], model="nope"), "NOT_FOUND", None),
            (client.classify(["x"], []), "INVALID_ARGUMENT", "labels"),
            (client.generate("hi", max_tokens=100000), "INVALID_ARGUMENT", "max_tokens"),
            (client.generate("hi", temperature=5.0), "INVALID_ARGUMENT", "temperature"),
            (client.generate(""), "INVALID_ARGUMENT", "messages"),
        ]
        for call, code, field in cases:
            with pytest.raises(ApiError) as caught:
                await call
            assert caught.value.code == code, caught.value
            assert caught.value.field == field
    async with AsyncClient(grpc_target, "sk_nope") as anonymous:
        with pytest.raises(ApiError) as caught:
            await anonymous.embed(["x"])
        assert caught.value.code == "UNAUTHENTICATED"


async def test_grpc_malformed_bytes_deadline_and_size(grpc_target: str, api_key: str) -> None:
    metadata = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        raw = channel.unary_unary("/serving.v1.InferenceService/Embed")
        # Field 2 (texts) holding invalid UTF-8 bytes: grpc alone would answer INTERNAL.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"\x0a\x09minilm-l6\x12\x02\xff\xfe", metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "UTF-8" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(
                inference_pb2.EmbedRequest(model=EMBED, texts=["a" * 2_000_000]).SerializeToString(), metadata=metadata
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        generate = channel.unary_unary(
            "/serving.v1.InferenceService/Generate",
            request_serializer=inference_pb2.GenerateRequest.SerializeToString,
            response_deserializer=inference_pb2.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generate(
                inference_pb2.GenerateRequest(model=GEN, prompt="Tell me a story", max_tokens=300),
                metadata=metadata,
                timeout=0.05,
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_no_input_gave_internal(ops_base: str, api_key: str) -> None:
    async with httpx.AsyncClient(base_url=ops_base) as http:
        metrics = (await http.get("/metrics")).text
    assert 'status="internal"' not in metrics
