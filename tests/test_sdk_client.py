"""The SDK's retry, idempotency-key, deadline and configuration behaviour against an in-process gRPC server that
fails on cue (the SDK is what is under test; the real stack is exercised in test_sdk_wheel.py and everywhere else)."""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

import serving_sdk.aio
from serving_sdk import ApiError, AsyncClient, Client, ConfigurationError, RetryPolicy, TextDelta
from serving_sdk.v1 import common_pb2, inference_pb2, inference_pb2_grpc


@dataclass
class Failure:
    code: int  # google.rpc.Code
    reason: str = ""
    retry_after_s: float | None = None
    field_name: str | None = None


@dataclass
class Script:
    """What the fake gateway does: fails the first calls as listed, then answers; records every attempt."""

    failures: list[Failure] = field(default_factory=list)
    fail_after_first_piece: bool = False
    request_ids: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)


def _status(failure: Failure) -> grpc.Status:
    details: list[Any] = []
    if failure.reason:
        details.append(error_details_pb2.ErrorInfo(reason=failure.reason.upper(), domain="serving.v1"))
    if failure.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(failure.retry_after_s * 1000))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    if failure.field_name:
        violation = error_details_pb2.BadRequest.FieldViolation(field=failure.field_name, description="bad")
        details.append(error_details_pb2.BadRequest(field_violations=[violation]))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    return rpc_status.to_status(status_pb2.Status(code=failure.code, message="scripted failure", details=packed))


