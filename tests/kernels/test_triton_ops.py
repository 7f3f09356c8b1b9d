"""The Triton kernels of the ``ipcv`` ops against the reference ops, ties and NaN included.

Runs on CPU tensors under Triton's interpreter (``tests/kernels/conftest.py``); with
``TRITON_INTERPRET=0`` on a CUDA machine the same comparisons run on the GPU.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

from ipcv_deploy import ops
from ipcv_deploy.errors import BackendUnavailableError, InputError
from ipcv_deploy.kernels import (
    AOT_VARIANTS,
    neighbor_index,
    neighbor_reconstruct,
    token_select,
)
from ipcv_deploy.kernels.checks import INTERPRETED
from ipcv_deploy.kernels.neighbors import MAX_NEIGHBORS, near_tie_tolerance
from tests.cases import duplicated_kept_rows, tie_inputs
from tests.parity import assert_close, assert_same_indices

DEVICE = "cpu" if INTERPRETED else "cuda"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
LOW_RTOL = 1e-2  # fp16/bf16 outputs: one rounding of the fp32 result


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _on(*tensors: torch.Tensor, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    return [t.to(device=DEVICE, dtype=dtype or t.dtype) for t in tensors]


def _check_token_select(h_prev: torch.Tensor, h_cur: torch.Tensor, keep: int, prefix: int):
    expected = ops.token_select(h_prev, h_cur, keep, prefix)
    keep_idx, drop_idx = token_select(*_on(h_prev, h_cur), keep, prefix)
    assert_same_indices(keep_idx.cpu(), expected[0], "keep_idx")
    assert_same_indices(drop_idx.cpu(), expected[1], "drop_idx")


@pytest.mark.parametrize(
    ("batch", "tokens", "width", "keep", "prefix", "dtype"),
    [
        (1, 1024, 16, 358, 0, torch.float32),
        (3, 1025, 8, 359, 1, torch.float32),
        (2, 300, 24, 105, 3, torch.float16),
        (2, 300, 72, 105, 1, torch.bfloat16),  # width over two chunks
        (2, 50, 8, 50, 0, torch.float32),  # keep all: no pruned token
        (2, 50, 8, 3, 3, torch.float32),  # keep only the prefix
        (1, 50, 8, 1, 0, torch.float16),
    ],
)
def test_token_select_matches_reference(batch, tokens, width, keep, prefix, dtype):
    g = _gen(tokens + keep)
    h_prev = torch.randn(batch, tokens, width, generator=g).to(dtype)
    h_cur = torch.randn(batch, tokens, width, generator=g).to(dtype)
    _check_token_select(h_prev, h_cur, keep, prefix)


def test_token_select_many_tokens():
    """16384+ tokens (Qwen2-VL at high resolution): several tiles of every kernel."""
    g = _gen(1)
    h_prev = torch.randn(1, 16500, 8, generator=g)
    h_cur = h_prev + torch.randn(1, 16500, 8, generator=g)
    _check_token_select(h_prev, h_cur, 5775, 1)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("keep", "prefix"), [(13, 0), (13, 1), (14, 3), (40, 3), (3, 3)])
def test_token_select_ties_and_nan(dtype, keep, prefix):
    """Integer-valued streams: exactly equal scores go to the lower index, NaN ranks last."""
    h_prev, h_cur = tie_inputs()
    _check_token_select(h_prev.to(dtype), h_cur.to(dtype), keep, prefix)


def test_token_select_keeps_nan_scores_in_index_order():
    """More kept than finite scores: the NaN-scored tokens fill up from the lowest index."""
    h_prev, h_cur = tie_inputs(batch=3, tokens=300)
    h_cur[:, 1::2, 3] = float("nan")
    _check_token_select(h_prev, h_cur, 200, 1)


def _reference_distances(x_keep: torch.Tensor, x_drop: torch.Tensor) -> torch.Tensor:
    a, b = x_drop.float(), x_keep.float()
    dist = (
        a.square().sum(-1, keepdim=True)
        + b.square().sum(-1).unsqueeze(1)
        - 2.0 * torch.bmm(a, b.transpose(1, 2))
    )
    return torch.where(dist.isnan(), float("inf"), dist)


def _check_near_ties(x_keep: torch.Tensor, x_drop: torch.Tensor, k: int) -> None:
    """Equal to the reference, except where the reference distances are within the near-tie
    tolerance of each other (the rule of ``ipcv_deploy.kernels.neighbors``)."""
    expected = ops.neighbor_index(x_keep, x_drop, k)
    actual = neighbor_index(*_on(x_keep, x_drop), k).cpu()
    assert actual.shape == expected.shape and actual.dtype == torch.int64
    assert (actual.sort(-1).values.diff(dim=-1) > 0).all(), "a neighbour is repeated"
    dist = _reference_distances(x_keep, x_drop)
    gap = (dist.gather(-1, actual) - dist.gather(-1, expected)).abs()
    tol = near_tie_tolerance(x_keep, x_drop).unsqueeze(-1).expand_as(gap)
    differ = actual != expected
    assert (gap[differ] <= tol[differ]).all(), (
        f"neighbours differ beyond the near-tie tolerance at {differ.nonzero()[:5].tolist()}"
    )


@pytest.mark.parametrize(
    ("batch", "kept", "pruned", "width", "k", "dtype"),
    [
        (1, 360, 650, 32, 10, torch.float32),
        (3, 40, 70, 16, 1, torch.float16),
        (2, 40, 70, 48, 16, torch.float32),  # largest k of the 16-wide selection
        (2, 40, 33, 8, 17, torch.bfloat16),  # smallest k of the 32-wide selection
        (2, 20, 30, 8, 20, torch.float32),  # k == kept
        (1, 100, 5, 40, MAX_NEIGHBORS, torch.float32),
    ],
)
def test_neighbor_index_matches_reference(batch, kept, pruned, width, k, dtype):
    g = _gen(kept + pruned)
    x_keep = torch.randn(batch, kept, width, generator=g).to(dtype)
    x_drop = torch.randn(batch, pruned, width, generator=g).to(dtype)
    _check_near_ties(x_keep, x_drop, k)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [1, 3, 12])
def test_neighbor_index_exact_ties_and_nan(dtype, k):
    """Duplicated kept rows: equal distances in index order; NaN distances last."""
    x_keep, x_drop = duplicated_kept_rows()
    expected = ops.neighbor_index(x_keep, x_drop, k)
    actual = neighbor_index(*_on(x_keep, x_drop, dtype=dtype), k)
    assert_same_indices(actual.cpu(), expected, "nbr")


def test_neighbor_index_ties_across_tiles():
    """Few distinct small integers: exact ties everywhere, spread over several kept tiles."""
    g = _gen(3)
    x_keep = torch.randint(-2, 3, (2, 150, 4), generator=g).float()
    x_drop = torch.randint(-2, 3, (2, 90, 4), generator=g).float()
    x_keep[0, 140] = float("nan")
    expected = ops.neighbor_index(x_keep, x_drop, 12)
    assert_same_indices(neighbor_index(*_on(x_keep, x_drop), 12).cpu(), expected, "nbr")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(("batch", "tokens", "keep", "k"), [(1, 64, 23, 1), (3, 101, 36, 10)])
def test_neighbor_reconstruct_matches_reference(dtype, batch, tokens, keep, k):
    g = _gen(tokens)
    width = 80  # two width chunks
    h_prev = torch.randn(batch, tokens, width, generator=g)
    h_cur = torch.randn(batch, tokens, width, generator=g)
    keep_idx, drop_idx = ops.token_select(h_prev, h_cur, keep, 1)
    x0_keep = torch.randn(batch, keep, width, generator=g).to(dtype)
    x0_drop = torch.randn(batch, tokens - keep, width, generator=g).to(dtype)
    x_keep = (x0_keep.float() + 0.1 * torch.randn(batch, keep, width, generator=g)).to(dtype)
    nbr = ops.neighbor_index(x0_keep, x0_drop, k)
    args = (x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx)
    expected = ops.neighbor_reconstruct(*args)
    actual = neighbor_reconstruct(*_on(*args)).cpu()
    assert_close(actual, expected, **({} if dtype == torch.float32 else {"rtol": LOW_RTOL}))


def test_neighbor_reconstruct_k_equals_kept():
    g = _gen(7)
    x_keep, x0_keep = torch.randn(2, 2, 5, 16, generator=g)
    x0_drop = torch.randn(2, 9, 16, generator=g)
    keep_idx, drop_idx = ops.token_select(
        torch.randn(2, 14, 4, generator=g), torch.zeros(2, 14, 4), 5
    )
    nbr = ops.neighbor_index(x0_keep, x0_drop, 5)
    args = (x_keep, x0_keep, x0_drop, nbr, keep_idx, drop_idx)
    assert_close(neighbor_reconstruct(*_on(*args)).cpu(), ops.neighbor_reconstruct(*args))


def _floats(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


def _ints(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: token_select(_floats(2, 8), _floats(2, 8), 3), "want 3 dimensions"),
        (lambda: token_select(_floats(1, 8, 4), _floats(1, 9, 4), 3), "differ"),
        (
            lambda: token_select(_floats(1, 8, 4), _floats(1, 8, 4, dtype=torch.float16), 3),
            "cast them to one",
        ),
        (lambda: token_select(_ints(1, 8, 4), _ints(1, 8, 4), 3), "use float32, float16"),
        (lambda: token_select(_floats(1, 8, 4), _floats(1, 8, 4), 0), "1 <= num_keep <= N"),
        (lambda: token_select(_floats(1, 8, 4), _floats(1, 8, 4), 9), "1 <= num_keep <= N"),
        (lambda: token_select(_floats(1, 8, 4), _floats(1, 8, 4), 3, 4), "num_prefix <="),
        (lambda: neighbor_index(_floats(1, 4, 8), _floats(1, 6, 8), 5), "min(P, 32)"),
        (lambda: neighbor_index(_floats(1, 40, 8), _floats(1, 6, 8), 33), "min(P, 32)"),
        (lambda: neighbor_index(_floats(1, 4, 8), _floats(1, 6, 7), 2), "widths disagree"),
        (lambda: neighbor_index(_floats(2, 4, 8), _floats(1, 6, 8), 2), "batch sizes disagree"),
        (
            lambda: neighbor_reconstruct(
                _floats(1, 4, 8), _floats(1, 4, 8), _floats(1, 6, 8), _ints(1, 6, 2),
                _ints(1, 4), _floats(1, 6),
            ),
            "drop_idx is torch.float32",
        ),
        (
            lambda: neighbor_reconstruct(
                _floats(1, 4, 8), _floats(1, 4, 8), _floats(1, 5, 8), _ints(1, 6, 2),
                _ints(1, 4), _ints(1, 6),
            ),
            "pruned counts disagree",
        ),
        (
            lambda: neighbor_reconstruct(
                _floats(1, 4, 8), _floats(1, 3, 8), _floats(1, 6, 8), _ints(1, 6, 2),
                _ints(1, 4), _ints(1, 6),
            ),
            "x0_keep (1, 3, 8) != x_keep",
        ),
    ],
)  # fmt: skip
def test_bad_inputs_raise_input_error(call, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(sys.modules["ipcv_deploy.kernels.checks"], "INTERPRETED", False)
    h = torch.zeros(1, 8, 4)
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        token_select(h, h, 3)


def test_aot_variants_match_the_kernel_signatures():
    """The plugin launches each variant with the arguments named in its signature, in order."""
    names = [v.name for v in AOT_VARIANTS]
    assert len(set(names)) == len(names)
    for variant in AOT_VARIANTS:
        params = list(inspect.signature(variant.kernel.fn).parameters)
        runtime = [p for p in params if p not in variant.constexprs]
        assert list(variant.signature) == runtime, variant.name
        assert set(variant.constexprs) <= set(params), variant.name
        floats = {t for t in variant.signature.values() if t in ("*fp32", "*fp16", "*bf16")}
        assert len(floats) <= 1, variant.name
        if floats:
            assert variant.name.split("_")[3] == floats.pop()[1:], variant.name
    for stem in ("ipcv_ts_keys", "ipcv_nb_index", "ipcv_nb_reconstruct"):
        for dtype in ("fp32", "fp16", "bf16"):
            assert any(n.startswith(f"{stem}_{dtype}") for n in names), (stem, dtype)
