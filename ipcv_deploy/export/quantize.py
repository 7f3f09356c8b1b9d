"""Dynamic int8 quantization of an exported graph for the ONNX Runtime CPU backend.

What a CPU user does for speed is ONNX Runtime's dynamic quantization of the weight MatMuls:
int8 weights (symmetric, per output channel), activations quantized per call. This module
writes exactly that graph form (``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> ``Cast`` ->
``Mul`` by the two scales, which ONNX Runtime fuses into its int8 kernel), but it streams:
one weight is read, quantized and written at a time, so quantizing the 2.7 GB Qwen2-VL-7B
ViT needs megabytes, where ``onnxruntime.quantization.quantize_dynamic`` peaks at 9 GB. The
test suite checks the result against ``quantize_dynamic``.

The export writes every projection as a plain weight initializer (no run-time slicing of
fused weights), so every projection is quantized. The ``ipcv`` nodes and their function
bodies are never touched: token scores, distances and reconstruction stay fp32.

Two modes. ``int8`` keeps the weight products upstream of the selection (the blocks before K
and the patch embedding) in fp32, so the kept set and the neighbours are those of the fp32
model, and quantizes everything after. ``int8-full`` quantizes those blocks too: faster, but
the token scores ``||h_K - h_(K-1)||`` are small differences of large hidden states, and
int8 noise reorders them (measured: 67% of the kept tokens of small-qwen2-vl differ). For a
dense export both modes quantize every weight product.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ipcv_deploy.artifact import (
    MANIFEST_NAME,
    QUANTIZE_MODES,
    Artifact,
    file_entry,
    load_artifact,
)
from ipcv_deploy.errors import ArtifactError, ConfigError
from ipcv_deploy.fileio import FILE_MODE, staged_directory, write_json
from ipcv_deploy.ops import DOMAIN

__all__ = [
    "INT8_RANGE",
    "fp32_selection_nodes",
    "quantize_artifact",
    "quantize_int8",
    "quantize_weight",
]

#: Symmetric int8 weights use [-127, 127] (as ONNX Runtime's quantizer does).
INT8_RANGE = 127
_COPY_CHUNK = 1 << 24


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel (column) symmetric int8: ``weight ~ q * scale``.

    Returns:
        ``q`` int8 [K, N] and ``scale`` float32 [N] (1 for an all-zero column).
    """
    absmax = np.abs(weight).max(axis=0).astype(np.float32)
    scale = np.where(absmax > 0, absmax / np.float32(INT8_RANGE), np.float32(1)).astype(np.float32)
    q = np.minimum(np.maximum(np.rint(weight / scale), -INT8_RANGE), INT8_RANGE).astype(np.int8)
    return q, scale


def _weight_products(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMul / Gemm nodes whose second input is a 2-D fp32 weight (what int8 rewrites)."""
    weights = {
        t.name: t
        for t in model.graph.initializer
        if t.data_type == TensorProto.FLOAT and len(t.dims) == 2
    }
    products = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights:
            products.append(node)
        elif node.op_type == "Gemm" and node.input[1] in weights:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            plain = (attrs.get("transA", 0), attrs.get("alpha", 1.0), attrs.get("beta", 1.0))
            if plain == (0, 1.0, 1.0):  # a weight product plus a bias
                products.append(node)
    return products


def fp32_selection_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the weight products the ``TokenSelect`` / ``NeighborIndex`` inputs depend on."""
    producer = {out: node for node in model.graph.node for out in node.output}
    products = {n.name for n in _weight_products(model)}
    todo = [
        name
        for node in model.graph.node
        if node.domain == DOMAIN and node.op_type in ("TokenSelect", "NeighborIndex")
        for name in node.input
    ]
    seen: set[str] = set()
    upstream: list[str] = []
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in products:
            upstream.append(node.name)
        todo.extend(node.input)
    return sorted(upstream)


class _Weights:
    """The source graph's external data (read by offset) and the new weights file (appended)."""

    def __init__(self, source_dir: Path, out: BinaryIO, location: str) -> None:
        self.source_dir = source_dir
        self.out = out
        self.location = location

    @staticmethod
    def _external(tensor: TensorProto) -> dict[str, str] | None:
        if tensor.data_location != TensorProto.EXTERNAL:
            return None
        return {e.key: e.value for e in tensor.external_data}

    def read(self, tensor: TensorProto) -> np.ndarray:
        """One tensor's values (from its external data, or inline)."""
        info = self._external(tensor)
        if info is None:
            return numpy_helper.to_array(tensor)
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims))
        with (self.source_dir / info["location"]).open("rb") as f:
            f.seek(int(info.get("offset", 0)))
            data = np.fromfile(f, dtype=dtype, count=count)
        return data.reshape(tuple(tensor.dims))

    def _place(self, tensor: TensorProto, length: int) -> None:
        offset = self.out.tell()
        del tensor.external_data[:]
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", length)):
            tensor.external_data.add(key=key, value=str(value))

    def write(self, name: str, array: np.ndarray) -> TensorProto:
        """A new initializer whose data is appended to the new weights file."""
        raw = np.ascontiguousarray(array).tobytes()
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.dims.extend(array.shape)
        self._place(tensor, len(raw))
        self.out.write(raw)
        return tensor

    def copy(self, tensor: TensorProto) -> TensorProto:
        """``tensor`` with its external data copied into the new file (in chunks)."""
        info = self._external(tensor)
        if info is None:
            return tensor
        copied = TensorProto()
        copied.CopyFrom(tensor)
        length = int(info["length"])
        self._place(copied, length)
        with (self.source_dir / info["location"]).open("rb") as f:
            f.seek(int(info.get("offset", 0)))
            left = length
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise ArtifactError(f"{info['location']} ends before tensor {tensor.name}")
                self.out.write(chunk)
                left -= len(chunk)
        return copied