class FakeGateway(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def _record(self, request_id: str, context: grpc.aio.ServicerContext) -> Failure | None:
        self.script.request_ids.append(request_id)
        self.script.keys.append(dict(context.invocation_metadata() or ()).get("authorization", ""))
        self.script.arrivals.append(time.monotonic())
        return self.script.failures.pop(0) if self.script.failures else None

    async def Embed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        failure = self._record(request.request_id, context)
        if failure is not None:
            await context.abort_with_status(_status(failure))
        vectors = [inference_pb2.Embedding(values=[1.0, 0.0]) for _ in request.texts]
        usage = common_pb2.Usage(input_tokens=len(request.texts))
        rid = request.request_id
        return inference_pb2.EmbedResponse(model=request.model, embeddings=vectors, usage=usage, request_id=rid)

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        failure = self._record(request.request_id, context)
        if failure is not None and not self.script.fail_after_first_piece:
            await context.abort_with_status(_status(failure))
        yield inference_pb2.GenerateStreamResponse(delta="Par", output_tokens=1)
        if failure is not None:
            await context.abort_with_status(_status(failure))
        final = inference_pb2.GenerateResponse(
            model=request.model,
            text="Par",
            finish_reason=inference_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(input_tokens=3, output_tokens=1),
            request_id=request.request_id,
        )
        yield inference_pb2.GenerateStreamResponse(final=final)


@pytest_asyncio.fixture(loop_scope="session")
async def fake() -> AsyncIterator[tuple[str, Script]]:
    script = Script()
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(FakeGateway(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}", script
    await server.stop(0)


FAST = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
UNAVAILABLE = code_pb2.UNAVAILABLE


async def test_unavailable_is_retried_with_one_idempotency_key_honouring_retry_info(
    fake: tuple[str, Script], monkeypatch: pytest.MonkeyPatch
) -> None:
    target, script = fake
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:  # records the SDK's waits instead of sleeping them
        waits.append(seconds)

    monkeypatch.setattr(serving_sdk.aio, "_sleep", no_wait)
    script.failures = [Failure(UNAVAILABLE, retry_after_s=0.2), Failure(UNAVAILABLE, retry_after_s=0.3)]
    async with AsyncClient(target, "sk-test", retry=FAST) as client:
        result = await client.embed(["hello"])
    assert len(script.request_ids) == 3 and len(set(script.request_ids)) == 1
    assert result.request_id == script.request_ids[0] and len(result.request_id) == 32
    assert waits == [0.2, 0.3]  # RetryInfo's delays; the SDK's own backoff (<= 0.05 s) is shorter


async def test_without_a_key_only_the_gateways_own_refusals_are_retried(fake: tuple[str, Script]) -> None:
    """A failure without ErrorInfo may come from a connection lost after the call ran: no retry without a key."""
    target, script = fake
    script.failures = [Failure(UNAVAILABLE, reason="unavailable", retry_after_s=0.01), Failure(UNAVAILABLE)]
    async with AsyncClient(target, "sk-test", retry=FAST, auto_request_id=False) as client:
        with pytest.raises(ApiError) as raised:
            await client.embed(["hello"])
    assert raised.value.code == "UNAVAILABLE" and script.request_ids == ["", ""]


def test_errors_pickle_and_configs_hide_the_key() -> None:
    error = ApiError("UNAVAILABLE", "down", reason="unavailable", retry_after_s=1.0, request_id="r-1")
    again = pickle.loads(pickle.dumps(error))
    assert (again.code, again.message, again.reason, again.retry_after_s, again.request_id) == (
        "UNAVAILABLE",
        "down",
        "unavailable",
        1.0,
        "r-1",
    )
    client = Client("127.0.0.1:1", "sk-very-secret")
    assert "sk-very-secret" not in repr(client.config)
    client.close()


async def test_each_logical_call_gets_its_own_key_and_a_given_key_is_kept(fake: tuple[str, Script]) -> None:
    target, script = fake
    async with AsyncClient(target, "sk-test") as client:
        await client.embed(["a"])
        await client.embed(["b"])
        await client.embed(["c"], request_id="order-1234")
    assert len(set(script.request_ids[:2])) == 2 and script.request_ids[2] == "order-1234"


async def test_invalid_argument_is_not_retried_and_names_the_field(fake: tuple[str, Script]) -> None:
    target, script = fake
    script.failures = [Failure(code_pb2.INVALID_ARGUMENT, reason="invalid_argument", field_name="texts")]
    async with AsyncClient(target, "sk-test", retry=FAST) as client:
        with pytest.raises(ApiError) as raised:
            await client.embed(["hello"])
    assert len(script.request_ids) == 1
    error = raised.value
    assert (error.code, error.reason, error.field) == ("INVALID_ARGUMENT", "invalid_argument", "texts")
    assert error.request_id == script.request_ids[0]


async def test_a_request_in_progress_is_retried_but_other_aborts_are_not(fake: tuple[str, Script]) -> None:
    target, script = fake
    script.failures = [Failure(code_pb2.ABORTED, reason="request_in_progress", retry_after_s=0.01)]
    async with AsyncClient(target, "sk-test", retry=FAST) as client:
        await client.embed(["hello"])
        assert len(script.request_ids) == 2
        script.failures = [Failure(code_pb2.ABORTED, reason="something_else")]
        with pytest.raises(ApiError):
            await client.embed(["hello"])
    assert len(script.request_ids) == 3


async def test_a_retry_that_cannot_start_before_the_deadline_is_not_made(fake: tuple[str, Script]) -> None:
    target, script = fake
    script.failures = [Failure(UNAVAILABLE, retry_after_s=30.0)]
    async with AsyncClient(target, "sk-test", timeout_s=5.0, retry=FAST) as client:
        with pytest.raises(ApiError) as raised:
            await client.embed(["hello"])
    assert raised.value.code == "UNAVAILABLE" and raised.value.retry_after_s == 30.0
    assert len(script.request_ids) == 1


async def test_a_stream_is_retried_before_its_first_piece_only(fake: tuple[str, Script]) -> None:
    target, script = fake
    script.failures = [Failure(UNAVAILABLE, retry_after_s=0.01)]
    async with AsyncClient(target, "sk-test", retry=FAST) as client:
        events = [event async for event in client.generate_stream("hi")]
        assert events[0] == TextDelta("Par", 1) and events[-1].text == "Par"  # type: ignore[union-attr]
        assert len(script.request_ids) == 2 and len(set(script.request_ids)) == 1
        script.failures, script.fail_after_first_piece = [Failure(UNAVAILABLE)], True
        received: list[object] = []
        with pytest.raises(ApiError) as raised:
            async for event in client.generate_stream("hi"):
                received.append(event)
    assert raised.value.code == "UNAVAILABLE" and received == [TextDelta("Par", 1)]
    assert len(script.request_ids) == 3


async def test_the_sync_client_retries_and_reads_the_key_from_the_environment(
    fake: tuple[str, Script], monkeypatch: pytest.MonkeyPatch
) -> None:
    target, script = fake
    monkeypatch.setenv("SERVING_API_KEY", "sk-from-env")
    script.failures = [Failure(UNAVAILABLE, retry_after_s=0.01)]

    def call() -> int:  # blocking, so off the loop the fake gateway runs on
        with Client(target, retry=FAST) as client:
            return client.embed(["x", "y"]).usage.input_tokens

    assert await asyncio.to_thread(call) == 2
    assert script.keys == ["Bearer sk-from-env", "Bearer sk-from-env"] and len(set(script.request_ids)) == 1


def test_configuration_errors_say_what_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SERVING_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="SERVING_API_KEY"):
        Client("127.0.0.1:1")
    with pytest.raises(ConfigurationError, match="cannot read ca_file"):
        Client("127.0.0.1:1", "sk", ca_file=tmp_path / "missing.pem")
    with pytest.raises(TypeError, match="list of strings"), Client("127.0.0.1:1", "sk") as client:
        client.embed("one text")  # type: ignore[arg-type]


def test_retry_policy_decisions() -> None:
    policy = RetryPolicy(attempts=3, initial_backoff_s=0.1, max_backoff_s=1.0)
    unavailable = ApiError("UNAVAILABLE", "down", retry_after_s=0.5)
    assert (policy.delay_before_retry(0, unavailable, None) or 0) >= 0.5
    assert policy.delay_before_retry(2, unavailable, None) is None  # the third attempt was the last
    assert policy.delay_before_retry(0, unavailable, 0.4) is None  # could not start before the deadline
    assert policy.delay_before_retry(0, ApiError("RESOURCE_EXHAUSTED", "over quota", retry_after_s=1), None) is None
    assert policy.delay_before_retry(0, ApiError("INTERNAL", "bug"), None) is None
