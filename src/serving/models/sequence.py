"""One generation request inside a replica: its input, its decode state and what it has emitted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from serving.domain import FinishReason, SamplingParams

if TYPE_CHECKING:
    from serving.models.kvcache import PromptKv


@dataclass(frozen=True)
class GenerateItem:
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class TextChunk:
    """A piece of generated text and the output tokens whose text has been emitted in full so far."""

    text: str
    tokens: int


@dataclass(frozen=True)
class GenerateOutput:
    text: str
    finish_reason: FinishReason
    output_tokens: int


@dataclass(eq=False)
class Sequence:
    """Decode state; the decode thread writes it, the replica's event loop reads it and sets ``cancelled``."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    on_chunk: Callable[[TextChunk], None] = lambda _chunk: None
    decoder: Any = None  # tokenizers' DecodeStream: the text of each new token, without decoding all again
    prompt: PromptKv | None = None  # the prompt's keys and values while it is prefilled (from its first chunk)
    cached_tokens: int = 0  # prompt tokens taken from the replica's prefix cache
    prefilled: bool = False  # the whole prompt has run: the sequence is in the running rows, or already ended
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already emitted
    emitted_tokens: int = 0  # tokens whose text is wholly emitted: what a caller that stops now has received
    finish_reason: FinishReason | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def emit(self, end: int, whole: bool) -> None:
        """Emits ``text[emitted:end]``; ``whole`` when nothing of the generated text is held back."""
        tokens = len(self.generated) if whole else self.emitted_tokens
        if end > self.emitted or tokens > self.emitted_tokens:
            self.on_chunk(TextChunk(self.text[self.emitted : end], tokens))
            self.emitted, self.emitted_tokens = max(end, self.emitted), tokens

    def output(self) -> GenerateOutput:
        assert self.finish_reason is not None
        return GenerateOutput(text=self.text, finish_reason=self.finish_reason, output_tokens=len(self.generated))
