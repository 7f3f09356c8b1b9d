"""Export the row-form encoder to ONNX: ``ipcv`` nodes, two flavours, manifest, atomic write.

``torch.onnx.export(dynamo=True)`` traces ``RowEncoder`` with a dynamic batch; the custom
translation table turns each ``torch.ops.ipcv`` call into one ``ipcv``-domain node. The
exported graph then becomes two flavours sharing one external-weights file:

- ``ort`` (``vision.onnx``): model-local function bodies for the ``ipcv`` ops, so any ONNX
  runtime runs it with no custom library;
- ``trt`` (``vision.trt.onnx``): no bodies, ``plugin_version`` / ``plugin_namespace`` on each
  ``ipcv`` node, for TensorRT's ONNX parser and the ``plugins/`` library.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper

import ipcv_deploy
from ipcv_deploy.artifact import (
    MANIFEST_NAME,
    Artifact,
    Manifest,
    TensorInfo,
    file_entry,
    load_artifact,
)
from ipcv_deploy.backends.torch_backend import RowEncoder
from ipcv_deploy.compression.cost import encoder_flops
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ArtifactError, ConfigError
from ipcv_deploy.export.functions import function_protos
from ipcv_deploy.export.translations import translation_table
from ipcv_deploy.fileio import staged_directory, write_json
from ipcv_deploy.models import ImageSize, LoadedModel
from ipcv_deploy.ops import DOMAIN, OPSET_VERSION, PLUGIN_NAMESPACE, PLUGIN_VERSION

__all__ = [
    "ONNX_OPSET",
    "TARGETS",
    "ExportOptions",
    "NativeTokens",
    "PixelRange",
    "export_encoder",
    "native_tokens",
]

#: Standard-domain opset of the exported graphs and of the function bodies.
ONNX_OPSET = 18
#: ``--target`` values and the flavours each writes.
TARGETS: dict[str, tuple[str, ...]] = {"ort": ("ort",), "trt": ("trt",), "all": ("ort", "trt")}
_FILES = {"ort": "vision.onnx", "trt": "vision.trt.onnx"}
_WEIGHTS = "vision.onnx.data"
# ONNX Runtime 1.31 reads IR <= 13; 10 is what TensorRT 10 and older runtimes read too.
_IR_VERSION = 10


@dataclass(frozen=True)
class PixelRange:
    """The images a native-resolution export takes: ``min_pixels <= H * W <= max_pixels``.

    The Qwen processors' own bounds (``smart_resize``); the export turns them into a token
    range (``NativeTokens``), raised where a smaller image would keep fewer than k tokens.
    """

    min_pixels: int
    max_pixels: int


@dataclass(frozen=True)
class NativeTokens:
    """Patch tokens per image a native export takes (multiples of ``merge**2``); grid unit."""

    min_tokens: int
    max_tokens: int
    patch_size: int
    merge_size: int

    @property
    def min_pixels(self) -> int:
        """The smallest image, in pixels."""
        return self.min_tokens * self.patch_size**2

    @property
    def max_pixels(self) -> int:
        """The largest image, in pixels."""
        return self.max_tokens * self.patch_size**2

    def to_dict(self) -> dict[str, int]:
        """The manifest's ``native`` entry."""
        return {**asdict(self), "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}


def native_tokens(encoder: RowEncoder, pixels: PixelRange) -> NativeTokens:
    """The token range of a native export.

    The pixel range in whole merge units, the lower end raised until an image keeps at least
    k (and one) tokens.

    Raises:
        ConfigError: an empty range, or one with no image that keeps k tokens.
    """
    vision_cfg = encoder.vision.config
    patch, merge = int(vision_cfg.patch_size), int(encoder.vision.spatial_merge_size)
    unit = (patch * merge) ** 2
    low = max(1, -(-pixels.min_pixels // unit))
    high = pixels.max_pixels // unit
    config = encoder.config
    if config is not None:
        need = max(1, config.num_neighbors)
        while low <= high and config.kept_count(low * merge * merge) < need:
            low += 1
    if low > high:
        raise ConfigError(
            f"no image between min_pixels {pixels.min_pixels} and max_pixels "
            f"{pixels.max_pixels} fits (one {patch * merge}x{patch * merge} px unit is {unit} "
            "pixels; each image must keep at least --num-neighbors tokens); raise "
            "--max-pixels or lower --num-neighbors"
        )
    return NativeTokens(low * merge * merge, high * merge * merge, patch, merge)


@dataclass(frozen=True)
class ExportOptions:
    """What to export.

    Attributes:
        image_size: static (H, W) of every image; for a native export, the size of the
            example inputs and of the manifest's per-image counts.
        native: a native-resolution export (Qwen) over this pixel range: the tower's own
            ``pixel_values [num_patches, 1176]`` + ``image_grid_thw [1, 3]``, any grid.
        config: IPCV settings; ``None`` exports the dense encoder.
        target: ``ort``, ``trt`` or ``all`` (both flavours, one weights file).
        return_indices: add the kept indices [B, P] as a second output (debugging).
        force: replace an existing output directory.
    """

    image_size: ImageSize
    config: IPCVConfig | None
    target: str = "all"
    return_indices: bool = False
    force: bool = False
    native: PixelRange | None = None


def _dynamic_shapes(tokens: NativeTokens | None) -> dict[str, Any]:
    """Row form: a dynamic batch. Native form: a dynamic token count in whole merge units."""
    if tokens is None:
        return {"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}}
    per_unit = tokens.merge_size**2
    units = torch.export.Dim(
        "units", min=tokens.min_tokens // per_unit, max=tokens.max_tokens // per_unit
    )
    return {"pixels": {0: per_unit * units}, "grid": None}


def _torch_export(
    encoder: RowEncoder,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    tokens: NativeTokens | None,
) -> None:
    """Trace and convert; ONNX with external weights at ``path``."""
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The exporter prints its own step log; keep the CLI's output ours.
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                encoder,
                inputs,
                dynamo=True,
                input_names=list(encoder.input_names),
                output_names=list(encoder.output_names),
                opset_version=ONNX_OPSET,
                dynamic_shapes=_dynamic_shapes(tokens),
                custom_translation_table=translation_table(),
                optimize=True,
            )
        program.save(str(path), external_data=True)
    quiet.setLevel(level)
    produced = path.parent / f"{path.name}.data"
    if produced.name != _WEIGHTS:
        produced.rename(path.parent / _WEIGHTS)


def _ipcv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def _flavour(base: onnx.ModelProto, flavour: str) -> onnx.ModelProto:
    """The ``ort`` (function bodies) or ``trt`` (plugin attributes) flavour of ``base``."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    model.ir_version = _IR_VERSION
    del model.functions[:]
    if flavour == "ort":
        used = {node.op_type for node in _ipcv_nodes(model)}
        model.functions.extend(f for f in function_protos(ONNX_OPSET) if f.name in used)
    else:
        for node in _ipcv_nodes(model):
            node.attribute.extend(
                [
                    helper.make_attribute("plugin_version", PLUGIN_VERSION),
                    helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
                ]
            )
    return model


def _normalize(model: onnx.ModelProto) -> None:
    """One weights file name, one opset per domain, stable node names for the ipcv ops."""
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = _WEIGHTS
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get(DOMAIN, OPSET_VERSION) != OPSET_VERSION or opsets.get("", 0) != ONNX_OPSET:
        raise ConfigError(f"exporter produced opsets {opsets}, expected ai.onnx {ONNX_OPSET}")
    del model.opset_import[:]
    model.opset_import.extend(
        [helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
    )
    counts: dict[str, int] = {}
    for node in _ipcv_nodes(model):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        node.name = f"ipcv_{node.op_type}_{counts[node.op_type] - 1}"


#: Names of the dynamic dimensions of a native export's graph I/O (dim 0, dim 1 of keep_idx).
NATIVE_DIMS = {
    "pixel_values": (0, "num_patches"),
    "image_embeds": (0, "num_image_tokens"),
    "keep_idx": (1, "num_kept"),
}


def _name_native_dims(model: onnx.ModelProto) -> None:
    """Readable names for the exporter's symbols (``s0``, ``4*units``) on the graph I/O."""
    for value in [*model.graph.input, *model.graph.output]:
        if value.name in NATIVE_DIMS:
            axis, name = NATIVE_DIMS[value.name]
            value.type.tensor_type.shape.dim[axis].dim_param = name


def _io_info(values: list[onnx.ValueInfoProto]) -> tuple[TensorInfo, ...]:
    def dim(d: onnx.TensorShapeProto.Dimension) -> int | str:
        if d.HasField("dim_value"):
            return d.dim_value
        return d.dim_param if d.dim_param and d.dim_param != "s0" else "batch"

    return tuple(
        TensorInfo(
            v.name,
            helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
            tuple(dim(d) for d in v.type.tensor_type.shape.dim),
        )
        for v in values
    )


def _manifest(
    loaded: LoadedModel,
    encoder: RowEncoder,
    options: ExportOptions,
    model: onnx.ModelProto,
    stage: Path,
    flavours: tuple[str, ...],
    tokens: NativeTokens | None,
) -> Manifest:
    adapter, config = encoder.adapter, options.config
    shape = adapter.encoder_shape(options.image_size)
    # The row form holds one image per row: one segment of all its tokens.
    kept = (
        shape.tokens
        if config is None
        else config.kept_count(shape.tokens, adapter.num_prefix_tokens)
    )
    # FLOPs of the graph as exported: windowed blocks run as ``compression.attention`` traces.
    run = "graph" if tokens is None else "native_graph"
    dense = encoder_flops(shape, None, run=run).total
    files = {p.name: file_entry(p) for p in sorted(stage.iterdir())}
    source = (
        {"preset": loaded.name, "seed": loaded.seed}
        if loaded.seed is not None
        else {"path": str(Path(loaded.name).resolve())}
    )
    return Manifest(
        family=adapter.family,
        model_type=adapter.model_types[0],
        source=source,
        dtype=str(adapter.dtype).removeprefix("torch."),
        image_size=tuple(options.image_size),
        ipcv=None if config is None else config.to_dict(),
        tokens_per_image=shape.tokens,
        kept_per_image=kept,
        output_kind=encoder.output_kind,
        encoder={"depth": shape.depth, "width": shape.width},
        flops_per_image={
            "dense": dense,
            "exported": dense if config is None else encoder_flops(shape, config, run=run).total,
        },
        opsets={"": ONNX_OPSET, DOMAIN: OPSET_VERSION},
        flavours={f: _FILES[f] for f in flavours},
        plugin={"namespace": PLUGIN_NAMESPACE, "version": PLUGIN_VERSION},
        inputs=_io_info(list(model.graph.input)),
        outputs=_io_info(list(model.graph.output)),
        files=files,
        producer={
            "ipcv_deploy": ipcv_deploy.__version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
        },
        native=None if tokens is None else tokens.to_dict(),
    )


def export_encoder(
    loaded: LoadedModel,
    options: ExportOptions,
    out: Path,
    progress: Callable[[str], None] = lambda message: None,
) -> Artifact:
    """Export ``loaded``'s vision encoder (IPCV or dense) to an artifact directory ``out``.

    Written in a hidden sibling directory and renamed at the end: on any error ``out`` is
    untouched and nothing half-written remains.

    Raises:
        ArtifactError: ``out`` exists without ``force``.
        InputError: the image size does not fit the encoder.
        ConfigError: IPCV settings that do not fit the encoder, or an unknown target.
    """
    if options.target not in TARGETS:
        raise ConfigError(f"unknown target {options.target!r}; use one of {sorted(TARGETS)}")
    flavours = TARGETS[options.target]
    native = options.native is not None
    encoder = RowEncoder(
        loaded, options.config, options.image_size, options.return_indices, native=native
    )
    encoder.eval()
    tokens = native_tokens(encoder, options.native) if options.native is not None else None
    with staged_directory(out, options.force, marker=MANIFEST_NAME) as stage:
        what = (
            f"native resolution, {tokens.min_tokens}..{tokens.max_tokens} patches"
            if tokens is not None
            else f"{options.image_size[0]}x{options.image_size[1]}"
        )
        progress(f"tracing {encoder.adapter.family} encoder ({what}) ...")
        traced = stage / "traced.onnx"
        _torch_export(encoder, encoder.inputs(batch=1 if native else 2), traced, tokens)
        base = onnx.load(str(traced), load_external_data=False)
        traced.unlink()
        _normalize(base)
        if tokens is not None:
            _name_native_dims(base)
        if not _ipcv_nodes(base) and options.config is not None:
            raise ArtifactError("the exported graph has no ipcv nodes; the translation failed")
        for flavour in flavours:
            progress(f"writing the {flavour} flavour ...")
            model = _flavour(base, flavour)
            path = stage / _FILES[flavour]
            onnx.save(model, str(path))
            onnx.checker.check_model(str(path), full_check=True)
        progress("hashing files ...")
        manifest = _manifest(loaded, encoder, options, base, stage, flavours, tokens)
        write_json(stage / MANIFEST_NAME, manifest.to_dict())
    return load_artifact(out, check="size")
