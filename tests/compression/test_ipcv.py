"""IPCV semantics on real tiny transformers towers: keep 1.0 == dense, NGR exact at K,
kept-query AS == full-query AS, per_image == global on one image, batch == per-image loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ipcv_deploy import IPCVConfig, apply_ipcv, remove_ipcv
from ipcv_deploy.compression import TokenSet, build_prune_state, gather_tokens, ipcv_encode
from tests.conftest import TINY, Tiny, make_tiny
from tests.parity import assert_close, assert_same_indices


def _ref(tiny: Tiny, **changes) -> IPCVConfig:
    return dataclasses.replace(tiny.loaded.adapter.reference_ipcv(), **changes)


def _encode(tiny: Tiny, config: IPCVConfig):
    with torch.no_grad():
        return ipcv_encode(tiny.adapter, config, *tiny.args, **tiny.kwargs)


@pytest.mark.parametrize("selection", ["per_image", "global"])
@pytest.mark.parametrize(("prune_layer", "as_layers"), [(2, 0), (3, 2), (5, None)])
def test_keep_ratio_one_equals_dense(tiny, selection, prune_layer, as_layers):
    dense = tiny.dense()
    if as_layers is None:  # every block after K an AS block
        as_layers = tiny.adapter.depth - prune_layer
    config = _ref(
        tiny, keep_ratio=1.0, prune_layer=prune_layer, as_layers=as_layers, selection=selection
    )
    apply_ipcv(tiny.loaded.vision, config)
    assert_close(tiny.dense(), dense)


def test_reference_config_keeps_shapes_and_changes_output(tiny):
    dense = tiny.dense()
    apply_ipcv(tiny.loaded.vision)
    compressed = tiny.dense()
    assert compressed.shape == dense.shape
    assert not torch.allclose(compressed, dense, atol=1e-3)  # tokens really were pruned
    cosine = torch.nn.functional.cosine_similarity(
        compressed.flatten(0, -2), dense.flatten(0, -2)
    ).mean()
    assert cosine > 0.8
    remove_ipcv(tiny.loaded.vision)
    assert_close(tiny.dense(), dense)


def test_kept_counts_follow_the_config(tiny):
    config = _ref(tiny)
    state = _encode(tiny, config).state
    n = tiny.adapter.encoder_shape(tiny.loaded.image_size).tokens
    p = config.kept_count(n, tiny.adapter.num_prefix_tokens)
    assert state.kept.lengths == (p, p)
    assert state.keep_idx.shape[0] == 1  # the eager path packs every image in one row
    keep, drop = state.keep_idx[0].tolist(), state.drop_idx[0].tolist()
    assert keep == sorted(keep) and drop == sorted(drop)
    assert sorted(keep + drop) == list(range(2 * n))


def test_internvl_cls_always_kept():
    tiny = make_tiny("tiny-internvl", batch=3)
    for keep_ratio in (0.05, 0.35):
        state = _encode(tiny, _ref(tiny, keep_ratio=keep_ratio)).state
        n = 1 + (112 // 14) ** 2
        assert set(range(0, 3 * n, n)) <= set(state.keep_idx[0].tolist())
        assert state.kept.lengths == (1 + max(1, int((n - 1) * keep_ratio)),) * 3


def _state_at_k(tiny: Tiny, config: IPCVConfig):
    adapter = tiny.adapter
    enc = adapter.embed(*tiny.args, **tiny.kwargs)
    everything = TokenSet(enc.segments)
    x = enc.tokens
    for i in range(config.prune_layer - 1):
        x = adapter.block(i, x, enc, everything)
    h_cur = adapter.block(config.prune_layer - 1, x, enc, everything)
    state = build_prune_state(
        x, h_cur, enc.segments, config, adapter.num_prefix_tokens, adapter.global_topk_spans_call
    )
    return enc, h_cur, state


@pytest.mark.parametrize("selection", ["per_image", "global"])
def test_ngr_exact_at_k_on_real_hidden_states(tiny, selection):
    config = _ref(tiny, selection=selection)
    with torch.no_grad():
        _, h_cur, state = _state_at_k(tiny, config)
        assert torch.equal(state.reconstruct(gather_tokens(h_cur, state.keep_idx)), h_cur)


@pytest.mark.parametrize("selection", ["per_image", "global"])
def test_kept_query_as_equals_full_query_as(tiny, selection):
    """The reference runs the AS block on all N rows and keeps the kept rows; MLP is row-wise,
    so that is the dense block on the reconstruction, then a gather."""
    config = _ref(tiny, selection=selection)
    with torch.no_grad():
        enc, h_cur, state = _state_at_k(tiny, config)
        drifted = gather_tokens(h_cur, state.keep_idx) * 1.1 + 0.05  # kept tokens after some blocks
        full = state.reconstruct(drifted)
        index = config.prune_layer
        tiny.adapter.prepare(config)
        try:
            kept_query = tiny.adapter.stabilized_block(index, full, enc, state.kept)
        finally:
            tiny.adapter.release()
        everything = TokenSet(enc.segments)
        full_query = gather_tokens(tiny.adapter.block(index, full, enc, everything), state.keep_idx)
    assert_close(kept_query, full_query, what="AS block")


def test_per_image_equals_global_on_one_image(tiny):
    one = make_tiny(tiny.loaded.name, batch=1)
    per_image = _encode(one, _ref(one, selection="per_image"))
    global_ = _encode(one, _ref(one, selection="global"))
    assert_same_indices(per_image.state.keep_idx, global_.state.keep_idx)
    assert_close(one.adapter.features(per_image.output), one.adapter.features(global_.output))


def test_batch_equals_per_image_loop(tiny):
    config = _ref(tiny)
    batched = _encode(tiny, config)
    singles, keeps = [], []
    for i in range(2):
        args, kwargs = _slice_inputs(tiny, i)
        with torch.no_grad():
            result = ipcv_encode(tiny.adapter, config, *args, **kwargs)
        singles.append(tiny.adapter.features(result.output))
        keeps.append(result.state.keep_idx + i * _tokens(tiny))
    assert_close(tiny.adapter.features(batched.output), torch.cat(singles), what="batched vs loop")
    assert_same_indices(batched.state.keep_idx, torch.cat(keeps, dim=1), "keep_idx")


def _tokens(tiny: Tiny) -> int:
    return tiny.adapter.encoder_shape(tiny.loaded.image_size).tokens


def _slice_inputs(tiny: Tiny, i: int):
    """Image ``i`` of a batch of two, in the family's input layout."""
    if "grid_thw" in tiny.kwargs:
        n = _tokens(tiny)
        return (tiny.args[0][i * n : (i + 1) * n],), {
            "grid_thw": tiny.kwargs["grid_thw"][i : i + 1]
        }
    return (tiny.args[0][i : i + 1],), {}


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_qwen_images_of_different_sizes_match_loop(name):
    """Also partial 112px windows (8x12 patches) for Qwen2.5-VL."""
    tiny = make_tiny(name, batch=1)
    gen = torch.Generator().manual_seed(5)
    grids = [(1, 16, 16), (1, 8, 12), (2, 4, 4)]  # two images and a two-frame video
    pixels = [torch.randn(t * h * w, 1176, generator=gen) for t, h, w in grids]
    config = _ref(tiny)
    with torch.no_grad():
        packed = ipcv_encode(tiny.adapter, config, torch.cat(pixels), grid_thw=torch.tensor(grids))
        loop = [
            ipcv_encode(tiny.adapter, config, px, grid_thw=torch.tensor([g])).output.pooler_output
            for px, g in zip(pixels, grids, strict=True)
        ]
    assert packed.state.kept.lengths == (89, 33, 5, 5)
    assert_close(packed.output.pooler_output, torch.cat(loop), what="packed vs loop")


