"""Text generation with continuous (iteration-level) batching: per-sequence sampling, stop strings, streaming.

Between decode steps, cancelled and finished sequences leave the running batch and waiting ones join it
(their prompts are prefilled together, then their KV rows are merged into the batch's cache). See
docs/decisions/0006-continuous-batching.md for why this is our own loop rather than transformers'
continuous-batching manager.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from serving.domain import FinishReason
from serving.models.kvbatch import RunningBatch
from serving.models.runner import resolve_device, resolve_dtype
from serving.models.sequence import GenerateItem, GenerateOutput, Sequence

__all__ = ["GenerateItem", "GenerateOutput", "GenerateRunner", "Sequence"]


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
        # Incremental detokenization: each sequence decodes only its new token (tokenizers' DecodeStream), not its
        # whole text again at every step. Tokenizers without a Rust backend fall back to decoding it all.
        self.fast: Tokenizer | None = getattr(self.tokenizer, "backend_tokenizer", None)
        self.special_ids = set(self.tokenizer.all_special_ids)

    def preprocess(self, item: GenerateItem) -> Sequence:
        generator = None
        if item.params.temperature > 0:
            generator = torch.Generator()
            if item.params.seed is not None:
                generator.manual_seed(item.params.seed)
            else:
                generator.seed()
        decoder = DecodeStream(skip_special_tokens=True) if self.fast is not None else None
        return Sequence(prompt_ids=list(item.prompt_ids), params=item.params, generator=generator, decoder=decoder)

    def _sample(self, logits: torch.Tensor, seq: Sequence) -> int:
        params = seq.params
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
        before = len(seq.text)
        pending = False  # the token's text is not complete yet (part of a UTF-8 character): not emitted in full
        if seq.decoder is not None and self.fast is not None:
            piece = seq.decoder.step(self.fast, token)
            if piece:
                seq.text += piece
            pending = piece is None and token not in self.special_ids
        else:
            seq.text = str(self.tokenizer.decode(seq.generated, skip_special_tokens=True))
        for stop in seq.params.stop:
            # Only where a stop can newly appear: the added text and the tail it may complete.
            at = seq.text.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                self._finish(seq, FinishReason.STOP, at)
                return
        if len(seq.generated) >= seq.params.max_tokens:
            self._finish(seq, FinishReason.LENGTH, len(seq.text))
            return
        held = _held_back(seq.text, seq.params.stop)
        seq.emit(len(seq.text) - held, whole=held == 0 and not pending)

    def _finish(self, seq: Sequence, reason: FinishReason, end: int) -> None:
        seq.text = seq.text[:end]
        seq.emit(end, whole=True)
        seq.finish_reason = reason

    @torch.inference_mode()
    def step(self, batch: RunningBatch, joining: list[Sequence]) -> list[Sequence]:
        """One iteration of continuous batching: drop cancelled rows, prefill the joining sequences (each gets
        its first token), then one decode step for every running row. Returns the sequences that finished."""
        finished = [seq for seq in batch.seqs if seq.cancelled and not seq.done]
        for seq in finished:
            seq.finish_reason = FinishReason.CANCELLED
        self._drop_done(batch)
        joining = [seq for seq in joining if not seq.cancelled]
        if joining:
            finished.extend(seq for seq in self._prefill(batch, joining) if seq.done)
        if batch.seqs:
            ids, mask, positions = batch.step_inputs()
            logits = self.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=batch.cache
            ).logits[:, -1, :]
            batch.advance(self._next_tokens(logits, batch.seqs))
            finished.extend(seq for seq in batch.seqs if seq.done)
            self._drop_done(batch)
        return finished

    def _prefill(self, batch: RunningBatch, seqs: list[Sequence]) -> list[Sequence]:
        """Runs each prompt on its own (no padding to compute, and the same numbers whatever else is joining),
        picks every first token, then joins the sequences that did not end on it."""
        caches: list[DynamicCache] = []
        logits: list[torch.Tensor] = []
        for seq in seqs:
            cache = DynamicCache()
            ids = torch.tensor([seq.prompt_ids], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, past_key_values=cache, logits_to_keep=1)  # only the last position
            caches.append(cache)
            logits.append(out.logits[:, -1, :])
        last = self._next_tokens(torch.cat(logits), seqs)
        alive = [row for row, seq in enumerate(seqs) if not seq.done]
        batch.join([seqs[row] for row in alive], [caches[row] for row in alive], [last[row] for row in alive])
        return seqs

    def _next_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        tokens = []
        for row, seq in enumerate(seqs):
            token = greedy[row] if seq.generator is None else self._sample(logits[row], seq)
            self._advance(seq, token)
            tokens.append(token)
        return tokens

    @staticmethod
    def _drop_done(batch: RunningBatch) -> None:
        batch.keep([row for row, seq in enumerate(batch.seqs) if not seq.done])
