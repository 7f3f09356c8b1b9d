"""TokenSelect in Triton: fp32 change scores, radix select of the P-th largest, compaction.

Same contract as ``ipcv_deploy.ops.token_select`` (spec ``ipcv.md`` section 1, ranking rule
``ops.specs.RANKING``): every row keeps its ``num_keep`` highest-scoring tokens, prefix tokens
first, equal scores to the lower index, a NaN score as -inf; both index sets ascending. Work is
O(B N D) for the scores plus O(B N) per radix pass; nothing is quadratic in N and every size up
to the i32 limit below works (16384+ patches of Qwen2-VL at high resolution included).

Host launch sequence (the TensorRT plugin replays it through the CUDA driver API), with
``T_keys = cdiv(N, KEYS_BLOCK_N)`` and ``T = cdiv(N, BLOCK_N)``; every kernel takes the same
workspace pointer ``ws``; scalars are i32 and named as in the kernel signatures
(``batch`` = B, ``tokens`` = N, ``width`` = D, ``num_keep`` = P):

1. ``ipcv_ts_keys_<dtype>`` grid (B, T_keys), args
   ``(h_prev, h_cur, ws, batch, tokens, width, num_keep, num_prefix)``: one order-preserving
   u32 key per token (fp32 score, NaN -> key of -inf, prefix tokens -> 0xFFFFFFFF); the
   program with ``pid1 == 0`` also zeroes its row's four histograms and sets its row state to
   ``(prefix=0, mask=0, remaining=num_keep)``, so the workspace needs no memset.
2. For ``shift`` in 24, 16, 8, 0 (``RADIX_SHIFTS``, most significant byte first):
   ``ipcv_ts_hist`` grid (B, T), args ``(ws, batch, tokens, shift)``: counts the byte
   ``(key >> shift) & 255`` of the keys that match the bytes chosen so far into that pass's
   histogram (atomic adds); then ``ipcv_ts_pick`` grid (B,), args ``(ws, batch, tokens,
   shift)``: picks the byte holding the ``remaining``-th largest key, updates the row state.
   After pass 4 the state holds the threshold key ``thr`` (the P-th largest key) and
   ``remaining``, how many keys equal to ``thr`` are kept (the lowest-index ones).
3. ``ipcv_ts_count`` grid (B, T), args ``(ws, batch, tokens)``: per tile the count of
   keys > thr and of keys == thr.
4. ``ipcv_ts_write`` grid (B, T), args ``(ws, keep_idx, drop_idx, batch, tokens, num_keep)``:
   the kept tokens (keys > thr, and the first ``remaining`` keys == thr in index order) to
   ``keep_idx`` [B, P], the rest to ``drop_idx`` [B, N - P], both int64 ascending. With
   N == P pass ``keep_idx`` as ``drop_idx`` too (nothing is written to it).

Workspace, one byte buffer of ``token_select_workspace_bytes(B, N)`` bytes (4-byte words,
offsets in words; 256-byte alignment is enough):

- ``keys``   [B, N] u32 at 0
- ``hist``   [4, B, 256] i32 at ``B*N`` (one histogram per radix pass)
- ``state``  [B, 4] i32 at ``B*N + 1024*B``: (prefix bits as u32, mask of chosen bits, remaining,
  unused)
- ``counts`` [B, T, 2] i32 at ``B*N + 1028*B``: (keys > thr, keys == thr) per tile

Limits: B*N*D < 2^31 (i32 offsets), checked on the host. Scores are ``sqrt`` (correctly
rounded) of the fp32 sum of squares accumulated in ``KEYS_BLOCK_D`` chunks; a score equal in
exact arithmetic is equal here, so ties rank exactly as the reference does. Scores that differ
only by rounding (summation order differs from ``torch.linalg.vector_norm``) can, in a near-tie
at the P-th place, rank the other way, as the reference's own CPU and CUDA results can.
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

__all__ = [
    "AOT_VARIANTS",
    "BLOCK_N",
    "KEYS_BLOCK_D",
    "KEYS_BLOCK_N",
    "RADIX_SHIFTS",
    "token_select",
    "token_select_workspace_bytes",
]

#: Tokens per program of the keys kernel, and the width chunk it accumulates over.
KEYS_BLOCK_N = 64
KEYS_BLOCK_D = 64
#: Tokens per program of the histogram, count and write kernels.
BLOCK_N = 1024
#: Tiles of counts the write kernel sums per step of its prefix loop.
CHUNK_T = 256
#: The ``shift`` argument of the four radix passes, in launch order.
RADIX_SHIFTS = (24, 16, 8, 0)


@triton.jit
def _sections(batch, tokens):
    """Word offsets of the workspace sections hist, state and counts."""
    hist = batch * tokens
    state = hist + 1024 * batch
    counts = state + 4 * batch
    return hist, state, counts


@triton.jit
def _ts_keys(
    h_prev,
    h_cur,
    ws,
    batch,
    tokens,
    width,
    num_keep,
    num_prefix,
    block_n: tl.constexpr,
    block_d: tl.constexpr,
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    rows = tile * block_n + tl.arange(0, block_n)
    row_ok = rows < tokens
    cols = tl.arange(0, block_d)
    base = b * tokens * width + rows[:, None] * width
    acc = tl.zeros((block_n, block_d), dtype=tl.float32)
    for d0 in range(0, width, block_d):
        ok = row_ok[:, None] & (d0 + cols[None, :] < width)
        cur = tl.load(h_cur + base + d0 + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        prev = tl.load(h_prev + base + d0 + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        diff = cur - prev
        acc += diff * diff
    score = tl.sqrt_rn(tl.sum(acc, axis=1))
    bits = score.to(tl.uint32, bitcast=True)
    # Order-preserving map of fp32 to u32: flip all bits of negatives, the sign bit of the rest.
    key = tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)
    key = tl.where(score != score, 0x007FFFFF, key)  # NaN ranks as -inf (key of -inf)
    key = tl.where(rows < num_prefix, 0xFFFFFFFF, key)  # prefix tokens rank above +inf
    tl.store(ws + b * tokens + rows, key.to(tl.int32, bitcast=True), mask=row_ok)
    if tile == 0:
        hist, state, _ = _sections(batch, tokens)
        bins = tl.arange(0, 256)
        for p in range(4):
            tl.store(ws + hist + (p * batch + b) * 256 + bins, tl.zeros((256,), dtype=tl.int32))
        slot = tl.arange(0, 4)
        tl.store(ws + state + b * 4 + slot, tl.where(slot == 2, num_keep, 0))


@triton.jit
def _ts_hist(ws, batch, tokens, shift, block_n: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * block_n + tl.arange(0, block_n)
    hist, state, _ = _sections(batch, tokens)
    prefix = tl.load(ws + state + b * 4).to(tl.uint32, bitcast=True)
    chosen = tl.load(ws + state + b * 4 + 1).to(tl.uint32, bitcast=True)
    key = tl.load(ws + b * tokens + offs, mask=offs < tokens, other=0).to(tl.uint32, bitcast=True)
    match = (offs < tokens) & ((key & chosen) == prefix)
    digit = (key >> shift.to(tl.uint32)) & 255
    counts = tl.histogram(digit.to(tl.int32), 256, mask=match)
    radix_pass = (24 - shift) // 8
    tl.atomic_add(ws + hist + (radix_pass * batch + b) * 256 + tl.arange(0, 256), counts)


@triton.jit
def _ts_pick(ws, batch, tokens, shift):
    b = tl.program_id(0)
    hist, state, _ = _sections(batch, tokens)
    radix_pass = (24 - shift) // 8
    bins = tl.arange(0, 256)
    counts = tl.load(ws + hist + (radix_pass * batch + b) * 256 + bins)
    remaining = tl.load(ws + state + b * 4 + 2)
    above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0)  # matching keys in higher bins
    hit = (above < remaining) & (remaining <= above + counts)  # exactly one bin
    digit = tl.max(tl.where(hit, bins, -1), axis=0)
    prefix = tl.load(ws + state + b * 4).to(tl.uint32, bitcast=True)
    chosen = tl.load(ws + state + b * 4 + 1).to(tl.uint32, bitcast=True)
    prefix = prefix | (digit.to(tl.uint32) << shift.to(tl.uint32))
    chosen = chosen | (tl.full((), 255, tl.uint32) << shift.to(tl.uint32))
    tl.store(ws + state + b * 4, prefix.to(tl.int32, bitcast=True))
    tl.store(ws + state + b * 4 + 1, chosen.to(tl.int32, bitcast=True))
    tl.store(ws + state + b * 4 + 2, remaining - tl.sum(tl.where(hit, above, 0), axis=0))


@triton.jit
def _ts_count(ws, batch, tokens, block_n: tl.constexpr):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    offs = tile * block_n + tl.arange(0, block_n)
    _, state, counts = _sections(batch, tokens)
    thr = tl.load(ws + state + b * 4).to(tl.uint32, bitcast=True)
    key = tl.load(ws + b * tokens + offs, mask=offs < tokens, other=0).to(tl.uint32, bitcast=True)
    ok = offs < tokens
    tiles = tl.cdiv(tokens, block_n)
    slot = ws + counts + (b * tiles + tile) * 2
    tl.store(slot, tl.sum((ok & (key > thr)).to(tl.int32), axis=0))
    tl.store(slot + 1, tl.sum((ok & (key == thr)).to(tl.int32), axis=0))


@triton.jit
def _ts_write(
    ws, keep_idx, drop_idx, batch, tokens, num_keep, block_n: tl.constexpr, chunk_t: tl.constexpr
):
    b = tl.program_id(0)
    tile = tl.program_id(1)
    _, state, counts = _sections(batch, tokens)
    thr = tl.load(ws + state + b * 4).to(tl.uint32, bitcast=True)
    remaining = tl.load(ws + state + b * 4 + 2)
    tiles = tl.cdiv(tokens, block_n)
    # Keys > thr and == thr in the tiles before this one.
    above_before = 0
    equal_before = 0
    chunk = tl.arange(0, chunk_t)
    for t0 in range(0, tile, chunk_t):
        ok = t0 + chunk < tile
        slot = ws + counts + (b * tiles + t0 + chunk) * 2
        above_before += tl.sum(tl.load(slot, mask=ok, other=0), axis=0)
        equal_before += tl.sum(tl.load(slot + 1, mask=ok, other=0), axis=0)
    offs = tile * block_n + tl.arange(0, block_n)
    ok = offs < tokens
    key = tl.load(ws + b * tokens + offs, mask=ok, other=0).to(tl.uint32, bitcast=True)
    equal = (ok & (key == thr)).to(tl.int32)
    # Equal keys are kept in index order: the first ``remaining`` of the row.
    equal_rank = equal_before + tl.cumsum(equal, axis=0) - equal
    keep = ok & ((key > thr) | ((equal != 0) & (equal_rank < remaining)))
    keep_i = keep.to(tl.int32)
    drop_i = (ok & ~keep).to(tl.int32)
    kept_before = above_before + tl.minimum(equal_before, remaining)
    keep_pos = kept_before + tl.cumsum(keep_i, axis=0) - keep_i
    drop_pos = tile * block_n - kept_before + tl.cumsum(drop_i, axis=0) - drop_i
    idx = offs.to(tl.int64)
    tl.store(keep_idx + b * num_keep + keep_pos, idx, mask=keep)
    tl.store(drop_idx + b * (tokens - num_keep) + drop_pos, idx, mask=drop_i != 0)


def token_select_workspace_bytes(batch: int, tokens: int) -> int:
    """Bytes of the one workspace buffer of ``token_select`` (layout in the module docstring)."""
    return 4 * (batch * tokens + 1028 * batch + 2 * batch * triton.cdiv(tokens, BLOCK_N))


def token_select(
    h_prev: torch.Tensor, h_cur: torch.Tensor, num_keep: int, num_prefix: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """TokenSelect on the GPU (spec section 1); same results as ``ipcv_deploy.ops.token_select``.

    Args:
        h_prev: [B, N, D] hidden states entering block K-1, fp32/fp16/bf16.
        h_cur: [B, N, D] hidden states entering block K, same dtype and device.
        num_keep: P, kept per row, prefix included (num_prefix <= P <= N, P >= 1).
        num_prefix: leading tokens of every row always kept.

    Returns:
        ``keep_idx`` [B, P] and ``drop_idx`` [B, N - P], int64, each ascending.

    Raises:
        InputError: shapes, dtypes, devices or counts out of range.
        BackendUnavailableError: CPU tensors without Triton's interpreter.
    """
    check_rank(3, h_prev=h_prev, h_cur=h_cur)
    if h_prev.shape != h_cur.shape:
        raise InputError(
            f"h_prev {tuple(h_prev.shape)} and h_cur {tuple(h_cur.shape)} differ: pass the same "
            "tokens before and after block K-1"
        )
    check_floats(h_prev=h_prev, h_cur=h_cur)
    check_device(h_prev, h_cur)
    batch, tokens, width = h_cur.shape
    if not 1 <= num_keep <= tokens:
        raise InputError(f"num_keep={num_keep} with {tokens} tokens: want 1 <= num_keep <= N")
    if not 0 <= num_prefix <= num_keep:
        raise InputError(f"num_prefix={num_prefix}: want 0 <= num_prefix <= num_keep={num_keep}")
    check_i32("h_cur", h_cur.numel())
    if width == 0:
        raise InputError("h_cur has width 0: the score needs at least one channel")
    h_prev, h_cur = h_prev.contiguous(), h_cur.contiguous()
    device = h_cur.device
    ws = torch.empty(token_select_workspace_bytes(batch, tokens), dtype=torch.uint8, device=device)
    ws = ws.view(torch.int32)
    keep_idx = torch.empty((batch, num_keep), dtype=torch.int64, device=device)
    drop_idx = torch.empty((batch, tokens - num_keep), dtype=torch.int64, device=device)
    drop_arg = drop_idx if tokens > num_keep else keep_idx  # never written; a valid pointer
    tiles = triton.cdiv(tokens, BLOCK_N)
    _ts_keys[(batch, triton.cdiv(tokens, KEYS_BLOCK_N))](
        h_prev,
        h_cur,
        ws,
        batch,
        tokens,
        width,
        num_keep,
        num_prefix,
        block_n=KEYS_BLOCK_N,
        block_d=KEYS_BLOCK_D,
        num_warps=4,
    )
    for shift in RADIX_SHIFTS:
        _ts_hist[(batch, tiles)](ws, batch, tokens, shift, block_n=BLOCK_N, num_warps=4)
        _ts_pick[(batch,)](ws, batch, tokens, shift, num_warps=1)
    _ts_count[(batch, tiles)](ws, batch, tokens, block_n=BLOCK_N, num_warps=4)
    _ts_write[(batch, tiles)](
        ws,
        keep_idx,
        drop_arg,
        batch,
        tokens,
        num_keep,
        block_n=BLOCK_N,
        chunk_t=CHUNK_T,
        num_warps=4,
    )
    return keep_idx, drop_idx


def _keys_variant(dtype: torch.dtype) -> AotVariant:
    t = FLOAT_TYPES[dtype]
    return AotVariant(
        name=f"ipcv_ts_keys_{t}",
        kernel=_ts_keys,
        signature={
            "h_prev": f"*{t}",
            "h_cur": f"*{t}",
            "ws": "*i32",
            "batch": "i32",
            "tokens": "i32",
            "width": "i32",
            "num_keep": "i32",
            "num_prefix": "i32",
        },
        constexprs={"block_n": KEYS_BLOCK_N, "block_d": KEYS_BLOCK_D},
        num_warps=4,
    )


#: Every kernel specialisation the TensorRT plugin launches, in the order of the launch sequence.
AOT_VARIANTS: tuple[AotVariant, ...] = (
    *(_keys_variant(dtype) for dtype in FLOAT_TYPES),
    AotVariant(
        name="ipcv_ts_hist",
        kernel=_ts_hist,
        signature={"ws": "*i32", "batch": "i32", "tokens": "i32", "shift": "i32"},
        constexprs={"block_n": BLOCK_N},
        num_warps=4,
    ),
    AotVariant(
        name="ipcv_ts_pick",
        kernel=_ts_pick,
        signature={"ws": "*i32", "batch": "i32", "tokens": "i32", "shift": "i32"},
        num_warps=1,
    ),
    AotVariant(
        name="ipcv_ts_count",
        kernel=_ts_count,
        signature={"ws": "*i32", "batch": "i32", "tokens": "i32"},
        constexprs={"block_n": BLOCK_N},
        num_warps=4,
    ),
    AotVariant(
        name="ipcv_ts_write",
        kernel=_ts_write,
        signature={
            "ws": "*i32",
            "keep_idx": "*i64",
            "drop_idx": "*i64",
            "batch": "i32",
            "tokens": "i32",
            "num_keep": "i32",
        },
        constexprs={"block_n": BLOCK_N, "chunk_t": CHUNK_T},
        num_warps=4,
    ),
)
