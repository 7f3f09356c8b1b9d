"""IPCV, top to bottom (``../shared/specs/ipcv.md``).

Select at block K, Neighbour-Guided Reconstruction (NGR), Attention Stabilization (AS), pruned
blocks, final restore. Family-agnostic: the encoder is reached only through
``EncoderAdapter``. Tokens are packed ``[T, D]`` in segments (images / frames / tiles); the
``ipcv`` ops run batched over runs of equally shaped segments, so the common case (one grid
for every image) is one op call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ipcv_deploy.compression.protocol import EncodedInput, EncoderAdapter, TokenSet
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.ops import neighbor_index, neighbor_reconstruct, token_select

__all__ = ["IPCVResult", "PruneState", "build_prune_state", "ipcv_encode"]


@dataclass(frozen=True)
class _Run:
    """One batched op call: ``rows`` groups of ``size`` tokens from ``start``, ``keep`` each."""

    start: int
    rows: int
    size: int
    keep: int


def _runs(groups: list[tuple[int, int, int]]) -> list[_Run]:
    """Merge consecutive (start, size, keep) groups of equal size and keep into runs."""
    runs: list[_Run] = []
    for start, size, keep in groups:
        last = runs[-1] if runs else None
        if (
            last
            and (last.size, last.keep) == (size, keep)
            and start == last.start + last.rows * size
        ):
            runs[-1] = _Run(last.start, last.rows + 1, size, keep)
        else:
            runs.append(_Run(start, 1, size, keep))
    return runs


def _row_offsets(run: _Run, device: torch.device) -> torch.Tensor:
    return (run.start + torch.arange(run.rows, device=device) * run.size).unsqueeze(1)


@dataclass
class _PoolRun:
    """Frozen NGR state of one run of neighbour pools (spec section 2)."""

    run: _Run
    kept_start: int  # offset of this run's kept rows in the packed kept tokens
    keep_local: torch.Tensor  # [G, P]
    drop_local: torch.Tensor  # [G, R]
    x0_keep: torch.Tensor  # [G, P, D]
    x0_drop: torch.Tensor  # [G, R, D]
    nbr: torch.Tensor  # [G, R, k]


@dataclass
class PruneState:
    """What IPCV keeps from the pruning point on.

    Attributes:
        keep_idx: [P_total] packed indices of kept tokens, ascending.
        drop_idx: [R_total] packed indices of pruned tokens, ascending.
        kept: the kept tokens as a ``TokenSet`` (per-segment counts, ``index = keep_idx``).
        pools: frozen NGR state per run of neighbour pools.
    """

    keep_idx: torch.Tensor
    drop_idx: torch.Tensor
    kept: TokenSet
    pools: list[_PoolRun]

    def reconstruct(self, x_keep: torch.Tensor) -> torch.Tensor:
        """NGR: all T tokens [T, D] in original order from the kept ones [P_total, D]."""
        width = x_keep.shape[-1]
        parts = []
        for pool in self.pools:
            run = pool.run
            rows = x_keep[pool.kept_start : pool.kept_start + run.rows * run.keep]
            full = neighbor_reconstruct(
                rows.view(run.rows, run.keep, width),
                pool.x0_keep,
                pool.x0_drop,
                pool.nbr,
                pool.keep_local,
                pool.drop_local,
            )
            parts.append(full.reshape(run.rows * run.size, width))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _select(
    h_prev: torch.Tensor,
    h_cur: torch.Tensor,
    segments: tuple[int, ...],
    config: IPCVConfig,
    num_prefix: int,
    spans_call: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Spec section 1: packed keep/drop indices and kept tokens per segment."""
    width = h_cur.shape[-1]
    total = h_cur.shape[0]
    one_topk = config.selection == "global" and spans_call and len(segments) > 1
    if one_topk:
        assert num_prefix == 0, "a call-wide top-k cannot force per-segment prefix tokens"
        groups = [(0, total, config.kept_count(total))]
    else:
        starts = [sum(segments[:i]) for i in range(len(segments))]
        groups = [
            (s, n, config.kept_count(n, num_prefix)) for s, n in zip(starts, segments, strict=True)
        ]
    keeps, drops = [], []
    for run in _runs(groups):
        span = slice(run.start, run.start + run.rows * run.size)
        keep, drop = token_select(
            h_prev[span].view(run.rows, run.size, width),
            h_cur[span].view(run.rows, run.size, width),
            run.keep,
            0 if one_topk else num_prefix,
        )
        offsets = _row_offsets(run, h_cur.device)
        keeps.append((keep + offsets).reshape(-1))
        drops.append((drop + offsets).reshape(-1))
    keep_idx, drop_idx = torch.cat(keeps), torch.cat(drops)
    if not one_topk:
        return keep_idx, drop_idx, tuple(keep for _, _, keep in groups)
    # Kept tokens per image: the reference counts with right=False, which puts a kept first
    # patch of image 2+ into the previous image; right=True counts it where it belongs.
    bounds = torch.tensor(segments, device=keep_idx.device).cumsum(0)
    image_of = torch.searchsorted(bounds, keep_idx, right=True)
    counts = torch.bincount(image_of, minlength=len(segments))
    return keep_idx, drop_idx, tuple(counts.tolist())


