"""Generation answers a factual prompt over gRPC, HTTP and the openai client; streaming equals non-streaming."""

from __future__ import annotations

import json

import httpx
import openai

from serving_sdk import AsyncClient, GenerateResult, TextDelta

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


async def test_grpc_generate_and_stream_agree(grpc_target: str, api_key: str) -> None:
    async with AsyncClient(grpc_target, api_key) as client:
        whole = await client.generate(QUESTION, temperature=0.0, max_tokens=40)
        deltas: list[str] = []
        final: GenerateResult | None = None
        async for event in client.generate_stream(QUESTION, temperature=0.0, max_tokens=40):
            if isinstance(event, TextDelta):
                deltas.append(event.text)
            else:
                final = event
    assert "Paris" in whole.text
    assert final is not None and "".join(deltas) == whole.text
    assert len(deltas) > 1
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens > 0
    assert final.usage == whole.usage and whole.model == MODEL


async def test_http_native_generate(http_base: str, api_key: str) -> None:
    async with httpx.AsyncClient(base_url=http_base, headers={"authorization": f"Bearer {api_key}"}) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0}
        reply = await http.post("/v1/generate", json=body)
        assert reply.status_code == 200, reply.text
        assert "Paris" in reply.json()["text"]
        events = []
        async with http.stream("POST", "/v1/generate/stream", json=body) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    text = "".join(e["delta"] for e in events if "delta" in e)
    assert text == reply.json()["text"]
    assert events[-1]["usage"]["output_tokens"] == reply.json()["usage"]["output_tokens"]


async def test_openai_client_chat_and_stream(http_base: str, api_key: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{http_base}/v1", api_key=api_key)
    messages = [{"role": "user", "content": QUESTION}]
    completion = await client.chat.completions.create(model=MODEL, messages=messages, temperature=0)  # type: ignore[arg-type]
    answer = completion.choices[0].message.content or ""
    assert "Paris" in answer
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    pieces: list[str] = []
    usage = None
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    await client.close()
    assert "".join(pieces) == answer
    assert usage is not None and usage.completion_tokens == completion.usage.completion_tokens
    models = await openai.AsyncOpenAI(base_url=f"{http_base}/v1", api_key=api_key).models.list()
    assert {m.id for m in models.data} == {"minilm-l6", "zero-shot", MODEL}


async def test_stop_sequence_and_max_tokens(grpc_target: str, api_key: str) -> None:
    async with AsyncClient(grpc_target, api_key) as client:
        stopped = await client.generate(QUESTION, temperature=0.0, stop=["Paris"])
        short = await client.generate(QUESTION, temperature=0.0, max_tokens=2)
    assert "Paris" not in stopped.text and stopped.finish_reason.value == "stop"
    assert short.usage.output_tokens == 2 and short.finish_reason.value == "length"
