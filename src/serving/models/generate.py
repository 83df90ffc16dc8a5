"""Text generation: a batched decode loop with per-sequence sampling, stop strings and streaming.

Static batching: the batch is formed once and decoded until every sequence ends; a sequence that is
cancelled or finished stops producing output at once (its row idles until the batch ends).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from serving.domain import FinishReason, SamplingParams
from serving.models.runner import resolve_device, resolve_dtype


@dataclass(frozen=True)
class GenerateItem:
    prompt_ids: list[int]
    params: SamplingParams


@dataclass(eq=False)
class Sequence:
    """One request's state inside the decode loop; the engine reads it from another thread."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    on_delta: Callable[[str], None] = lambda _text: None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: FinishReason | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerateOutput:
    text: str
    finish_reason: FinishReason
    output_tokens: int


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might begin a stop string (or an unfinished UTF-8 character)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


class GenerateRunner:
    def setup(self, model_dir: Path, device: str, dtype: str) -> None:
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype, self.device))
        self.model.to(self.device)  # type: ignore[arg-type]
        self.model.train(False)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.pad_id = int(self.tokenizer.pad_token_id or next(iter(eos_ids), 0))

    def preprocess(self, item: GenerateItem) -> Sequence:
        generator = None
        if item.params.temperature > 0:
            generator = torch.Generator()
            if item.params.seed is not None:
                generator.manual_seed(item.params.seed)
            else:
                generator.seed()
        return Sequence(prompt_ids=list(item.prompt_ids), params=item.params, generator=generator)

    def _choose(self, logits: torch.Tensor, seq: Sequence) -> int:
        params = seq.params
        if params.temperature <= 0 or seq.generator is None:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs.cpu(), 1, generator=seq.generator).item())

    def _advance(self, seq: Sequence, token: int) -> None:
        if token in self.eos_ids:
            self._finish(seq, FinishReason.STOP, len(seq.text))
            return
        seq.generated.append(token)
        seq.text = str(self.tokenizer.decode(seq.generated, skip_special_tokens=True))
        for stop in seq.params.stop:
            at = seq.text.find(stop)
            if at >= 0:
                self._finish(seq, FinishReason.STOP, at)
                return
        if len(seq.generated) >= seq.params.max_tokens:
            self._finish(seq, FinishReason.LENGTH, len(seq.text))
            return
        safe = len(seq.text) - _held_back(seq.text, seq.params.stop)
        if safe > seq.emitted:
            seq.on_delta(seq.text[seq.emitted : safe])
            seq.emitted = safe

    def _finish(self, seq: Sequence, reason: FinishReason, end: int) -> None:
        seq.text = seq.text[:end]
        if end > seq.emitted:
            seq.on_delta(seq.text[seq.emitted : end])
            seq.emitted = end
        seq.finish_reason = reason

    @torch.inference_mode()
    def predict(self, batch: list[Sequence]) -> list[Sequence]:
        width = max(len(seq.prompt_ids) for seq in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, seq in enumerate(batch):  # left padding keeps every sequence's next token in the last column
            ids[row, width - len(seq.prompt_ids) :] = torch.tensor(seq.prompt_ids)
            mask[row, width - len(seq.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        step_input = ids
        while True:
            out = self.model(input_ids=step_input, attention_mask=mask, position_ids=positions, past_key_values=cache)
            logits = out.logits[:, -1, :]
            next_tokens = []
            for row, seq in enumerate(batch):
                if seq.cancelled and not seq.done:
                    seq.finish_reason = FinishReason.CANCELLED
                if seq.done:
                    next_tokens.append(self.pad_id)
                    continue
                token = self._choose(logits[row], seq)
                self._advance(seq, token)
                next_tokens.append(token)
            if all(seq.done for seq in batch):
                return batch
            step_input = torch.tensor(next_tokens, device=self.device).unsqueeze(1)
            mask = torch.cat([mask, torch.ones_like(step_input)], dim=1)
            positions = positions[:, -1:] + 1

    def postprocess(self, seq: Sequence) -> GenerateOutput:
        assert seq.finish_reason is not None
        return GenerateOutput(text=seq.text, finish_reason=seq.finish_reason, output_tokens=len(seq.generated))