def test_global_selection_counts_first_patch_in_its_own_image():
    """The reference's searchsorted(right=False) would count token 256 (first patch of image 2)
    in image 1; the kept count per image must put it in image 2."""
    segments = (256, 96)
    h_prev = torch.zeros(1, 352, 8)
    h_cur = torch.zeros(1, 352, 8)
    h_cur[0, 256] = 100.0  # image 2's first patch changes most
    h_cur[0, :10] = 50.0
    config = IPCVConfig(keep_ratio=11 / 352 + 1e-9, selection="global")
    state = build_prune_state(h_prev, h_cur, segments, config)
    assert 256 in state.keep_idx[0].tolist()
    assert state.kept.lengths == (10, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", TINY)
def test_half_precision_models_run_close_to_fp32(name, dtype):
    fp32 = make_tiny(name)
    half = make_tiny(name, dtype=dtype)
    config = _ref(fp32)
    with torch.no_grad():
        want = fp32.adapter.features(
            ipcv_encode(fp32.adapter, config, *fp32.args, **fp32.kwargs).output
        )
        got = half.adapter.features(
            ipcv_encode(half.adapter, config, *half.args, **half.kwargs).output
        )
    assert got.dtype == dtype and torch.isfinite(got).all()
    cosine = torch.nn.functional.cosine_similarity(got.float().flatten(0, -2), want.flatten(0, -2))
    assert cosine.mean() > 0.98
