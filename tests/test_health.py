"""Health, readiness, reflection and the OpenAPI document answer."""

from __future__ import annotations

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.client import AsyncClient


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
