"""IPCV, top to bottom (``../shared/specs/ipcv.md``).

Select at block K, Neighbour-Guided Reconstruction (NGR), Attention Stabilization (AS), pruned
blocks, final restore. Family-agnostic: the encoder is reached only through
``EncoderAdapter``. Tokens travel as ``[B, T, D]`` rows that share one segment layout (images /
frames / tiles packed along ``T``); the ``ipcv`` ops run batched over rows and runs of equally
shaped segments, so the common case (one grid for every image) is one op call. The batch size
is never read in Python, so the same code exports with a dynamic batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ipcv_deploy.compression.protocol import EncodedInput, EncoderAdapter, TokenSet
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError
from ipcv_deploy.ops import neighbor_index, neighbor_reconstruct, token_select

__all__ = [
    "IPCVResult",
    "PruneState",
    "build_prune_state",
    "dense_encode",
    "gather_tokens",
    "ipcv_encode",
    "ipcv_encode_embedded",
]


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


def _segments_of(x: torch.Tensor, run: _Run) -> torch.Tensor:
    """The run's segments of every row of ``x`` [B, T, D] as [B * rows, size, D]."""
    span = x[:, run.start : run.start + run.rows * run.size]
    return span.reshape(-1, run.size, x.shape[-1])


def _packed(local: torch.Tensor, run: _Run, batch: int) -> torch.Tensor:
    """Per-segment indices [B * rows, n] as row-packed indices [B, rows * n]."""
    offsets = _row_offsets(run, local.device)
    return (local.view(batch, run.rows, local.shape[-1]) + offsets).view(batch, -1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b]]`` for every row: [B, T, D] and [B, T'] give [B, T', D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@dataclass
class _PoolRun:
    """Frozen NGR state of one run of neighbour pools (spec section 2)."""

    run: _Run
    kept_start: int  # offset of this run's kept tokens in a row of kept tokens
    keep_local: torch.Tensor  # [B * G, P]
    drop_local: torch.Tensor  # [B * G, R]
    x0_keep: torch.Tensor  # [B * G, P, D]
    x0_drop: torch.Tensor  # [B * G, R, D]
    nbr: torch.Tensor  # [B * G, R, k]


@dataclass
class PruneState:
    """What IPCV keeps from the pruning point on.

    Attributes:
        keep_idx: [B, P_total] row-packed indices of kept tokens, ascending.
        drop_idx: [B, R_total] row-packed indices of pruned tokens, ascending.
        kept: the kept tokens as a ``TokenSet`` (per-segment counts, ``index = keep_idx``).
        pools: frozen NGR state per run of neighbour pools.
    """

    keep_idx: torch.Tensor
    drop_idx: torch.Tensor
    kept: TokenSet
    pools: list[_PoolRun]

    def reconstruct(self, x_keep: torch.Tensor) -> torch.Tensor:
        """NGR: all tokens [B, T, D] in original order from the kept ones [B, P_total, D]."""
        batch, _, width = x_keep.shape
        parts = []
        for pool in self.pools:
            run = pool.run
            kept = x_keep[:, pool.kept_start : pool.kept_start + run.rows * run.keep]
            full = neighbor_reconstruct(
                kept.reshape(-1, run.keep, width),
                pool.x0_keep,
                pool.x0_drop,
                pool.nbr,
                pool.keep_local,
                pool.drop_local,
            )
            parts.append(full.reshape(batch, run.rows * run.size, width))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _select(
    h_prev: torch.Tensor,
    h_cur: torch.Tensor,
    segments: tuple[int, ...],
    config: IPCVConfig,
    num_prefix: int,
    spans_call: bool,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Spec section 1: row-packed keep/drop indices and kept tokens per segment."""
    batch, total, _ = h_cur.shape
    one_topk = config.selection == "global" and spans_call and len(segments) > 1
    if one_topk:
        assert num_prefix == 0, "a call-wide top-k cannot force per-segment prefix tokens"
        if batch != 1:
            raise ConfigError(
                "global selection over several images needs them packed in one row; "
                "use selection='per_image' for batched rows"
            )
        groups = [(0, total, config.kept_count(total))]
    else:
        starts = [sum(segments[:i]) for i in range(len(segments))]
        groups = [
            (s, n, config.kept_count(n, num_prefix)) for s, n in zip(starts, segments, strict=True)
        ]
    keeps, drops = [], []
    for run in _runs(groups):
        prefix = 0 if one_topk else num_prefix
        # A symbolic token count (native-resolution export) selects by ratio: the op derives
        # P from N, so the graph states it as an expression of its input shape.
        fixed = isinstance(run.keep, int)
        keep_num, keep_den = (0, 1) if fixed else config.keep_fraction
        keep, drop = token_select(
            _segments_of(h_prev, run),
            _segments_of(h_cur, run),
            run.keep if fixed else prefix,
            prefix,
            keep_num,
            keep_den,
        )
        keeps.append(_packed(keep, run, batch))
        drops.append(_packed(drop, run, batch))
    keep_idx, drop_idx = torch.cat(keeps, dim=1), torch.cat(drops, dim=1)
    if not one_topk:
        return keep_idx, drop_idx, tuple(keep for _, _, keep in groups)
    # Kept tokens per image: the reference counts with right=False, which puts a kept first
    # patch of image 2+ into the previous image; right=True counts it where it belongs.
    bounds = torch.tensor(segments, device=keep_idx.device).cumsum(0)
    image_of = torch.searchsorted(bounds, keep_idx[0], right=True)
    counts = torch.bincount(image_of, minlength=len(segments))
    return keep_idx, drop_idx, tuple(counts.tolist())


def _neighbors(config: IPCVConfig, kept: Any) -> int:
    """Neighbours per pruned token for a pool of ``kept`` tokens: ``min(k, P)``.

    A symbolic P (native-resolution export) is at least k over the export's token range.
    """
    return min(config.num_neighbors, kept) if isinstance(kept, int) else config.num_neighbors


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
        h_prev: [B, T, D] hidden states entering block K-1.
        h_cur: [B, T, D] hidden states entering block K.
        segments: tokens per image / frame / tile within a row (the same for every row).
        config: IPCV settings.
        num_prefix: leading tokens of each segment always kept (CLS).
        spans_call: whether ``global`` mode takes one top-k over all segments of a row.

    Returns:
        The ``PruneState``; ``state.reconstruct(gather_tokens(h_cur, state.keep_idx))``
        equals ``h_cur``.
    """
    keep_idx, drop_idx, kept_lengths = _select(
        h_prev, h_cur, segments, config, num_prefix, spans_call
    )
    batch, total, _ = h_cur.shape
    if config.selection == "global":
        pool_groups = [(0, total, keep_idx.shape[1])]
    else:
        starts = [sum(segments[:i]) for i in range(len(segments))]
        pool_groups = list(zip(starts, segments, kept_lengths, strict=True))
    pools = []
    kept_start = drop_start = 0
    for run in _runs(pool_groups):
        dropped = run.size - run.keep
        offsets = _row_offsets(run, h_cur.device)
        keep = keep_idx[:, kept_start : kept_start + run.rows * run.keep]
        drop = drop_idx[:, drop_start : drop_start + run.rows * dropped]
        keep_local = (keep.reshape(batch, run.rows, run.keep) - offsets).view(
            batch * run.rows, run.keep
        )
        drop_local = (drop.reshape(batch, run.rows, dropped) - offsets).view(
            batch * run.rows, dropped
        )
        segs = _segments_of(h_cur, run)
        x0_keep = gather_tokens(segs, keep_local)
        x0_drop = gather_tokens(segs, drop_local)
        pools.append(
            _PoolRun(
                run=run,
                kept_start=kept_start,
                keep_local=keep_local,
                drop_local=drop_local,
                x0_keep=x0_keep,
                x0_drop=x0_drop,
                nbr=neighbor_index(x0_keep, x0_drop, _neighbors(config, run.keep)),
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
    """Run a vision encoder with IPCV (spec section 5) on the dense ``forward``'s inputs.

    Args:
        adapter: the encoder, bound to its model.
        config: IPCV settings; ``config.prune_layer < adapter.depth``.
        *args: the dense ``forward``'s positional arguments.
        **kwargs: the dense ``forward``'s keyword arguments.

    Returns:
        ``IPCVResult`` whose ``output`` has the dense output's type and shapes.
    """
    return ipcv_encode_embedded(adapter, config, adapter.embed(*args, **kwargs))


def ipcv_encode_embedded(
    adapter: EncoderAdapter, config: IPCVConfig, enc: EncodedInput
) -> IPCVResult:
    """IPCV from the patch embeddings on: blocks, select at K, NGR, AS, pruned blocks, head."""
    config.check_depth(adapter.depth)
    adapter.prepare(config)
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
    x = gather_tokens(x, state.keep_idx)
    for index in range(config.prune_layer, adapter.depth):
        if index < config.as_end:
            x = adapter.stabilized_block(index, state.reconstruct(x), enc, state.kept)
        else:
            x = adapter.block(index, x, enc, state.kept)
    return IPCVResult(adapter.head(state.reconstruct(x), enc), state)


def dense_encode(adapter: EncoderAdapter, enc: EncodedInput) -> Any:
    """The encoder without IPCV, through the same adapter (the dense export's graph)."""
    everything = TokenSet(enc.segments)
    x = enc.tokens
    for index in range(adapter.depth):
        x = adapter.block(index, x, enc, everything)
    return adapter.head(x, enc)
