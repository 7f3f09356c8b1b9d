"""NeighborIndex and NeighborReconstruct in Triton (spec ``ipcv.md`` section 2).

**NeighborIndex**, one launch, no workspace: ``ipcv_nb_index_<dtype>_k<KPAD>`` grid
(B, cdiv(R, BLOCK_R)), args ``(x_keep, x_drop, nbr, kept, pruned, width, k)`` (i32 scalars:
P, R, D, k). Each program takes BLOCK_R pruned tokens, loops over the kept tokens in tiles of
BLOCK_P and the width in chunks of BLOCK_D with ``tl.dot`` (fp32 accumulation; fp16 inputs on
tensor cores, fp32 and bf16 inputs as fp32 with ``input_precision="ieee"``, no TF32), forms
``(|a|^2 + |b|^2) - 2ab`` in fp32 (NaN -> +inf) and moves the tile's smallest
``(distance, index)`` pairs into its running k best, so the output is in the reference order:
nearest first, equal distances by lower index. KPAD (16 for k <= 16, 32 for k <= 32,
``kpad_for``) is the register width of the running best; k > 32 is refused. R == 0 launches
nothing.

Near-tie rule (fp32): the sums over D run in another order than torch's ``bmm``, so the result
equals ``ipcv_deploy.ops.neighbor_index`` except where two candidates' reference distances are
within ``near_tie_tolerance`` = ``NEAR_TIE_EPS * D * (|a|^2 + max_p |b_p|^2)`` of each other
(twice the worst-case error of two fp32 sums of D terms): where a neighbour differs from the
reference, its reference distance is within that tolerance of the distance of the reference's
neighbour at the same rank. Distances that are exact in fp32 (integer-valued inputs, duplicated
kept rows) give identical indices in identical order.

**NeighborReconstruct**, one launch, no workspace: ``ipcv_nb_reconstruct_<dtype>`` grid
(B, cdiv(P, BLOCK_M) + cdiv(R, BLOCK_M)), args ``(x_keep, x0_keep, x0_drop, nbr, keep_idx,
drop_idx, full, kept, pruned, width, k)``. Programs with ``pid1 < cdiv(P, BLOCK_M)`` copy kept
rows (``full[keep_idx] = x_keep``), the rest rebuild pruned rows (``full[drop_idx] = x0_drop +
mean_j (x_keep - x0_keep)[nbr[:, j]]``, fp32, cast to the input dtype). N == 0 or D == 0
launches nothing. ``keep_idx`` and ``drop_idx`` must together be a permutation of 0..N-1
and ``nbr`` in 0..P-1 (as from TokenSelect and NeighborIndex; not checked, the reference's
scatter is undefined otherwise too).

Limits: B*P*D, B*R*D, B*N*D and B*R*k < 2^31 (i32 offsets), checked on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ipcv_deploy.errors import InputError
from ipcv_deploy.kernels.checks import (
    FLOAT_TYPES,
    check_device,
    check_floats,
    check_i32,
    check_rank,
)
from ipcv_deploy.kernels.variants import AotVariant
from ipcv_deploy.ops.specs import KERNEL_MAX_NEIGHBORS

__all__ = [
    "AOT_VARIANTS",
    "BLOCK_D",
    "BLOCK_M",
    "BLOCK_P",
    "BLOCK_R",
    "KPAD_CHOICES",
    "MAX_NEIGHBORS",
    "NEAR_TIE_EPS",
    "RECON_BLOCK_D",
    "kpad_for",
    "near_tie_tolerance",
    "neighbor_index",
    "neighbor_reconstruct",
]

#: Pruned tokens per program, kept tokens per tile, width per chunk of NeighborIndex.
BLOCK_R = 64
BLOCK_P = 64
BLOCK_D = 32
#: Compiled running-selection sizes (powers of two, <= BLOCK_P); the host picks the smallest >= k.
KPAD_CHOICES = (16, KERNEL_MAX_NEIGHBORS)
MAX_NEIGHBORS = KERNEL_MAX_NEIGHBORS
#: Rows per program and width per chunk of NeighborReconstruct.
BLOCK_M = 32
RECON_BLOCK_D = 64
#: Near-tie tolerance factor: 2 x the worst-case relative error (4 D u) of one fp32 distance.
NEAR_TIE_EPS = 2.0**-21


@triton.jit
def _nb_index(
    x_keep,
    x_drop,
    nbr,
    kept,
    pruned,
    width,
    k,
    block_r: tl.constexpr,
    block_p: tl.constexpr,
    block_d: tl.constexpr,
    kpad: tl.constexpr,
):
    b = tl.program_id(0)
    rows = tl.program_id(1) * block_r + tl.arange(0, block_r)
    row_ok = rows < pruned
    cols = tl.arange(0, block_d)
    a_base = x_drop + b * pruned * width + rows[:, None] * width
    # Running best: k distinct u64 keys (order-preserving distance bits << 32 | index); slots
    # from k on hold 0 and never take part. Sentinels are distinct and above every real key.
    slot = tl.arange(0, kpad)
    best = tl.where(slot < k, 0xFFFFFFFFFFFFFFFF - slot.to(tl.uint64), 0)
    best = tl.broadcast_to(best[None, :], (block_r, kpad))
    for p0 in range(0, kept, block_p):
        pidx = p0 + tl.arange(0, block_p)
        pidx_ok = pidx < kept
        b_base = x_keep + b * kept * width + pidx[:, None] * width
        ab = tl.zeros((block_r, block_p), dtype=tl.float32)
        na = tl.zeros((block_r,), dtype=tl.float32)
        nb = tl.zeros((block_p,), dtype=tl.float32)
        for d0 in range(0, width, block_d):
            col_ok = d0 + cols[None, :] < width
            a = tl.load(a_base + d0 + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0)
            bk = tl.load(b_base + d0 + cols[None, :], mask=pidx_ok[:, None] & col_ok, other=0.0)
            af = a.to(tl.float32)
            bf = bk.to(tl.float32)
            if a.dtype == tl.float16:  # tensor cores; fp16 products are exact in fp32
                ab = tl.dot(a, tl.trans(bk), ab)
            else:  # fp32 and bf16 (the interpreter's bf16 dot is wrong) in fp32, no TF32
                ab = tl.dot(af, tl.trans(bf), ab, input_precision="ieee")
            na += tl.sum(af * af, axis=1)
            nb += tl.sum(bf * bf, axis=1)
        dist = (na[:, None] + nb[None, :]) - 2.0 * ab
        dist = tl.where(dist != dist, float("inf"), dist) + 0.0  # NaN -> +inf, -0 -> +0
        dist = tl.where(pidx_ok[None, :], dist, float("inf"))  # padding loses every tie by index
        bits = dist.to(tl.uint32, bitcast=True)
        dkey = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
        cand = (dkey.to(tl.uint64) << 32) | pidx[None, :].to(tl.uint64)
        # Move the tile's smallest keys in while some row's smallest beats its worst kept one:
        # at most k rounds, usually few after the first tiles.
        low = tl.min(cand, axis=1)
        worst = tl.max(best, axis=1)
        while tl.sum((low < worst).to(tl.int32), axis=0) > 0:
            take = (low < worst)[:, None] & (best == worst[:, None])
            best = tl.where(take, low[:, None], best)
            cand = tl.where(cand == low[:, None], 0xFFFFFFFFFFFFFFFF, cand)
            low = tl.min(cand, axis=1)
            worst = tl.max(best, axis=1)
    # Emit the k best nearest first.
    best = tl.where(slot[None, :] < k, best, 0xFFFFFFFFFFFFFFFF)
    out = nbr + b * pruned * k + rows * k
    for j in range(k):
        low = tl.min(best, axis=1)
        tl.store(out + j, (low & 0xFFFFFFFF).to(tl.int64), mask=row_ok)
        best = tl.where(best == low[:, None], 0xFFFFFFFFFFFFFFFF, best)


@triton.jit
def _nb_reconstruct(
    x_keep,
    x0_keep,
    x0_drop,
    nbr,
    keep_idx,
    drop_idx,
    full,
    kept,
    pruned,
    width,
    k,
    block_m: tl.constexpr,
    block_d: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    keep_tiles = tl.cdiv(kept, block_m)
    n_tok = kept + pruned
    cols = tl.arange(0, block_d)
    if tile < keep_tiles:
        rows = tile * block_m + tl.arange(0, block_m)
        row_ok = rows < kept
        dst = tl.load(keep_idx + b * kept + rows, mask=row_ok, other=0)
        for d0 in range(0, width, block_d):
            ok = row_ok[:, None] & (d0 + cols[None, :] < width)
            src = x_keep + b * kept * width + rows[:, None] * width + d0 + cols[None, :]
            x = tl.load(src, mask=ok, other=0.0)
            tl.store(
                full + b * n_tok * width + dst[:, None] * width + d0 + cols[None, :], x, mask=ok
            )
    else:
        rows = (tile - keep_tiles) * block_m + tl.arange(0, block_m)
        row_ok = rows < pruned
        dst = tl.load(drop_idx + b * pruned + rows, mask=row_ok, other=0)
        for d0 in range(0, width, block_d):
            ok = row_ok[:, None] & (d0 + cols[None, :] < width)
            delta = tl.zeros((block_m, block_d), dtype=tl.float32)
            for j in range(k):
                n = tl.load(nbr + b * pruned * k + rows * k + j, mask=row_ok, other=0)
                at = b * kept * width + n[:, None] * width + d0 + cols[None, :]
                now = tl.load(x_keep + at, mask=ok, other=0.0).to(tl.float32)
                then = tl.load(x0_keep + at, mask=ok, other=0.0).to(tl.float32)
                delta += now - then
            src = x0_drop + b * pruned * width + rows[:, None] * width + d0 + cols[None, :]
            x0 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
            x = x0 + delta / k.to(tl.float32)
            out = full + b * n_tok * width + dst[:, None] * width + d0 + cols[None, :]
            tl.store(out, x.to(full.dtype.element_ty), mask=ok)


def kpad_for(num_neighbors: int) -> int:
    """The compiled running-selection size NeighborIndex uses for ``num_neighbors``."""
    return next(kpad for kpad in KPAD_CHOICES if num_neighbors <= kpad)


def near_tie_tolerance(x_keep: torch.Tensor, x_drop: torch.Tensor) -> torch.Tensor:
    """[B, R] fp32: how close two reference distances must be to be ordered differently.

    The near-tie rule of the module docstring: ``NEAR_TIE_EPS * D * (|a|^2 + max_p |b_p|^2)``.
    """
    a2 = x_drop.float().square().sum(-1)
    b2max = x_keep.float().square().sum(-1).amax(-1, keepdim=True)
    return NEAR_TIE_EPS * x_drop.shape[-1] * (a2 + b2max)


def _check_same(what: str, **sizes: int) -> None:
    if len(set(sizes.values())) != 1:
        listed = ", ".join(f"{name}={size}" for name, size in sizes.items())
        raise InputError(f"{what} disagree ({listed}): pass tensors of one call")


def neighbor_index(x_keep: torch.Tensor, x_drop: torch.Tensor, num_neighbors: int) -> torch.Tensor:
    """NeighborIndex on the GPU; equals ``ipcv_deploy.ops.neighbor_index`` up to fp32 near-ties.

    Args:
        x_keep: [B, P, D] kept tokens at block K, fp32/fp16/bf16.
        x_drop: [B, R, D] pruned tokens at block K, same dtype and device.
        num_neighbors: k, 1 <= k <= min(P, 32).

    Returns:
        [B, R, k] int64 indices into the P kept tokens, nearest first; equal distances in
        index order; a NaN distance counts as +inf.

    Raises:
        InputError: shapes, dtypes, devices or k out of range.
        BackendUnavailableError: CPU tensors without Triton's interpreter.
    """
    check_rank(3, x_keep=x_keep, x_drop=x_drop)
    check_floats(x_keep=x_keep, x_drop=x_drop)
    check_device(x_keep, x_drop)
    batch, kept, width = x_keep.shape
    _check_same("batch sizes", x_keep=batch, x_drop=x_drop.shape[0])
    _check_same("widths", x_keep=width, x_drop=x_drop.shape[2])
    pruned = x_drop.shape[1]
    if not 1 <= num_neighbors <= min(kept, MAX_NEIGHBORS):
        raise InputError(
            f"num_neighbors={num_neighbors} with {kept} kept tokens: want 1 <= k <= "
            f"min(P, {MAX_NEIGHBORS})"
        )
    check_i32("x_keep", x_keep.numel())
    check_i32("x_drop", x_drop.numel())
    check_i32("nbr", batch * pruned * num_neighbors)
    nbr = torch.empty((batch, pruned, num_neighbors), dtype=torch.int64, device=x_drop.device)
    if pruned == 0:
        return nbr
    _nb_index[(batch, triton.cdiv(pruned, BLOCK_R))](
        x_keep.contiguous(),
        x_drop.contiguous(),
        nbr,
        kept,
        pruned,
        width,
        num_neighbors,
        block_r=BLOCK_R,
        block_p=BLOCK_P,
        block_d=BLOCK_D,
        kpad=kpad_for(num_neighbors),
        num_warps=4,
    )
    return nbr


def neighbor_reconstruct(
    x_keep: torch.Tensor,
    x0_keep: torch.Tensor,
    x0_drop: torch.Tensor,
    nbr: torch.Tensor,
    keep_idx: torch.Tensor,
    drop_idx: torch.Tensor,
) -> torch.Tensor:
    """NeighborReconstruct on the GPU; same result as ``ipcv_deploy.ops.neighbor_reconstruct``.

    Args:
        x_keep: [B, P, D] kept tokens now, fp32/fp16/bf16.
        x0_keep: [B, P, D] kept tokens at block K, same dtype.
        x0_drop: [B, R, D] pruned tokens at block K, same dtype.
        nbr: [B, R, k] int64 from ``neighbor_index``.
        keep_idx: [B, P] int64 from ``token_select``.
        drop_idx: [B, R] int64 from ``token_select``.

    Returns:
        [B, N, D] with N = P + R, dtype of ``x_keep``: ``full[keep_idx] = x_keep``,
        ``full[drop_idx] = x0_drop + mean_j (x_keep - x0_keep)[nbr[:, j]]`` (fp32 sum).

    Raises:
        InputError: shapes, dtypes or devices that do not fit together.
        BackendUnavailableError: CPU tensors without Triton's interpreter.
    """
    check_rank(3, x_keep=x_keep, x0_keep=x0_keep, x0_drop=x0_drop, nbr=nbr)
    check_rank(2, keep_idx=keep_idx, drop_idx=drop_idx)
    check_floats(x_keep=x_keep, x0_keep=x0_keep, x0_drop=x0_drop)
    for name, t in {"nbr": nbr, "keep_idx": keep_idx, "drop_idx": drop_idx}.items():
        if t.dtype != torch.int64:
            raise InputError(f"{name} is {t.dtype}: pass the int64 indices of the ipcv ops")
    check_device(x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx)
    if x0_keep.shape != x_keep.shape:
        raise InputError(
            f"x0_keep {tuple(x0_keep.shape)} != x_keep {tuple(x_keep.shape)}: pass the kept "
            "tokens of one selection"
        )
    batch, kept, width = x_keep.shape
    pruned, k = nbr.shape[1], nbr.shape[2]
    _check_same(
        "batch sizes",
        x_keep=batch,
        x0_drop=x0_drop.shape[0],
        nbr=nbr.shape[0],
        keep_idx=keep_idx.shape[0],
        drop_idx=drop_idx.shape[0],
    )
    _check_same("kept counts", x_keep=kept, keep_idx=keep_idx.shape[1])
    _check_same("pruned counts", x0_drop=x0_drop.shape[1], nbr=pruned, drop_idx=drop_idx.shape[1])
    _check_same("widths", x_keep=width, x0_drop=x0_drop.shape[2])
    if k < 1 and pruned > 0:
        raise InputError("nbr has 0 neighbours per token: want num_neighbors >= 1")
    check_i32("full", batch * (kept + pruned) * width)
    check_i32("nbr", nbr.numel())
    full = torch.empty((batch, kept + pruned, width), dtype=x_keep.dtype, device=x_keep.device)
    if full.numel() == 0:
        return full
    grid = (batch, triton.cdiv(kept, BLOCK_M) + triton.cdiv(pruned, BLOCK_M))
    _nb_reconstruct[grid](
        x_keep.contiguous(),
        x0_keep.contiguous(),
        x0_drop.contiguous(),
        nbr.contiguous(),
        keep_idx.contiguous(),
        drop_idx.contiguous(),
        full,
        kept,
        pruned,
        width,
        k,
        block_m=BLOCK_M,
        block_d=RECON_BLOCK_D,
        num_warps=4,
    )
    return full


def _index_variant(dtype: torch.dtype, kpad: int) -> AotVariant:
    t = FLOAT_TYPES[dtype]
    return AotVariant(
        name=f"ipcv_nb_index_{t}_k{kpad}",
        kernel=_nb_index,
        signature={
            "x_keep": f"*{t}",
            "x_drop": f"*{t}",
            "nbr": "*i64",
            "kept": "i32",
            "pruned": "i32",
            "width": "i32",
            "k": "i32",
        },
        constexprs={"block_r": BLOCK_R, "block_p": BLOCK_P, "block_d": BLOCK_D, "kpad": kpad},
        num_warps=4,
    )


def _reconstruct_variant(dtype: torch.dtype) -> AotVariant:
    t = FLOAT_TYPES[dtype]
    return AotVariant(
        name=f"ipcv_nb_reconstruct_{t}",
        kernel=_nb_reconstruct,
        signature={
            "x_keep": f"*{t}",
            "x0_keep": f"*{t}",
            "x0_drop": f"*{t}",
            "nbr": "*i64",
            "keep_idx": "*i64",
            "drop_idx": "*i64",
            "full": f"*{t}",
            "kept": "i32",
            "pruned": "i32",
            "width": "i32",
            "k": "i32",
        },
        constexprs={"block_m": BLOCK_M, "block_d": RECON_BLOCK_D},
        num_warps=4,
    )


#: Every kernel specialisation the TensorRT plugins launch.
AOT_VARIANTS: tuple[AotVariant, ...] = (
    *(_index_variant(dtype, kpad) for dtype in FLOAT_TYPES for kpad in KPAD_CHOICES),
    *(_reconstruct_variant(dtype) for dtype in FLOAT_TYPES),
)
