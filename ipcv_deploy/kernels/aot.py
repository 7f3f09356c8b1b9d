"""Ahead-of-time build of the Triton kernels for the TensorRT plugin library.

``compile_kernels`` compiles every ``AOT_VARIANTS`` entry of ``ipcv_deploy.kernels.token_select``
and ``ipcv_deploy.kernels.neighbors`` for each target architecture, with no GPU and no CUDA
driver (Triton's bundled CUDA 12.9 ``ptxas`` for sm < 100, so those cubins load on any CUDA 12
driver; its CUDA 13 ``ptxas-blackwell`` for sm >= 100, whose cubins need a CUDA 13 driver),
and writes::

    OUT/sm_XX/<variant>.cubin, OUT/sm_XX/<variant>.ptx   per architecture
    OUT/ipcv_kernels_aot.h, OUT/ipcv_kernels_aot.cpp     the images embedded as byte arrays

The generated C++ (namespace ``ipcv_aot``) holds one ``Kernel`` per variant, indexed by the
enum ``KernelId`` (the variant name), with one ``Image`` per architecture: kernel function
name, ``num_warps``, dynamic shared bytes, cubin and PTX. ``plugins/src/ipcv_kernels.cpp``
launches them through the CUDA driver API with Triton's argument layout: the non-constexpr
arguments in signature order, then the global- and profile-scratch pointers (both null: a
variant that needs scratch memory, clusters, PDL or a cooperative grid is rejected here).

``python -m ipcv_deploy.kernels.aot --out DIR [--arch 87 89 90 110] [--json]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ipcv_deploy.errors import ConfigError
from ipcv_deploy.kernels.variants import AotVariant

__all__ = [
    "DEFAULT_ARCHS",
    "HEADER_NAME",
    "SOURCE_NAME",
    "CompiledImage",
    "compile_kernels",
    "load_variants",
    "main",
]

#: Orin (87), Ada / L4 (89), Hopper / H100 / H200 (90), Thor (110, CUDA 13).
DEFAULT_ARCHS = (87, 89, 90, 110)
HEADER_NAME = "ipcv_kernels_aot.h"
SOURCE_NAME = "ipcv_kernels_aot.cpp"

#: Bytes of one kernel parameter of each Triton scalar type (pointers: 8).
_SCALAR_BYTES = {
    "i1": 1, "i8": 1, "u8": 1, "i16": 2, "u16": 2, "fp16": 2, "bf16": 2,
    "i32": 4, "u32": 4, "fp32": 4, "i64": 8, "u64": 8, "fp64": 8,
}  # fmt: skip
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class CompiledImage:
    """One variant compiled for one architecture."""

    name: str
    arch: int
    function: str
    num_warps: int
    shared: int
    cubin: bytes
    ptx: str
    ptx_target: str  # e.g. "sm_90a": an "a" target JIT-compiles on that exact GPU only
    ptxas: str  # ptxas release that built the cubin

    @property
    def ptx_portable(self) -> bool:
        """Whether the PTX JIT-compiles on later architectures too (no ``a`` suffix)."""
        return not self.ptx_target.endswith("a")


def load_variants() -> list[AotVariant]:
    """``ipcv_deploy.kernels.AOT_VARIANTS`` (both ops' modules, in table order), checked.

    Raises:
        ConfigError: a name is not a unique C identifier, or a signature does not list the
            kernel's non-constexpr arguments in order with known types.
    """
    from ipcv_deploy.kernels import AOT_VARIANTS

    variants = list(AOT_VARIANTS)
    seen: set[str] = set()
    for variant in variants:
        if not _IDENTIFIER.fullmatch(variant.name) or variant.name in seen:
            raise ConfigError(
                f"AOT variant name {variant.name!r} is not a unique C identifier; "
                "rename it in its kernels module"
            )
        seen.add(variant.name)
        _param_bytes(variant)
    return variants


def _param_bytes(variant: AotVariant) -> list[int]:
    """Size of each kernel parameter, after checking the signature covers the kernel's args."""
    args = list(variant.kernel.arg_names)
    runtime = [a for a in args if a not in variant.constexprs]
    if list(variant.signature) != runtime or not set(variant.constexprs) <= set(args):
        raise ConfigError(
            f"AOT variant {variant.name}: signature {list(variant.signature)} + constexprs "
            f"{sorted(variant.constexprs)} must list the kernel arguments {args} in order"
        )
    sizes = []
    for arg, ty in variant.signature.items():
        size = 8 if ty.startswith("*") else _SCALAR_BYTES.get(ty)
        if size is None:
            raise ConfigError(f"AOT variant {variant.name}: unsupported type {ty!r} of {arg}")
        sizes.append(size)
    return sizes


def _compile(variant: AotVariant, arch: int) -> CompiledImage:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    source = ASTSource(
        fn=variant.kernel, signature=dict(variant.signature), constexprs=dict(variant.constexprs)
    )
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope():
        # No line info: smaller images, and no source paths of the build machine in them.
        triton.knobs.compilation.disable_line_info = True
        if arch < 100:
            # Triton takes its CUDA 13 ptxas from sm_90 on; an sm_90 cubin from it would not
            # load on the CUDA 12 drivers most H100 / H200 hosts run.
            triton.knobs.nvidia.ptxas_blackwell = triton.knobs.nvidia.ptxas.path
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        ptxas = get_ptxas(arch).version
    meta = compiled.metadata
    unsupported = {
        "global scratch memory": meta.global_scratch_size > 0,
        "profile scratch memory": meta.profile_scratch_size > 0,
        "thread-block clusters": meta.num_ctas != 1,
        "programmatic dependent launch": bool(meta.launch_pdl),
        "a cooperative grid": bool(meta.launch_cooperative_grid),
    }
    needs = [what for what, used in unsupported.items() if used]
    if needs:
        raise ConfigError(
            f"AOT variant {variant.name} (sm_{arch}) needs {', '.join(needs)}, which the plugin "
            "launcher does not provide; change the kernel or its constexprs"
        )
    ptx = compiled.asm["ptx"]
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, flags=re.MULTILINE)
    return CompiledImage(
        name=variant.name,
        arch=arch,
        function=meta.name,
        num_warps=meta.num_warps,
        shared=meta.shared,
        cubin=compiled.asm["cubin"],
        ptx=ptx,
        ptx_target=target.group(1) if target else "",
        ptxas=ptxas,
    )


