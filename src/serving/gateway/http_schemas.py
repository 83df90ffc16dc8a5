"""HTTP request and response bodies (native routes and the OpenAI-compatible ones); the OpenAPI document
is generated from these."""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from serving.domain import ChatMessage, ModelInfo
from serving.metering.usage import UsageRow

NonNegInt = Annotated[StrictInt, Field(ge=0)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]  # OpenAI refuses max_tokens=0 rather than using a default


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


class AliasTargetBody(BaseModel):
    model: str
    weight: int


def _rfc3339(moment: datetime.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


class ModelCard(BaseModel):
    """A model or an alias. The lifecycle fields are left out (not null) when unset: a plain model's card is
    what it always was."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "serving"
    task: str
    dimensions: int
    max_input_tokens: int
    ready: bool
    version: str | None = None  # "2026-11" of "minilm-l6@2026-11"
    targets: list[AliasTargetBody] | None = None  # an alias: the models it routes to, by weight
    deprecated: str | None = None  # RFC 3339, UTC
    sunset: str | None = None  # RFC 3339, UTC; from then on calls get 410 model_sunset
    replacement: str | None = None

    @classmethod
    def of(cls, model: ModelInfo) -> ModelCard:
        return cls(
            id=model.id,
            task=model.task.value,
            dimensions=model.dimensions,
            max_input_tokens=model.max_input_tokens,
            ready=model.ready,
            version=model.version or None,
            targets=[AliasTargetBody(model=m, weight=w) for m, w in model.targets] or None,
            deprecated=_rfc3339(model.deprecated),
            sunset=_rfc3339(model.sunset),
            replacement=model.replacement or None,
        )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- OpenAI-compatible ------------------------------------------------------------------------------------
# Unknown fields are accepted and ignored (OpenAI clients send many harmless ones: user, metadata, store, ...).
# Fields that would change the answer and that this API cannot honour are declared here so that the route can
# reject them clearly (``http_openai.check_chat`` and ``check_completion``) instead of ignoring them.

Number = StrictFloat | StrictInt
# A string, strings, token ids or token-id lists: what OpenAI accepts as an embeddings ``input`` or a ``prompt``.
TextsOrTokens = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


def _texts_or_tokens(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """One clear message instead of one per member of the union."""
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError(
            "texts_or_tokens", "must be a string, a list of strings, a list of token ids or a list of token-id lists"
        ) from None


class OpenAIEmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    input: TextsOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: StrictStr | None = None

    _input_shape = field_validator("input", mode="wrap")(_texts_or_tokens)


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


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr


class OpenAIGenerationBody(BaseModel):
    """What chat and legacy completions share."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: PositiveInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: NonNegInt | None = None
    n: StrictInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    # Accepted at their neutral value (0, empty), rejected otherwise.
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Number] | None = None


class OpenAIChatBody(OpenAIGenerationBody):
    messages: list[OpenAIMessage]
    max_completion_tokens: PositiveInt | None = None
    # Features this API does not have: rejected unless absent or neutral (empty, "none", "text", false).
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: StrictInt | None = None
    audio: Any = None
    modalities: list[StrictStr] | None = None
    web_search_options: Any = None


class OpenAICompletionBody(OpenAIGenerationBody):
    prompt: TextsOrTokens
    # Features this API does not have: rejected unless absent or neutral.
    echo: bool | None = None
    best_of: StrictInt | None = None
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None

    _prompt_shape = field_validator("prompt", mode="wrap")(_texts_or_tokens)


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str, code: str, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": param}}
