"""The plugin library's kernels: Triton AOT-compiled for sm_87/89/90/110 without a GPU, the
driver-API launchers built with g++ (argument checks and the no-driver path run here), parity
with the reference ops on a GPU, and the plugin C++ against TensorRT's headers where
``IPCV_TRT_INCLUDE`` names them."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ipcv_deploy.errors import ConfigError
from ipcv_deploy.kernels import aot
from ipcv_deploy.kernels.token_select import token_select_workspace_bytes
from ipcv_deploy.ops.specs import KERNEL_MAX_NEIGHBORS
from ipcv_deploy.trt.kernels import (
    IPCV_ERROR_INVALID_VALUE,
    IPCV_ERROR_NO_DRIVER,
    PLUGIN_DIR,
    KernelLibrary,
    build_kernel_library,
    cuda_header_dir,
)
from tests.cases import duplicated_kept_rows, tie_inputs
from tests.parity import assert_close, assert_same_indices

HAS_GPU = torch.cuda.is_available()
TRT_INCLUDE = os.environ.get("IPCV_TRT_INCLUDE")
C_API = (
    "ipcv_neighbor_index",
    "ipcv_neighbor_index_workspace",
    "ipcv_neighbor_reconstruct",
    "ipcv_status_string",
    "ipcv_token_select",
    "ipcv_token_select_workspace",
)
NULL = ctypes.c_void_p(0)
EM_CUDA = 190  # ELF e_machine of a cubin


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def aot_build(tmp_path_factory) -> tuple[Path, dict]:
    """Every variant for the four default archs, compiled once per session (Triton's cache
    makes later sessions fast; a cold compile takes minutes on 2 cores)."""
    if shutil.which(os.environ.get("CXX") or "g++") is None:
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("aot")
    return out, aot.compile_kernels(out, jobs=min(4, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def library(aot_build, tmp_path_factory) -> KernelLibrary:
    out = tmp_path_factory.mktemp("lib")
    return KernelLibrary(build_kernel_library(out, aot_dir=aot_build[0]))


def test_every_variant_has_a_cubin_and_ptx_per_arch(aot_build):
    out, summary = aot_build
    variants = aot.load_variants()
    assert summary["archs"] == list(aot.DEFAULT_ARCHS)
    assert {(im["name"], im["arch"]) for im in summary["images"]} == {
        (v.name, arch) for v in variants for arch in aot.DEFAULT_ARCHS
    }
    for im in summary["images"]:
        cubin = (out / f"sm_{im['arch']}" / f"{im['name']}.cubin").read_bytes()
        ptx = (out / f"sm_{im['arch']}" / f"{im['name']}.ptx").read_text()
        assert cubin[:4] == b"\x7fELF" and int.from_bytes(cubin[18:20], "little") == EM_CUDA
        targets = re.findall(r"^\.target\s+(\w+)", ptx, flags=re.MULTILINE)
        # sm_90 and sm_110 use arch-specific ("a") targets, so only sm_87/89 PTX is portable
        assert targets == [f"sm_{im['arch']}" + ("a" if im["arch"] >= 90 else "")]
        assert im["ptx_portable"] == (im["arch"] < 90)
        assert f".entry {im['function']}(" in ptx
        assert im["num_warps"] >= 1 and im["shared"] >= 0
        # CUDA 12 ptxas below Blackwell: those cubins load on CUDA 12 drivers
        assert im["ptxas"].startswith("12." if im["arch"] < 100 else "13."), im
    header = (out / aot.HEADER_NAME).read_text()
    for v in variants:
        assert f"  {v.name},\n" in header


def test_generated_source_is_deterministic(aot_build, tmp_path):
    out, summary = aot_build
    again = aot.compile_kernels(tmp_path, jobs=1)
    assert again["files"] == summary["files"]
    for name in summary["files"]:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_bad_arch_fails_before_writing_anything(tmp_path):
    with pytest.raises(ConfigError, match="compute capabilities"):
        aot.compile_kernels(tmp_path / "out", archs=(70,))
    assert not (tmp_path / "out").exists()


def test_cli_prints_a_progress_line_per_arch_and_json(aot_build, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ipcv_deploy.kernels.aot", "--out", str(tmp_path), "--arch", "89",
         "--json", "--jobs", "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert re.search(r"^aot: sm_89: \d+ kernels compiled$", proc.stderr, flags=re.MULTILINE)
    assert '"archs": [\n    89\n  ]' in proc.stdout
    assert not list(tmp_path.glob(".aot-*")), "staging directory left behind"


def test_library_builds_with_gxx_and_exports_only_the_c_api(library):
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", library.lib._name],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    exported = sorted(line.split()[-1] for line in symbols.splitlines() if " T " in line)
    assert exported == sorted(C_API)


def test_launchers_reject_bad_sizes_before_touching_the_driver(library):
    lib = library.lib
    bad = IPCV_ERROR_INVALID_VALUE  # not IPCV_ERROR_NO_DRIVER: checked before dlopen
    # num_keep > tokens, num_prefix > num_keep, B*N*D over the i32 limit, unknown dtype
    assert lib.ipcv_token_select(NULL, NULL, 0, 1, 10, 4, 11, 0, NULL, NULL, NULL, NULL) == bad
    assert lib.ipcv_token_select(NULL, NULL, 0, 1, 10, 4, 3, 4, NULL, NULL, NULL, NULL) == bad
    big = 2**20  # 2 x 2^20 x 2^10 elements
    assert lib.ipcv_token_select(NULL, NULL, 0, 2, big, 1024, 5, 0, NULL, NULL, NULL, NULL) == bad
    assert lib.ipcv_token_select(NULL, NULL, 7, 1, 10, 4, 5, 0, NULL, NULL, NULL, NULL) == bad
    # k > kept, k above the compiled maximum (32)
    assert lib.ipcv_neighbor_index(NULL, NULL, 0, 1, 5, 3, 8, 6, NULL, NULL, NULL) == bad
    assert lib.ipcv_neighbor_index(NULL, NULL, 0, 1, 100, 3, 8, 33, NULL, NULL, NULL) == bad
    # pruned tokens without neighbours, negative sizes
    assert lib.ipcv_neighbor_reconstruct(
        NULL, NULL, NULL, NULL, NULL, NULL, 0, 1, 5, 3, 8, 0, NULL, NULL
    ) == bad  # fmt: skip
    assert lib.ipcv_neighbor_reconstruct(
        NULL, NULL, NULL, NULL, NULL, NULL, 0, -1, 5, 3, 8, 2, NULL, NULL
    ) == bad  # fmt: skip
    # empty work is a no-op that needs no driver either
    assert lib.ipcv_token_select(NULL, NULL, 0, 0, 10, 4, 5, 0, NULL, NULL, NULL, NULL) == 0
    assert lib.ipcv_neighbor_index(NULL, NULL, 0, 1, 5, 0, 8, 3, NULL, NULL, NULL) == 0
    assert "invalid argument" in library.status_string(bad)


@pytest.mark.parametrize(("batch", "tokens"), [(1, 1), (2, 1025), (8, 16384), (3, 100)])
def test_workspace_matches_the_triton_layout(library, batch, tokens):
    assert library.lib.ipcv_token_select_workspace(batch, tokens) == token_select_workspace_bytes(
        batch, tokens
    )
    assert library.lib.ipcv_neighbor_index_workspace(batch, tokens) == 0


@pytest.mark.skipif(_has_driver(), reason="a CUDA driver is installed: the no-driver path")
def test_valid_launch_without_a_driver_reports_no_driver(library):
    code = library.lib.ipcv_token_select(NULL, NULL, 0, 1, 10, 4, 5, 0, NULL, NULL, NULL, NULL)
    assert code == IPCV_ERROR_NO_DRIVER
    assert "no CUDA driver" in library.status_string(code)
    code = library.lib.ipcv_neighbor_reconstruct(
        NULL, NULL, NULL, NULL, NULL, NULL, 2, 1, 5, 3, 8, 2, NULL, NULL
    )
    assert code == IPCV_ERROR_NO_DRIVER


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU: launching the AOT kernels needs one")
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="TRITON_INTERPRET=1: set it to 0 to compare with the JIT-compiled kernels",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("tokens", "keep", "prefix", "k"), [(1025, 359, 1, 10), (1024, 1024, 0, 3), (5000, 4000, 0, 20)]
)
def test_c_library_equals_the_triton_jit_kernels(library, dtype, tokens, keep, prefix, k):
    """Same kernels, same arithmetic: the AOT launches reproduce the JIT path bit for bit."""
    from ipcv_deploy import kernels

    gen = torch.Generator().manual_seed(tokens)
    h_prev, h_cur = (torch.randn(2, tokens, 64, generator=gen).to(dtype).cuda() for _ in range(2))
    keep_idx, drop_idx = library.token_select(h_prev, h_cur, keep, prefix)
    want_keep, want_drop = kernels.token_select(h_prev, h_cur, keep, prefix)
    assert_same_indices(keep_idx.cpu(), want_keep.cpu(), "keep_idx")
    assert_same_indices(drop_idx.cpu(), want_drop.cpu(), "drop_idx")
    if keep == tokens:
        return
    x0_keep = torch.gather(h_cur, 1, want_keep[..., None].expand(-1, -1, 64))
    x0_drop = torch.gather(h_cur, 1, want_drop[..., None].expand(-1, -1, 64))
    nbr = library.neighbor_index(x0_keep, x0_drop, k)
    want_nbr = kernels.neighbor_index(x0_keep, x0_drop, k)
    assert_same_indices(nbr.cpu(), want_nbr.cpu(), "nbr")
    x_keep = (x0_keep.float() * 1.2 + 0.1).to(dtype)
    args = (x_keep, x0_keep, x0_drop, want_nbr, want_keep, want_drop)
    assert torch.equal(library.neighbor_reconstruct(*args), kernels.neighbor_reconstruct(*args))


@pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU: launching the AOT kernels needs one")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("keep", "prefix", "k"), [(1, 0, 1), (11, 1, 3), (20, 3, 12)])
def test_c_library_follows_the_reference_ranking_rule(library, dtype, keep, prefix, k):
    """Repeated scores, duplicated kept rows and NaN: exactly the reference ops' results."""
    from ipcv_deploy.ops import neighbor_index, neighbor_reconstruct, token_select

    h_prev, h_cur = (t.to(dtype) for t in tie_inputs())
    keep_idx, drop_idx = library.token_select(h_prev.cuda(), h_cur.cuda(), keep, prefix)
    want_keep, want_drop = token_select(h_prev, h_cur, keep, prefix)
    assert_same_indices(keep_idx.cpu(), want_keep, "keep_idx")
    assert_same_indices(drop_idx.cpu(), want_drop, "drop_idx")
    x_keep, x_drop = (t.to(dtype) for t in duplicated_kept_rows())
    nbr = library.neighbor_index(x_keep.cuda(), x_drop.cuda(), k).cpu()
    assert_same_indices(nbr, neighbor_index(x_keep, x_drop, k), "nbr (order included)")
    batch, kept, _ = x_keep.shape
    perm = torch.randperm(kept + x_drop.shape[1], generator=torch.Generator().manual_seed(1))
    keep_i = perm[:kept].sort().values.expand(batch, -1).contiguous()
    drop_i = perm[kept:].sort().values.expand(batch, -1).contiguous()
    args = ((x_keep.float() * 1.5).to(dtype), x_keep, x_drop, nbr, keep_i, drop_i)
    full = library.neighbor_reconstruct(*(a.cuda() for a in args)).cpu()
    rtol = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close(full.float(), neighbor_reconstruct(*args).float(), rtol=rtol)