def _interpreted() -> bool:
    """Whether triton decorated the kernels for its CPU interpreter (``TRITON_INTERPRET=1``)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


@contextlib.contextmanager
def _compiling_environment() -> Iterator[None]:
    """``TRITON_INTERPRET=0`` for the worker processes started inside (they inherit it)."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


def _compile_indexed(index: int, arch: int) -> CompiledImage:
    """``_compile`` of the ``index``-th variant, for worker processes."""
    return _compile(load_variants()[index], arch)


def _c_string(data: bytes) -> str:
    """``data`` as adjacent C string literals (fast to compile, unlike brace initialisers)."""
    chars = [
        chr(b) if 32 <= b < 127 and b not in b'"\\?' else f"\\{b:03o}" for b in data
    ]  # 3-digit octal escapes end by themselves: a following digit is safe
    lines = ("".join(chars[i : i + 32]) for i in range(0, len(chars), 32))
    return "\n".join(f'    "{line}"' for line in lines) if data else '    ""'


def _generate(variants: Sequence[AotVariant], images: Sequence[CompiledImage]) -> dict[str, str]:
    """The generated header and source, keyed by file name."""
    stamp = "// Generated by `python -m ipcv_deploy.kernels.aot`; do not edit.\n"
    ids = "".join(f"  {v.name},\n" for v in variants)
    constants = "".join(
        f"constexpr int64_t {v.name}_{key} = {int(value)};\n"
        for v in variants
        for key, value in v.constexprs.items()
        if isinstance(value, (bool, int))
    )
    header = f"""{stamp}#pragma once

#include <stddef.h>
#include <stdint.h>

namespace ipcv_aot {{

// One variant compiled for one architecture (capability major * 10 + minor).
struct Image {{
  int arch;
  const char* function;         // kernel entry point in the image
  int num_warps;                // blockDim.x = 32 * num_warps
  uint32_t shared;              // dynamic shared memory bytes of every launch
  const char* cubin;            // exact-architecture ELF
  size_t cubin_size;
  const char* ptx;              // NUL-terminated PTX that also JIT-compiles on later
                                // architectures, or null (an sm_XXa target)
}};

// One Triton kernel specialisation: its parameters (the non-constexpr arguments in order;
// the launcher appends Triton's two scratch pointers) and its images, ascending arch.
struct Kernel {{
  const char* name;
  const char* signature;        // Triton types, comma-separated
  int num_params;
  const uint8_t* param_bytes;   // size of each parameter
  int num_images;
  const Image* images;
}};

enum KernelId : int {{
{ids}  kKernelCount
}};

extern const Kernel kKernels[kKernelCount];

// The integer constexprs each variant was compiled with (block sizes the grids depend on).
{constants}
}}  // namespace ipcv_aot
"""
    parts = [f'{stamp}#include "{HEADER_NAME}"\n\nnamespace ipcv_aot {{\nnamespace {{\n']
    for variant in variants:
        sizes = ", ".join(str(s) for s in _param_bytes(variant))
        parts.append(f"\nconst uint8_t {variant.name}_params[] = {{{sizes}}};\n")
        mine = [im for im in images if im.name == variant.name]
        for im in mine:
            stem = f"{variant.name}_sm{im.arch}"
            parts.append(f"const char {stem}_cubin[] =\n{_c_string(im.cubin)};\n")
            if im.ptx_portable:  # an "a"-target PTX only serves the GPU its cubin serves
                parts.append(f"const char {stem}_ptx[] =\n{_c_string(im.ptx.encode())};\n")
        rows = "".join(
            f'    {{{im.arch}, "{im.function}", {im.num_warps}, {im.shared}u, '
            f"{variant.name}_sm{im.arch}_cubin, sizeof({variant.name}_sm{im.arch}_cubin) - 1, "
            f"{f'{variant.name}_sm{im.arch}_ptx' if im.ptx_portable else 'nullptr'}}},\n"
            for im in mine
        )
        parts.append(f"const Image {variant.name}_images[] = {{\n{rows}}};\n")
    parts.append("\n}  // namespace\n\nconst Kernel kKernels[kKernelCount] = {\n")
    for variant in variants:
        signature = ",".join(variant.signature.values())
        parts.append(
            f'    {{"{variant.name}", "{signature}", {len(variant.signature)}, '
            f"{variant.name}_params, {len(images) // len(variants)}, {variant.name}_images}},\n"
        )
    parts.append("};\n\n}  // namespace ipcv_aot\n")
    return {HEADER_NAME: header, SOURCE_NAME: "".join(parts)}


