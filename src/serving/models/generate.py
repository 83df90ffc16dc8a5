"""Text generation with continuous (iteration-level) batching: per-sequence sampling, stop strings, streaming.

Each step is one forward pass over every running row's next token and chunks of prompts being prefilled
(``models/ragged.py``); cancelled and finished sequences leave between steps, and a prompt whose last chunk ran
joins the running rows with its first token. Prompts start from the longest prefix in the replica's prefix
cache. See docs/decisions/0006-continuous-batching.md for why this is our own loop rather than transformers'
continuous-batching manager, and 0012-chunked-prefill-and-prefix-cache.md for the step's shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream
from transformers import AutoModelForCausalLM, AutoTokenizer

from serving.domain import FinishReason
from serving.models.kvcache import KvRows, KvShape, PromptKv
from serving.models.prefix_cache import PrefixCache
from serving.models.ragged import ATTENTION, Chunk, StepPlan
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


def _kv_shape(config: Any, dtype: torch.dtype, device: torch.device) -> KvShape:
    """The KV geometry of a full-attention decoder; other attention kinds are refused at start-up."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(config, "sliding_window", None):
        raise NotImplementedError(f"continuous batching needs full-attention layers, not {sorted(kinds)}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return KvShape(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype, device)


class GenerateRunner:
    def __init__(self, prefix_cache_mb: int = 0) -> None:
        self.prefix_cache_mb = prefix_cache_mb

    def setup(self, model_dir: Path, device: str, dtype: str) -> None:
        self.device = resolve_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=resolve_dtype(dtype, self.device))
        self.model.to(self.device)  # type: ignore[arg-type]
        self.model.train(False)
        self.model.set_attn_implementation(ATTENTION)
        self.kv_shape = _kv_shape(self.model.config, self.model.dtype, self.device)
        self.prefix_cache = PrefixCache(self.kv_shape, self.prefix_cache_mb * 2**20)
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

    def new_rows(self) -> KvRows:
        return KvRows(self.kv_shape)

    def attach_prefix(self, seq: Sequence) -> None:
        """Before its first prefill chunk: room for the prompt's keys and values, starting from the longest prefix
        in the cache."""
        seq.prompt = PromptKv(self.kv_shape, len(seq.prompt_ids))
        seq.cached_tokens = self.prefix_cache.attach(seq.prompt_ids, seq.prompt)

    @torch.inference_mode()
    def step(self, rows: KvRows, chunks: list[tuple[Sequence, int]]) -> list[Sequence]:
        """One iteration of continuous batching in one forward pass: a token for every running row, and the next
        ``count`` prompt tokens of each ``(sequence, count)`` being prefilled; a sequence whose prompt completes
        gets its first token and joins the running rows. Returns the sequences that finished."""
        finished = [seq for seq in rows.seqs if seq.cancelled and not seq.done]
        for seq in finished:
            seq.finish_reason = FinishReason.CANCELLED
        self._drop_done(rows)
        chunks = [(seq, count) for seq, count in chunks if not seq.cancelled and count > 0]
        if not rows.seqs and not chunks:
            return finished
        plan = StepPlan(rows, len(rows.seqs))
        ids, positions, keep = list(rows.last), rows.lengths.tolist(), list(range(len(rows.seqs)))
        completing: list[Sequence] = []
        for seq, count in chunks:
            prompt = seq.prompt
            assert prompt is not None
            start = prompt.filled
            plan.chunks.append(Chunk(prompt, start, count, len(ids)))
            ids.extend(seq.prompt_ids[start : start + count])
            positions.extend(range(start, start + count))
            if start + count == len(seq.prompt_ids):
                keep.append(len(ids) - 1)
                completing.append(seq)
        plan.prepare()
        device = self.device
        logits = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=device),
            position_ids=torch.tensor([positions], dtype=torch.long, device=device),
            logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device),
            use_cache=False,
            ragged=plan,
        ).logits[0]
        decoding = len(rows.seqs)
        if decoding:
            rows.advance(self._next_tokens(logits[:decoding], rows.seqs))
            finished.extend(seq for seq in rows.seqs if seq.done)
            self._drop_done(rows)
        for seq, count in chunks:
            assert seq.prompt is not None
            seq.prompt.filled += count
            self.prefix_cache.store(seq.prompt_ids, seq.prompt)
        if completing:
            firsts = self._next_tokens(logits[decoding:], completing)
            for seq, token in zip(completing, firsts, strict=True):
                seq.prefilled = True
                if seq.done:
                    finished.append(seq)
                else:
                    assert seq.prompt is not None
                    rows.join(seq, seq.prompt, token)
                seq.prompt = None
        return finished

    def _next_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        greedy = logits.argmax(-1).tolist()
        tokens = []
        for row, seq in enumerate(seqs):
            token = greedy[row] if seq.generator is None else self._sample(logits[row], seq)
            self._advance(seq, token)
            tokens.append(token)
        return tokens

    @staticmethod
    def _drop_done(rows: KvRows) -> None:
        rows.keep([row for row, seq in enumerate(rows.seqs) if not seq.done])