def build_prune_state(
    h_prev: torch.Tensor,
    h_cur: torch.Tensor,
    segments: tuple[int, ...],
    config: IPCVConfig,
    num_prefix: int = 0,
    spans_call: bool = True,
) -> PruneState:
    """Select tokens at block K and freeze the NGR state.

    Args:
        h_prev: [T, D] packed hidden states entering block K-1.
        h_cur: [T, D] packed hidden states entering block K.
        segments: tokens per image / frame / tile.
        config: IPCV settings.
        num_prefix: leading tokens of each segment always kept (CLS).
        spans_call: whether ``global`` mode takes one top-k over all segments.

    Returns:
        The ``PruneState``; ``state.reconstruct(h_cur[state.keep_idx])`` equals ``h_cur``.
    """
    keep_idx, drop_idx, kept_lengths = _select(
        h_prev, h_cur, segments, config, num_prefix, spans_call
    )
    total, width = h_cur.shape
    if config.selection == "global":
        pool_groups = [(0, total, keep_idx.shape[0])]
    else:
        starts = [sum(segments[:i]) for i in range(len(segments))]
        pool_groups = list(zip(starts, segments, kept_lengths, strict=True))
    pools = []
    kept_start = drop_start = 0
    for run in _runs(pool_groups):
        dropped = run.size - run.keep
        keep = keep_idx[kept_start : kept_start + run.rows * run.keep].view(run.rows, run.keep)
        drop = drop_idx[drop_start : drop_start + run.rows * dropped].view(run.rows, dropped)
        x0_keep = h_cur[keep.reshape(-1)].view(run.rows, run.keep, width)
        x0_drop = h_cur[drop.reshape(-1)].view(run.rows, dropped, width)
        offsets = _row_offsets(run, h_cur.device)
        pools.append(
            _PoolRun(
                run=run,
                kept_start=kept_start,
                keep_local=keep - offsets,
                drop_local=drop - offsets,
                x0_keep=x0_keep,
                x0_drop=x0_drop,
                nbr=neighbor_index(x0_keep, x0_drop, min(config.num_neighbors, run.keep)),
            )
        )
        kept_start += run.rows * run.keep
        drop_start += run.rows * dropped
    return PruneState(keep_idx, drop_idx, TokenSet(kept_lengths, keep_idx), pools)


@dataclass
class IPCVResult:
    """What ``ipcv_encode`` returns: the encoder output and the pruning state behind it."""

    output: Any
    state: PruneState


def ipcv_encode(
    adapter: EncoderAdapter, config: IPCVConfig, *args: Any, **kwargs: Any
) -> IPCVResult:
    """Run a vision encoder with IPCV (spec section 5).

    Args:
        adapter: the encoder, bound to its model.
        config: IPCV settings; ``config.prune_layer < adapter.depth``.
        *args: the dense ``forward``'s positional arguments.
        **kwargs: the dense ``forward``'s keyword arguments.

    Returns:
        ``IPCVResult`` whose ``output`` has the dense output's type and shapes.
    """
    config.check_depth(adapter.depth)
    enc: EncodedInput = adapter.embed(*args, **kwargs)
    everything = TokenSet(enc.segments)
    x = enc.tokens
    for index in range(config.prune_layer - 1):
        x = adapter.block(index, x, enc, everything)
    h_prev = x
    x = adapter.block(config.prune_layer - 1, x, enc, everything)
    state = build_prune_state(
        h_prev,
        x,
        enc.segments,
        config,
        num_prefix=adapter.num_prefix_tokens,
        spans_call=adapter.global_topk_spans_call,
    )
    x = x[state.keep_idx]
    for index in range(config.prune_layer, adapter.depth):
        if index < config.as_end:
            x = adapter.stabilized_block(index, state.reconstruct(x), enc, state.kept)
        else:
            x = adapter.block(index, x, enc, state.kept)
    return IPCVResult(adapter.head(state.reconstruct(x), enc), state)
