"""One forward pass for a whole continuous-batching step: every running row's next token and chunks of prompts
being prefilled, packed into a single sequence of tokens (no padding: matrix multiplies cost exactly the step's
tokens, and the weights are read once per step).

The model's attention layers call ``ragged_attention`` (registered with transformers' ``AttentionInterface``)
with the step's ``StepPlan``. It writes the new keys and values where they belong (each running row's next
column in the batch buffers, each chunk into its prompt's store) and attends per group: the running rows
together over the batch buffers (one query each, masked at each row's length), each chunk causally over its
prompt so far. Rotary positions come from the plan's position ids, so each token is computed exactly as if its
sequence ran alone, up to floating-point summation order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

from serving.models.kvcache import KvRows, PromptKv

ATTENTION = "serving_ragged"


@dataclass(frozen=True)
class Chunk:
    """``count`` prompt tokens from ``start``, at ``offset`` in the packed step."""

    prompt: PromptKv
    start: int
    count: int
    offset: int


@dataclass
class StepPlan:
    rows: KvRows
    decoding: int  # running rows in this step: the packed sequence's first tokens, one per row
    chunks: list[Chunk] = field(default_factory=list)
    _decode_mask: torch.Tensor | None = None
    _width: int = 0

    def prepare(self) -> None:
        """Once per step, before the forward pass: room for the new column and the decode mask."""
        if self.decoding:
            self.rows.reserve_step()
            self._width = self.rows.width
            columns = torch.arange(self._width, device=self.rows.data.device)
            self._decode_mask = (columns[None, :] <= self.rows.lengths[:, None])[:, None, None, :]

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
    ) -> torch.Tensor:
        """query ``[1, heads, tokens, dim]``, key/value ``[1, kv_heads, tokens, dim]`` → ``[1, tokens, heads, dim]``."""
        outputs: list[torch.Tensor] = []
        n = self.decoding
        if n:
            data = self.rows.data[layer]
            rows, columns = torch.arange(n, device=data.device), self.rows.lengths
            data[0, rows, :, columns] = key[0, :, :n].transpose(0, 1)
            data[1, rows, :, columns] = value[0, :, :n].transpose(0, 1)
            out = scaled_dot_product_attention(
                query[0, :, :n].transpose(0, 1).unsqueeze(2),  # [rows, heads, 1, dim]
                data[0, :n, :, : self._width],
                data[1, :n, :, : self._width],
                attn_mask=self._decode_mask,
                scale=scale,
                enable_gqa=True,
            )
            outputs.append(out.squeeze(2))
        for chunk in self.chunks:
            start, end = chunk.start, chunk.start + chunk.count
            span = slice(chunk.offset, chunk.offset + chunk.count)
            store = chunk.prompt.data[layer]
            store[0, :, :, start:end] = key[:, :, span]
            store[1, :, :, start:end] = value[:, :, span]
            mask = None
            if start:  # token i of the chunk sees the prompt up to its own position
                positions = torch.arange(end, device=store.device)
                mask = positions[None, :] <= positions[start:end, None]
            out = scaled_dot_product_attention(
                query[:, :, span],
                store[0, :, :, :end],
                store[1, :, :, :end],
                attn_mask=mask,
                is_causal=not start,
                scale=scale,
                enable_gqa=True,
            )
            outputs.append(out[0].transpose(0, 1))
        return torch.cat(outputs).unsqueeze(0)


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    ragged: StepPlan | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if ragged is None:
        raise RuntimeError("the serving_ragged attention runs only inside a continuous-batching step")
    return ragged.attend(int(module.layer_idx), query, key, value, scaling), None  # type: ignore[arg-type]


AttentionInterface.register(ATTENTION, ragged_attention)
