"""The same text embedded through gRPC, HTTP and the openai client matches the raw model in-process."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from serving.models.embed import EmbedRunner
from serving.models.registry import ModelSpec
from serving.models.sources import resolve_model_dir
from serving.settings import Settings
from serving_sdk import AsyncClient, Client

TEXT = "The quick brown fox jumps over the lazy dog."


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


@pytest.fixture(scope="module")
def raw_vector(specs: list[ModelSpec], settings: Settings) -> list[float]:
    spec = next(s for s in specs if s.id == "minilm-l6")
    runner = EmbedRunner(spec.max_input_tokens)
    runner.setup(resolve_model_dir(spec, Path(settings.models_cache)), "cpu", "float32")
    return runner.predict([TEXT])[0]


async def test_same_vector_over_grpc_http_and_openai(
    grpc_target: str, http_base: str, api_key: str, raw_vector: list[float], specs: list[ModelSpec], settings: Settings
) -> None:
    spec = next(s for s in specs if s.id == "minilm-l6")
    async with AsyncClient(grpc_target, api_key) as client:
        via_grpc = (await client.embed([TEXT])).embeddings[0]
    async with httpx.AsyncClient(base_url=http_base, headers={"authorization": f"Bearer {api_key}"}) as http:
        reply = await http.post("/v1/embed", json={"model": "minilm-l6", "texts": [TEXT]})
        assert reply.status_code == 200, reply.text
        via_http = reply.json()["embeddings"][0]
    oai = openai.AsyncOpenAI(base_url=f"{http_base}/v1", api_key=api_key)
    response = await oai.embeddings.create(model="minilm-l6", input=TEXT)  # base64 on the wire by default
    via_openai = list(response.data[0].embedding)
    float_response = await oai.embeddings.create(model="minilm-l6", input=[TEXT], encoding_format="float")
    await oai.close()

    assert len(via_grpc) == len(raw_vector) == 384
    for vector in (via_grpc, via_http, via_openai, list(float_response.data[0].embedding)):
        assert cosine(vector, raw_vector) >= 0.999
    # Usage is billed: it must be the model's true token count (special tokens included).
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(spec, settings.models_cache))
    expected = len(tokenizer(TEXT)["input_ids"])
    assert response.usage.prompt_tokens == expected


async def test_related_sentences_score_higher(grpc_target: str, api_key: str) -> None:
    texts = [
        "A man is playing a guitar on stage.",
        "A musician performs a song with his guitar.",
        "The stock market fell sharply on Monday.",
    ]
    async with AsyncClient(grpc_target, api_key) as client:
        result = await client.embed(texts)
    anchor, related, unrelated = result.embeddings
    assert cosine(anchor, related) > cosine(anchor, unrelated) + 0.3
    assert result.usage.input_tokens > 0 and result.model == "minilm-l6"


async def test_sync_client_in_a_thread(grpc_target: str, api_key: str) -> None:
    import asyncio

    def call() -> int:
        with Client(grpc_target, api_key) as client:
            return len(client.embed(["hello"]).embeddings[0])

    assert await asyncio.to_thread(call) == 384