def _rewrite(
    node: onnx.NodeProto,
    weight: TensorProto,
    weights: _Weights,
    quantized_inputs: dict[str, tuple[str, str, str]],
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """The int8 form of one weight MatMul / Gemm (same output name)."""
    array = weights.read(weight)
    if node.op_type == "Gemm" and any(
        a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute
    ):
        array = array.T
    q, scale = quantize_weight(array.astype(np.float32))
    stem = node.name
    new_inits = [
        weights.write(f"{stem}_weight_int8", q),
        numpy_helper.from_array(np.zeros(q.shape[1], np.int8), f"{stem}_weight_zero_point"),
        numpy_helper.from_array(scale, f"{stem}_weight_scale"),
    ]
    nodes = []
    source = node.input[0]
    if source not in quantized_inputs:  # one DynamicQuantizeLinear per activation
        names = (f"{source}_int8", f"{source}_int8_scale", f"{source}_int8_zero_point")
        nodes.append(
            helper.make_node(
                "DynamicQuantizeLinear", [source], list(names), name=f"{source}_quantize"
            )
        )
        quantized_inputs[source] = names
    x_q, x_scale, x_zero = quantized_inputs[source]
    out = node.output[0]
    product = out if node.op_type == "MatMul" else f"{stem}_product"
    nodes += [
        helper.make_node(
            "MatMulInteger",
            [x_q, f"{stem}_weight_int8", x_zero, f"{stem}_weight_zero_point"],
            [f"{stem}_int32"],
            name=f"{stem}_int8",
        ),
        helper.make_node(
            "Cast", [f"{stem}_int32"], [f"{stem}_float"], name=f"{stem}_cast", to=TensorProto.FLOAT
        ),
        helper.make_node(
            "Mul", [x_scale, f"{stem}_weight_scale"], [f"{stem}_scale"], name=f"{stem}_scales"
        ),
        helper.make_node(
            "Mul", [f"{stem}_float", f"{stem}_scale"], [product], name=f"{stem}_dequantize"
        ),
    ]
    if node.op_type == "Gemm":
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [out], name=stem))
        else:
            nodes.append(helper.make_node("Identity", [product], [out], name=stem))
    return nodes, new_inits


