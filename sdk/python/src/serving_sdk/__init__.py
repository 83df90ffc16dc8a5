"""Python SDK for the partner model API over gRPC.

from serving_sdk import Client

with Client() as client:  # SERVING_API_KEY, and SERVING_TARGET (default 127.0.0.1:50051)
    vectors = client.embed(["hello"]).embeddings
    for event in client.generate_stream("What is the capital of France?"):
        ...
"""

from serving_sdk.aio import AsyncClient
from serving_sdk.client import Client
from serving_sdk.errors import ApiError, ConfigurationError
from serving_sdk.retry import NO_RETRIES, RetryPolicy
from serving_sdk.types import (
    ChatMessage,
    Classification,
    ClassifyResult,
    CreditBalance,
    CreditGrant,
    EmbedResult,
    FinishReason,
    GenerateResult,
    ModelInfo,
    StreamEvent,
    Task,
    TextDelta,
    Usage,
    UsageReport,
    UsageRow,
)

__all__ = [
    "NO_RETRIES",
    "ApiError",
    "AsyncClient",
    "ChatMessage",
    "Classification",
    "ClassifyResult",
    "Client",
    "ConfigurationError",
    "CreditBalance",
    "CreditGrant",
    "EmbedResult",
    "FinishReason",
    "GenerateResult",
    "ModelInfo",
    "RetryPolicy",
    "StreamEvent",
    "Task",
    "TextDelta",
    "Usage",
    "UsageReport",
    "UsageRow",
]