@pytest.mark.skipif(
    not (TRT_INCLUDE and shutil.which("g++")),
    reason="set IPCV_TRT_INCLUDE to TensorRT's include/ to compile the plugin C++",
)
def test_plugin_library_builds_against_tensorrt_headers(aot_build, tmp_path):
    out, _ = aot_build
    library = tmp_path / "libipcv_trt_plugins.so"
    subprocess.run(
        [
            "g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
            "-Wno-deprecated-declarations", "-fPIC", "-shared", "-fvisibility=hidden",
            "-isystem", TRT_INCLUDE, "-isystem", str(cuda_header_dir()),
            f"-I{PLUGIN_DIR / 'include'}", f"-I{PLUGIN_DIR / 'src'}", f"-I{out}",
            str(PLUGIN_DIR / "src" / "ipcv_plugins.cpp"),
            str(PLUGIN_DIR / "src" / "ipcv_kernels.cpp"),
            str(PLUGIN_DIR / "src" / "aot_launcher.cpp"),
            str(out / aot.SOURCE_NAME), "-ldl", "-o", str(library),
        ],
        check=True,
    )  # fmt: skip
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert " T getCreators" in symbols and " T setLoggerFinder" in symbols
    assert " T ipcv_token_select" in symbols


def test_the_k_limit_is_one_number_in_python_and_cpp():
    header = (PLUGIN_DIR / "include" / "ipcv_kernels.h").read_text()
    assert re.search(r"#define IPCV_MAX_NEIGHBORS (\d+)", header).group(1) == str(
        KERNEL_MAX_NEIGHBORS
    )