def _quantized_graph(
    model: onnx.ModelProto, source_dir: Path, out_dir: Path, weights_name: str, keep_fp32: set[str]
) -> tuple[onnx.ModelProto, int]:
    """``model`` with its weight products in int8, weights streamed into ``out_dir``."""
    initializers = {t.name: t for t in model.graph.initializer}
    targets = {n.name: n for n in _weight_products(model) if n.name not in keep_fp32}
    used_elsewhere = {
        name for n in model.graph.node if n.name not in targets for name in n.input
    } | {o.name for o in model.graph.output}
    replaced = {n.input[1] for n in targets.values()} - used_elsewhere
    quantized_inputs: dict[str, tuple[str, str, str]] = {}
    with (out_dir / weights_name).open("wb") as out:
        weights = _Weights(source_dir, out, weights_name)
        nodes, new_inits = [], []
        for node in model.graph.node:
            if node.name not in targets:
                nodes.append(node)
                continue
            rewritten, inits = _rewrite(
                node, initializers[node.input[1]], weights, quantized_inputs
            )
            nodes += rewritten
            new_inits += inits
        kept = [weights.copy(t) for t in model.graph.initializer if t.name not in replaced]
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    del result.graph.initializer[:]
    result.graph.initializer.extend([*kept, *new_inits])
    return result, len(targets)


def _files(graph: onnx.ModelProto) -> Iterator[str]:
    for tensor in graph.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                yield entry.value


def quantize_int8(graph: Path, out_dir: Path, full: bool = False) -> dict[str, Any]:
    """Quantize ``graph`` (an ONNX file with external weights) into ``out_dir`` (same names).

    Args:
        graph: the ``ort`` flavour of an fp32 export.
        out_dir: a new directory for the quantized graph and its weights file.
        full: quantize the products before the selection too (``int8-full``).

    Returns:
        The manifest's ``quantization`` record.
    """
    model = onnx.load(os.fspath(graph), load_external_data=False)
    locations = set(_files(model))
    if len(locations) > 1:
        raise ArtifactError(f"{graph} spreads its weights over {sorted(locations)}; re-export")
    keep_fp32 = set() if full else set(fp32_selection_nodes(model))
    out_dir.mkdir()
    weights_name = next(iter(locations), f"{graph.name}.data")
    quantized, count = _quantized_graph(model, graph.parent, out_dir, weights_name, keep_fp32)
    onnx.save(quantized, os.fspath(out_dir / graph.name))
    return {
        "mode": "int8-full" if full else "int8",
        "method": "dynamic (ONNX Runtime's DynamicQuantizeLinear + MatMulInteger form)",
        "weights": "int8, symmetric [-127, 127], per output channel",
        "activations": "uint8, per tensor, computed at run time",
        "int8_matmuls": count,
        "fp32_matmuls": len(keep_fp32),
        "fp32_reason": "upstream of the selection (blocks before K, patch embedding)"
        if keep_fp32
        else None,
        "untouched": "ipcv ops and their function bodies (fp32 scores, distances, NGR)",
    }


def quantize_artifact(
    artifact: Artifact,
    out: Path,
    mode: str,
    force: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> Artifact:
    """Write the ``mode`` (``int8`` / ``int8-full``) quantization of an fp32 artifact to ``out``.

    ``out`` holds the quantized ``ort`` flavour, its weights and a manifest recording the
    quantization; it is written atomically (nothing is left on any error).

    Raises:
        ConfigError: an unknown mode, or an artifact that is not fp32.
        ArtifactError: the artifact has no ``ort`` flavour, is quantized already, or ``out``
            cannot be written.
    """
    if mode not in QUANTIZE_MODES or mode == "none":
        raise ConfigError(f"unknown int8 mode {mode!r}; use int8 or int8-full")
    source = artifact.manifest
    if source.quantization is not None:
        raise ArtifactError(f"{artifact.path} is quantized already ({source.quantization['mode']})")
    if source.dtype != "float32":
        raise ConfigError(
            f"int8 quantizes float32 exports; {artifact.path} is {source.dtype}: export it with "
            "--dtype float32"
        )
    graph = artifact.flavour_file("ort")
    with staged_directory(out, force, marker=MANIFEST_NAME) as stage:
        progress(f"quantizing the weights ({mode}) ...")
        work = stage / ".int8"
        quantization = quantize_int8(graph, work, full=mode == "int8-full")
        for produced in work.iterdir():
            os.chmod(produced, FILE_MODE)
            os.replace(produced, stage / produced.name)
        work.rmdir()
        onnx.checker.check_model(os.fspath(stage / graph.name), full_check=True)
        manifest = dataclasses.replace(
            source,
            flavours={"ort": graph.name},
            files={p.name: file_entry(p) for p in sorted(stage.iterdir())},
            quantization=quantization,
        )
        write_json(stage / MANIFEST_NAME, manifest.to_dict())
    return load_artifact(out, check="size")