def compile_kernels(
    out_dir: Path | str,
    archs: Sequence[int] = DEFAULT_ARCHS,
    progress: bool = False,
    jobs: int = 1,
) -> dict:
    """Compile every AOT variant for ``archs`` and write the images and generated C++.

    Needs no GPU and no CUDA driver. Nothing is written until every image compiled; then the
    files are written to a staging directory and renamed into ``out_dir`` one by one, so no
    file of ``out_dir`` is ever half-written.

    Args:
        out_dir: output directory (created).
        archs: compute capabilities as major * 10 + minor (87, 89, 90, 110).
        progress: print one line per architecture to stderr.
        jobs: compile in this many worker processes (1: in this process, unless triton's
            interpreter is on here: the kernels are then compiled in a worker without it).

    Returns:
        A JSON-ready summary: archs, files written, and one entry per image.

    Raises:
        ConfigError: an unknown architecture, or a variant the launcher cannot run.
    """
    archs = sorted(set(archs))
    if not archs or any(a < 75 for a in archs):
        raise ConfigError(f"archs {archs}: give compute capabilities >= 75, e.g. 87 89 90 110")
    variants = load_variants()
    if not variants:
        raise ConfigError("no AOT variants found in ipcv_deploy.kernels.AOT_VARIANTS")
    names = [v.name for v in variants]
    images: list[CompiledImage] = []
    with contextlib.ExitStack() as stack:
        run = map
        if jobs > 1 or _interpreted():
            # Spawned workers re-import the kernel modules (as JIT functions, not interpreted)
            # and compile one (variant, arch) each.
            stack.enter_context(_compiling_environment())
            context = multiprocessing.get_context("spawn")
            run = stack.enter_context(ProcessPoolExecutor(max(1, jobs), mp_context=context)).map
        for arch in archs:
            images.extend(run(_compile_indexed, range(len(names)), [arch] * len(names)))
            if progress:
                print(f"aot: sm_{arch}: {len(names)} kernels compiled", file=sys.stderr)
    images.sort(key=lambda im: (names.index(im.name), im.arch))

    files: dict[str, bytes] = {
        name: text.encode() for name, text in _generate(variants, images).items()
    }
    for im in images:
        files[f"sm_{im.arch}/{im.name}.cubin"] = im.cubin
        files[f"sm_{im.arch}/{im.name}.ptx"] = im.ptx.encode()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".aot-", dir=out))
    try:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for name in sorted(files):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    entries = []
    for im in images:
        entry = asdict(im)
        entry.update(cubin=len(im.cubin), ptx=len(im.ptx), ptx_portable=im.ptx_portable)
        entries.append(entry)
    return {"out": str(out), "archs": archs, "files": sorted(files), "images": entries}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ipcv_deploy.kernels.aot``: compile the kernels for the plugin library."""
    parser = argparse.ArgumentParser(prog="python -m ipcv_deploy.kernels.aot", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), help="compute capabilities"
    )
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes"
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary to stdout")
    args = parser.parse_args(argv)
    try:
        summary = compile_kernels(args.out, args.arch, progress=True, jobs=args.jobs)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
