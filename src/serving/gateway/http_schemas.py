"""HTTP request and response bodies (native routes and the OpenAI-compatible ones); the OpenAPI document
is generated from these."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from serving.domain import ChatMessage
from serving.metering.usage import UsageRow

NonNegInt = Annotated[StrictInt, Field(ge=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UsageBody(BaseModel):
    input_tokens: int
    output_tokens: int


class EmbedBody(Strict):
    model: StrictStr
    texts: list[StrictStr]
    request_id: StrictStr = ""


class EmbedReply(BaseModel):
    model: str
    embeddings: list[list[float]]
    usage: UsageBody
    request_id: str


class ClassifyBody(Strict):
    model: StrictStr
    texts: list[StrictStr]
    labels: list[StrictStr] = []
    request_id: StrictStr = ""


class LabelScoreBody(BaseModel):
    label: str
    score: float


class ClassificationBody(BaseModel):
    label: str
    scores: list[LabelScoreBody]


class ClassifyReply(BaseModel):
    model: str
    results: list[ClassificationBody]
    usage: UsageBody
    request_id: str


class MessageBody(Strict):
    role: StrictStr
    content: StrictStr

    def domain(self) -> ChatMessage:
        return ChatMessage(role=self.role, content=self.content)


class GenerateBody(Strict):
    model: StrictStr
    messages: list[MessageBody] = []
    prompt: StrictStr = ""
    max_tokens: NonNegInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    stop: list[StrictStr] = []
    seed: NonNegInt | None = None
    request_id: StrictStr = ""


class GenerateReply(BaseModel):
    model: str
    text: str
    finish_reason: str
    usage: UsageBody
    request_id: str


class UsageReply(BaseModel):
    partner_id: str
    start_day: str
    end_day: str
    rows: list[UsageRow]  # the ledger's own row type (a dataclass pydantic validates as is)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "serving"
    task: str
    dimensions: int
    max_input_tokens: int
    ready: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- OpenAI-compatible ------------------------------------------------------------------------------------


class OpenAIEmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    input: StrictStr | list[StrictStr]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: StrictStr | list[TextPart] | None = None

    def domain(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=content or "")


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIChatBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    messages: list[OpenAIMessage]
    max_tokens: NonNegInt | None = None
    max_completion_tokens: NonNegInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: NonNegInt | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str, code: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}
