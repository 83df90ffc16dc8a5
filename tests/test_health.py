"""Health, readiness, reflection and the OpenAPI document answer; private routes stay on the ops listener."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any

import grpc
import httpx
import pytest
from conftest import ADMIN_TOKEN, running_gateway
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.models.registry import ModelSpec, Replicas
from serving.partners.store import PartnerStore
from serving.settings import Settings
from serving_sdk import ApiError, AsyncClient, GenerateResult, RetryPolicy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_http_health_readiness_openapi(http_base: str) -> None:
    async with httpx.AsyncClient(base_url=http_base) as http:
        assert (await http.get("/healthz")).json() == {"status": "alive"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready"}
        spec = (await http.get("/openapi.json")).json()
    for path in ("/v1/embed", "/v1/classify", "/v1/generate", "/v1/embeddings", "/v1/chat/completions", "/v1/models"):
        assert path in spec["paths"], path


async def test_grpc_health_and_reflection(grpc_target: str, api_key: str) -> None:
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "serving.v1.InferenceService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = set()
        async for response in responses:
            services = {s.name for s in response.list_services_response.service}
            break
    assert {"serving.v1.InferenceService", "serving.v1.ModelService", "grpc.health.v1.Health"} <= services
    async with AsyncClient(grpc_target, api_key) as client:
        models = {m.id: m for m in await client.list_models()}
    assert models["minilm-l6"].dimensions == 384 and all(m.ready for m in models.values())


async def test_private_routes_only_on_the_ops_listener(http_base: str, ops_base: str, api_key: str) -> None:
    """Metrics (every partner's usage) and the admin API never answer on the partner port, whoever asks."""
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    partner = {"authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=http_base) as public, httpx.AsyncClient(base_url=ops_base) as ops:
        for headers in ({}, partner, admin):
            for path in ("/metrics", "/admin/v1/partners", "/admin/v1/plans"):
                reply = await public.get(path, headers=headers)
                assert reply.status_code == 404, (path, headers, reply.text)
                assert reply.json()["error"]["code"] == "not_found"
        assert "serving_partner_requests_total" in (await ops.get("/metrics")).text
        assert (await ops.get("/admin/v1/partners", headers=admin)).status_code == 200
        assert (await ops.get("/admin/v1/partners", headers=partner)).status_code == 403
        for base in (public, ops):
            assert (await base.get("/readyz")).json() == {"status": "ready"}
        assert (
            await ops.post("/v1/embed", json={"model": "minilm-l6", "texts": ["x"]}, headers=partner)
        ).status_code == 404


async def _next_status(watch: Any) -> int:
    reply = await watch.read()
    assert reply is not grpc.aio.EOF
    return int(reply.status)


async def _until_serving(watch: Any) -> None:
    """A new gateway starts NOT_SERVING and turns SERVING at its first readiness check (a watch sends changes)."""
    if await _next_status(watch) != SERVING:
        assert await _next_status(watch) == SERVING


async def test_grpc_health_is_not_serving_until_models_are_ready(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], store: PartnerStore
) -> None:
    """A gateway whose model application is not deployed yet answers NOT_SERVING (overall and per service) and
    /readyz 503; once the application runs (a real Serve deployment), SERVING."""
    from ray import serve

    from serving.models.deployment import build_application

    noop = replace(specs[0], id="noop", runner="noop", replicas=Replicas(num_cpus=0.05))
    app_prefix = f"late-{uuid.uuid4().hex[:6]}"
    handles = {"noop": ray_models["minilm-l6"]}  # never called here; readiness asks the Serve controller
    async with (
        running_gateway(settings, [noop], handles, store, gateway_id=app_prefix, serve_app_name=app_prefix) as gw,
        grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service="serving.v1.InferenceService"))
        assert await _next_status(watch) == NOT_SERVING
        for service in ("", "serving.v1.InferenceService"):
            assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == NOT_SERVING
        models = await health.Check(health_pb2.HealthCheckRequest(service="serving.v1.ModelService"))
        assert models.status == SERVING  # listing models needs no model replica
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}") as http:
            loading = await http.get("/readyz")
            assert loading.status_code == 503 and loading.json() == {"status": "loading"}
            app = build_application(noop, settings.models_cache)
            await asyncio.to_thread(serve.run, app, name=f"{app_prefix}-noop", route_prefix=None)
            try:
                assert await _next_status(watch) == SERVING
                assert (await http.get("/readyz")).json() == {"status": "ready"}
            finally:
                await asyncio.to_thread(serve.delete, f"{app_prefix}-noop")
        watch.cancel()


async def test_grpc_health_is_not_serving_while_draining(
    settings: Settings, specs: list[ModelSpec], ray_models: dict[str, Any], store: PartnerStore, api_key: str
) -> None:
    """From the moment a graceful stop begins: NOT_SERVING on gRPC health, 503 draining on /readyz, new calls
    UNAVAILABLE with retry-after, while the stream already in flight runs to its end."""
    async with running_gateway(settings, specs, ray_models, store, gateway_id="drain-health") as gw:
        target = f"127.0.0.1:{gw.grpc_port}"
        async with (
            grpc.aio.insecure_channel(target) as channel,
            AsyncClient(target, api_key, retry=RetryPolicy(attempts=1)) as client,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.http_port}") as http,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            await _until_serving(watch)
            stream = client.generate_stream("Count from one to thirty.", temperature=0.0, max_tokens=60)
            first = await anext(stream)  # admitted and producing
            draining = asyncio.create_task(gw.drain())
            assert await _next_status(watch) == NOT_SERVING
            for service in ("", "serving.v1.InferenceService", "serving.v1.ModelService"):
                assert (await health.Check(health_pb2.HealthCheckRequest(service=service))).status == NOT_SERVING
            assert (await http.get("/readyz")).json() == {"status": "draining"}
            with pytest.raises(ApiError) as refused:
                await client.embed(["a new call during the drain"])
            assert refused.value.code == "UNAVAILABLE" and refused.value.retry_after_s == 1.0
            events = [first] + [event async for event in stream]
            assert not draining.done()  # or the stream would have been cut short
            watch.cancel()
        final = events[-1]
        assert isinstance(final, GenerateResult) and final.usage.output_tokens > 1
        await draining
