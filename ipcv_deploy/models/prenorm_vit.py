"""Blocks of the pre-norm ViTs that CLIP and SigLIP share in transformers.

``layer_norm1 -> self_attn (q_proj, k_proj, v_proj, out_proj) -> residual -> layer_norm2 ->
mlp -> residual``, one image per attention segment, a fixed token count per image.
"""

from __future__ import annotations

import torch
from torch import nn

from ipcv_deploy.compression import EncodedInput, TokenSet, gather_tokens, segment_attention

__all__ = ["prenorm_block", "prenorm_stabilized_block"]


def prenorm_block(layer: nn.Module, x: torch.Tensor, tokens: TokenSet) -> torch.Tensor:
    """The transformers encoder layer itself on [images, n, D] (equal images in a row)."""
    per_image = tokens.lengths[0]
    assert all(n == per_image for n in tokens.lengths), "a fixed token count per image"
    return layer(x.reshape(-1, per_image, x.shape[-1]), attention_mask=None).reshape(x.shape)


def prenorm_stabilized_block(
    layer: nn.Module, full: torch.Tensor, enc: EncodedInput, kept: TokenSet
) -> torch.Tensor:
    """AS block: kept-token queries over all keys/values of each image (spec section 3)."""
    assert kept.index is not None
    attn = layer.self_attn
    idx, heads = kept.index, attn.num_heads
    h = layer.layer_norm1(full)
    q = attn.q_proj(gather_tokens(h, idx)).unflatten(-1, (heads, -1))
    k = attn.k_proj(h).unflatten(-1, (heads, -1))
    v = attn.v_proj(h).unflatten(-1, (heads, -1))
    out = segment_attention(q, k, v, kept.lengths, enc.segments)
    x = gather_tokens(full, idx) + attn.out_proj(out.flatten(2))
    return x + layer.mlp(layer.layer_norm2(x))
