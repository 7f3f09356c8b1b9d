"""Segment-restricted attention: queries of segment i attend to keys of segment i only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["segment_attention"]


def _heads_first(x: torch.Tensor, segment: int) -> torch.Tensor:
    """[B, S * n, H, d] as [B * S, H, n, d] for ``segment`` = n."""
    return x.reshape(-1, segment, x.shape[-2], x.shape[-1]).transpose(1, 2)


def _uniform(lengths: Sequence[int]) -> bool:
    # One segment needs no comparison (its length may be symbolic, a native-resolution export).
    return len(lengths) == 1 or len(set(lengths)) == 1


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lengths: Sequence[int],
    kv_lengths: Sequence[int],
) -> torch.Tensor:
    """Scaled dot-product attention inside segments, with fused SDPA.

    Equal segments run as one batched call over rows and segments; unequal ones run per
    segment. A segment with no queries (an image with no kept token in ``global`` mode) is
    skipped.

    Args:
        q: [B, Tq, H, d] queries, each row segments of ``q_lengths`` one after another.
        k: [B, Tk, H, d] keys, segments of ``kv_lengths``.
        v: [B, Tk, H, d] values.
        q_lengths: query tokens per segment.
        kv_lengths: key/value tokens per segment (same number of segments).

    Returns:
        [B, Tq, H, d] attention output, dtype of ``q``.
    """
    if _uniform(q_lengths) and _uniform(kv_lengths):
        out = F.scaled_dot_product_attention(
            _heads_first(q, q_lengths[0]),
            _heads_first(k, kv_lengths[0]),
            _heads_first(v, kv_lengths[0]),
        )
        return out.transpose(1, 2).reshape(q.shape)
    outs = []
    for qs, ks, vs in zip(
        q.split(list(q_lengths), dim=1),
        k.split(list(kv_lengths), dim=1),
        v.split(list(kv_lengths), dim=1),
        strict=True,
    ):
        if qs.shape[1] == 0:
            continue
        out = F.scaled_dot_product_attention(
            qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)
        )
        outs.append(out.transpose(1, 2))
    return torch.cat(outs, dim=1) if outs else q.new_empty(q.shape)
