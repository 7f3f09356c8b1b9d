"""Analytic FLOPs: the spec's Qwen2-VL-7B numbers, and a cross-check with torch's counter."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ipcv_deploy import IPCVConfig, apply_ipcv
from ipcv_deploy.bench.flops import flops_report
from ipcv_deploy.compression.cost import encoder_flops
from ipcv_deploy.models import load_model
from tests.conftest import TOWERS, make_tiny


def test_qwen2_vl_7b_share_is_near_41_percent():
    loaded = load_model("qwen2-vl-7b-vit", weights=False)
    report = flops_report(loaded.adapter(loaded.vision), (448, 448), IPCVConfig())
    share = report["share_of_dense"]
    assert report["tokens_per_image"] == 1024 and report["kept_per_image"] == 358
    assert share["ipcv"]["blocks"] == pytest.approx(0.413, abs=0.002)
    assert share["ipcv"]["total"] == pytest.approx(0.424, abs=0.003)
    assert share["ipcv_reference_form"]["blocks"] == pytest.approx(0.451, abs=0.002)
    flops = report["flops"]
    linear = flops["ipcv"]["linear"] / flops["dense"]["linear"]
    attention = flops["ipcv"]["attention"] / flops["dense"]["attention"]
    assert linear == pytest.approx(0.435, abs=0.002)  # spec section 8: ~43.5%
    assert attention == pytest.approx(0.25, abs=0.01)  # ~25%


def test_keep_all_without_as_costs_dense_plus_ops():
    loaded = load_model("internvit-300m", weights=False)
    shape = loaded.adapter(loaded.vision).encoder_shape((448, 448))
    dense = encoder_flops(shape)
    same = encoder_flops(shape, IPCVConfig(keep_ratio=1.0, as_layers=0, prune_layer=7))
    assert same.blocks == dense.blocks
    assert 0 < same.ipcv_ops < 0.001 * dense.total


def _counted(tiny) -> int:
    # The math backend decomposes attention into matmuls the counter sees; the fused CPU
    # kernel has no FLOP formula registered.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        tiny.loaded.vision(*tiny.args, **tiny.kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", TOWERS)
def test_analytic_flops_match_torch_flop_counter(name):
    tiny = make_tiny(name, batch=1)
    shape = tiny.adapter.encoder_shape(tiny.loaded.image_size)
    config = tiny.loaded.adapter.reference_ipcv()
    dense_counted = _counted(tiny)
    apply_ipcv(tiny.loaded.vision, config)
    ipcv_counted = _counted(tiny)
    dense, ipcv = encoder_flops(shape), encoder_flops(shape, config)
    # The dense tower runs every block; a family taking an earlier layer (LLaVA: -2) needs,
    # and the analytic count and IPCV run, only the blocks up to it.
    unused = sum(
        1 for _ in tiny.loaded.vision.modules() if type(_).__name__.endswith("EncoderLayer")
    )
    unused = max(0, unused - shape.depth)
    extra = (
        encoder_flops(dataclasses.replace(shape, depth=shape.depth + unused)).total - dense.total
    )
    assert dense.total + extra == pytest.approx(dense_counted, rel=0.01)
    assert ipcv.total == pytest.approx(ipcv_counted, rel=0.02)
