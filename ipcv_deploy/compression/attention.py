"""Segment-restricted attention: queries of segment i attend to keys of segment i only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["banded_window_attention", "segment_attention", "window_attention"]


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


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_windows: torch.Tensor,
    k_windows: torch.Tensor,
) -> torch.Tensor:
    """Variable-length attention inside windows (eager): each window on its own tokens only.

    The tokens of a window are contiguous in every row (window ids ascending), as the kept
    tokens of window-ordered images are; each window costs (its queries) x (its keys).

    Args:
        q: [B, Tq, H, d] queries.
        k: [B, Tk, H, d] keys.
        v: [B, Tk, H, d] values.
        q_windows: [B, Tq] window id of each query, ascending in each row.
        k_windows: [B, Tk] window id of each key, ascending in each row.

    Returns:
        [B, Tq, H, d] attention output.
    """
    count = int(torch.maximum(q_windows.max(), k_windows.max())) + 1
    rows = []
    for b in range(q.shape[0]):
        q_lengths = torch.bincount(q_windows[b], minlength=count).tolist()
        k_lengths = torch.bincount(k_windows[b], minlength=count).tolist()
        rows.append(
            segment_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], q_lengths, k_lengths)
        )
    return torch.cat(rows)


def _chunks(x: torch.Tensor, size: int, fill: float | int) -> torch.Tensor:
    """[B, T, ...] padded with ``fill`` to whole chunks: [B, ceil(T / size), size, ...]."""
    # Padded unconditionally: the token count is symbolic in an export.
    pad = x.new_full((x.shape[0], (-x.shape[1]) % size, *x.shape[2:]), fill)
    return torch.cat([x, pad], dim=1).unflatten(1, (-1, size))


def _band(x: torch.Tensor, fill: float | int) -> torch.Tensor:
    """Chunks [B, C, S, ...] -> each chunk with its neighbours: [B, C, 3S, ...]."""
    edge = x.new_full((x.shape[0], 1, *x.shape[2:]), fill)
    padded = torch.cat([edge, x, edge], dim=1)
    return torch.cat([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], dim=2)


def banded_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: torch.Tensor,
    window_tokens: int,
) -> torch.Tensor:
    """Window attention with shapes that follow the token count only (exportable form).

    Queries and keys are the same tokens, their windows contiguous runs of at most
    ``window_tokens`` = S tokens (any number of windows, of any sizes up to S: pruned
    windows, the short windows at an image's edge). Cut into chunks of S, a window lies
    within its query's chunk and the two next to it, so each chunk of queries attends to
    3S keys under a same-window mask: 3S keys per query, whatever the number of windows or
    their sizes, and no shape depends on the data.

    Args:
        q: [B, T, H, d] queries.
        k: [B, T, H, d] keys of the same tokens.
        v: [B, T, H, d] values.
        windows: [B, T] window id of each token (>= 0), ascending in each row.
        window_tokens: S, the most tokens one window holds.

    Returns:
        [B, T, H, d] attention output, equal to attention under a same-window mask.
    """
    tokens = q.shape[1]
    # Padding takes id -1: padded queries attend to padded keys (finite, then dropped).
    ids = _chunks(windows, window_tokens, -1)
    same = ids.unsqueeze(-1) == _band(ids, -1).unsqueeze(-2)  # [B, C, S, 3S]

    def heads_first(x: torch.Tensor) -> torch.Tensor:  # [B, C, n, H, d] -> [B*C, H, n, d]
        return x.flatten(0, 1).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        heads_first(_chunks(q, window_tokens, 0.0)),
        heads_first(_band(_chunks(k, window_tokens, 0.0), 0.0)),
        heads_first(_band(_chunks(v, window_tokens, 0.0), 0.0)),
        attn_mask=same.flatten(0, 1).unsqueeze(1),
    )
    return out.transpose(1, 2).reshape(q.shape[0], -1, *q.shape[2:])[:, :tokens]
