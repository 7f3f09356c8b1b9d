"""The CUDA kernels: compiled with nvcc (sm_90), argument checks through the C API, and
kernel-vs-reference on a GPU when there is one. The plugin C++ compiles against TensorRT's
headers where ``IPCV_TRT_INCLUDE`` names them."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ipcv_deploy.compression import gather_tokens
from ipcv_deploy.ops import neighbor_index, neighbor_reconstruct, token_select
from ipcv_deploy.trt.kernels import (
    PLUGIN_DIR,
    CudaKernels,
    build_kernel_library,
    cuda_include_dir,
    find_nvcc,
)
from tests.cases import duplicated_kept_rows, tie_inputs
from tests.parity import assert_close, assert_same_indices

try:
    NVCC = find_nvcc()
except Exception:  # the reason is printed by the skip
    NVCC = None
HAS_GPU = torch.cuda.is_available()
TRT_INCLUDE = os.environ.get("IPCV_TRT_INCLUDE")


@pytest.fixture(scope="session")
def kernel_library(tmp_path_factory) -> Path:
    if NVCC is None:
        pytest.skip("nvcc not found: cannot compile the ipcv kernels on this machine")
    return build_kernel_library(tmp_path_factory.mktemp("kernels"), archs=("sm_90",))


def test_kernels_compile_for_sm90_and_export_the_c_api(kernel_library):
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(kernel_library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("ipcv_token_select", "ipcv_neighbor_index", "ipcv_neighbor_reconstruct"):
        assert f" T {name}" in symbols


def test_launchers_reject_bad_sizes_before_touching_the_gpu(kernel_library):
    lib = CudaKernels(kernel_library).lib
    null = ctypes.c_void_p(0)
    # num_keep > tokens, num_prefix > num_keep, tokens above the shared-memory limit
    assert lib.ipcv_token_select(null, null, 0, 1, 10, 4, 11, 0, null, null, null, null) != 0
    assert lib.ipcv_token_select(null, null, 0, 1, 10, 4, 3, 4, null, null, null, null) != 0
    assert lib.ipcv_token_select(null, null, 0, 1, 50000, 4, 10, 0, null, null, null, null) != 0
    # k > kept, kept + width over the limit
    assert lib.ipcv_neighbor_index(null, null, 0, 1, 5, 3, 8, 6, null, null, null) != 0
    assert lib.ipcv_neighbor_index(null, null, 0, 1, 9000, 3, 4000, 6, null, null, null) != 0
    # empty batches are no-ops
    assert lib.ipcv_token_select(null, null, 0, 0, 10, 4, 5, 0, null, null, null, null) == 0
    assert lib.ipcv_token_select_workspace(2, 100) == 800


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU: kernel-vs-reference needs one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("tokens", "keep", "prefix"), [(1025, 359, 1), (1024, 358, 0), (5000, 4000, 0)]
)
def test_kernels_equal_the_pytorch_ops(kernel_library, dtype, tokens, keep, prefix):
    kernels = CudaKernels(kernel_library)
    gen = torch.Generator().manual_seed(tokens)
    h_prev, h_cur = (torch.randn(2, tokens, 64, generator=gen).to(dtype) for _ in range(2))
    want_keep, want_drop = token_select(h_prev, h_cur, keep, prefix)
    keep_idx, drop_idx = kernels.token_select(h_prev.cuda(), h_cur.cuda(), keep, prefix)
    assert_same_indices(keep_idx.cpu(), want_keep, "keep_idx")  # > 3840 kept: no TopK limit
    assert_same_indices(drop_idx.cpu(), want_drop, "drop_idx")
    x0_keep, x0_drop = gather_tokens(h_cur, want_keep), gather_tokens(h_cur, want_drop)
    nbr = kernels.neighbor_index(x0_keep.cuda(), x0_drop.cuda(), 10).cpu()
    want_nbr = neighbor_index(x0_keep, x0_drop, 10)
    assert_same_indices(nbr.sort(-1).values, want_nbr.sort(-1).values, "neighbour sets")
    x_keep = (x0_keep.float() * 1.2 + 0.1).to(dtype)
    args = (x_keep, x0_keep, x0_drop, want_nbr, want_keep, want_drop)
    full = kernels.neighbor_reconstruct(*(a.cuda() for a in args)).cpu()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(full.float(), neighbor_reconstruct(*args).float(), rtol=rtol)


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU: kernel-vs-reference needs one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("keep", "prefix", "k"), [(1, 0, 1), (11, 1, 3), (20, 3, 12)])
def test_kernels_follow_the_ranking_rule(kernel_library, dtype, keep, prefix, k):
    """Repeated scores, duplicated kept rows and NaN: lower index first, exactly as the ops."""
    kernels = CudaKernels(kernel_library)
    h_prev, h_cur = (t.to(dtype) for t in tie_inputs())
    keep_idx, drop_idx = kernels.token_select(h_prev.cuda(), h_cur.cuda(), keep, prefix)
    want_keep, want_drop = token_select(h_prev, h_cur, keep, prefix)
    assert_same_indices(keep_idx.cpu(), want_keep, "keep_idx")
    assert_same_indices(drop_idx.cpu(), want_drop, "drop_idx")
    x_keep, x_drop = (t.to(dtype) for t in duplicated_kept_rows())
    nbr = kernels.neighbor_index(x_keep.cuda(), x_drop.cuda(), k).cpu()
    assert_same_indices(nbr, neighbor_index(x_keep, x_drop, k), "nbr (order included)")


@pytest.mark.skipif(
    not (TRT_INCLUDE and shutil.which("g++")),
    reason="set IPCV_TRT_INCLUDE to TensorRT's include/ to compile the plugin C++",
)
def test_plugin_cpp_compiles_against_tensorrt_headers(tmp_path):
    cuda_include = cuda_include_dir()
    assert cuda_include, "the CUDA headers are needed too (set CUDA_HOME)"
    obj = tmp_path / "ipcv_plugins.o"
    subprocess.run(
        [
            "g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-deprecated-declarations",
            "-fPIC", "-c", "-isystem", TRT_INCLUDE, f"-I{cuda_include}",
            f"-I{PLUGIN_DIR / 'include'}", str(PLUGIN_DIR / "src" / "ipcv_plugins.cpp"),
            "-o", str(obj),
        ],
        check=True,
    )  # fmt: skip
    symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    assert " T getCreators" in symbols and " T setLoggerFinder" in symbols
