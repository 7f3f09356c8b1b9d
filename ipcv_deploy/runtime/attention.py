"""SDPA with a side channel: one layer's key vectors and its last-query attention row.

LLM-side pruning needs, from one decoder layer, either the keys (DART) or the attention of
the last prompt token to every key (FastV, TokenCarve). Instead of switching the whole LLM to
eager attention, ``recording_attention`` wraps transformers' SDPA: every layer still runs
fused attention, and the recorded layer additionally recomputes the single attention row
``softmax(q_last K^T * scale + mask_last)`` from the query and keys SDPA was given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ipcv_deploy.hf_compat import (
    attention_implementation,
    register_attention,
    sdpa_attention,
)

__all__ = ["RECORDING_ATTENTION", "AttentionRecord", "recording_attention"]

#: The attention implementation name registered with transformers.
RECORDING_ATTENTION = "ipcv_recording_sdpa"


@dataclass
class AttentionRecord:
    """What one decoder layer's attention saw during prefill.

    Attributes:
        layer: the decoder layer index to record.
        keys: [B, L, kv_heads * head_dim] key vectors (after RoPE, as cached), flattened.
        last_row: [B, L] attention probabilities of the last query to every key, head mean.
    """

    layer: int
    keys: torch.Tensor | None = None
    last_row: torch.Tensor | None = None
    want_row: bool = field(default=True)

    def capture(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        """Keep the keys and recompute the last query's attention row in fp32."""
        batch, kv_heads, length, head_dim = key.shape
        self.keys = key.transpose(1, 2).reshape(batch, length, kv_heads * head_dim)
        if not self.want_row:
            return
        heads = query.shape[1]
        q_last = query[:, :, -1:, :].float()  # [B, H, 1, d]
        k = key.float().repeat_interleave(heads // kv_heads, dim=1)  # [B, H, L, d]
        scale = scaling if scaling is not None else head_dim**-0.5
        logits = (q_last @ k.transpose(-1, -2)) * scale  # [B, H, 1, L]
        if mask is not None:
            row = mask[:, :, -1:, :length]
            if row.dtype == torch.bool:
                logits = logits.masked_fill(~row, float("-inf"))
            else:
                logits = logits + row.float()
        self.last_row = logits.softmax(-1).mean(1).squeeze(1)


_ACTIVE: ContextVar[AttentionRecord | None] = ContextVar("ipcv_attention_record", default=None)


def _recording_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    record = _ACTIVE.get()
    if record is not None and getattr(module, "layer_idx", None) == record.layer:
        record.capture(query, key, attention_mask, kwargs.get("scaling"))
    return sdpa_attention(module, query, key, value, attention_mask, **kwargs)


register_attention(RECORDING_ATTENTION, _recording_sdpa)


@contextlib.contextmanager
def recording_attention(config: Any, record: AttentionRecord) -> Iterator[AttentionRecord]:
    """Run the LLM of ``config`` (its text config) with recording SDPA while inside.

    Args:
        config: the decoder's config object (``model.config.text_config`` or the model's own).
        record: filled by the layer ``record.layer`` during the forward inside the block.

    Raises:
        ConfigError: the LLM does not run SDPA attention.
    """
    with attention_implementation(config, RECORDING_ATTENTION, allowed=("sdpa",)):
        token = _ACTIVE.set(record)
        try:
            yield record
        finally:
            _ACTIVE.reset(token)
