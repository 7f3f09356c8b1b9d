"""Parity of an artifact against PyTorch: seeded inputs through both, per output and per op.

The reference is the PyTorch ``RowEncoder`` rebuilt from the manifest's source (the same
preset and seed, or the same checkpoint directory). Besides the graph outputs, every
``ipcv`` node's outputs are compared with the matching ``torch.ops.ipcv`` call: kept and
pruned indices must be identical, neighbour sets equal, reconstructions within tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ipcv_deploy.artifact import Artifact
from ipcv_deploy.backends.torch_backend import KEEP_IDX, RowEncoder, TorchBackend
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ArtifactError, InputError
from ipcv_deploy.models import DTYPES, load_model
from ipcv_deploy.ops import DOMAIN, OP_SPECS
from ipcv_deploy.parity import compare

__all__ = ["Check", "ParityReport", "reference_encoder", "verify_artifact"]

_SPEC_BY_TORCH_NAME = {f"{DOMAIN}::{s.torch_name}": s for s in OP_SPECS}


@dataclass(frozen=True)
class Check:
    """One compared tensor.

    Attributes:
        name: graph output name, or ``<node>:<output>`` for an ``ipcv`` node.
        kind: ``float`` (tolerance) or ``index`` (must be identical; ``nbr`` as sets).
        max_abs / max_rel / cosine: float agreement (``parity.compare``; ``cosine`` is the
            lowest of the rows).
        mismatched: index entries (rows for neighbour sets) that differ.
        passed: within tolerance / identical.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    cosine: float
    mismatched: int
    passed: bool


@dataclass
class ParityReport:
    """Everything ``verify`` found."""

    artifact: str
    reference: str
    candidate: str
    batch: int
    seed: int
    rtol: float
    outputs: list[Check] = field(default_factory=list)
    ops: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every output and every op check passed."""
        return all(c.passed for c in self.outputs + self.ops)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**asdict(self), "passed": self.passed}


def _check(name: str, ref: torch.Tensor, got: torch.Tensor, rtol: float, sets: bool) -> Check:
    if ref.shape != got.shape:
        return Check(name, "index", tuple(ref.shape), float("inf"), float("inf"), 0.0, -1, False)
    if not ref.is_floating_point():
        if sets:
            ref, got = ref.sort(-1).values, got.sort(-1).values
            bad = int((ref != got).any(-1).sum())
        else:
            bad = int((ref != got).sum())
        return Check(name, "index", tuple(ref.shape), 0.0, 0.0, 1.0, bad, bad == 0)
    a = compare(ref, got)
    return Check(
        name, "float", tuple(ref.shape), a.max_abs, a.max_rel, a.min_cosine, 0, a.max_rel <= rtol
    )


class _IpcvRecorder(TorchDispatchMode):
    """Records the outputs of every ``torch.ops.ipcv`` call, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[torch.Tensor, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == DOMAIN:
            spec = _SPEC_BY_TORCH_NAME[func._schema.name]
            self.calls.append((spec.name, out if isinstance(out, tuple) else (out,)))
        return out


def reference_encoder(artifact: Artifact) -> RowEncoder:
    """The PyTorch ``RowEncoder`` the artifact was exported from, rebuilt from its manifest.

    Raises:
        ArtifactError: the source checkpoint is gone, or the rebuilt model does not match.
    """
    manifest = artifact.manifest
    source = manifest.source
    spec = source.get("preset") or source.get("path")
    if "path" in source and not Path(source["path"]).is_dir():
        raise ArtifactError(
            f"{artifact.path} was exported from {source['path']}, which no longer exists; "
            "verify needs the source checkpoint to rebuild the PyTorch reference"
        )
    loaded = load_model(spec, dtype=DTYPES[manifest.dtype], seed=source.get("seed", 0))
    config = None if manifest.ipcv is None else IPCVConfig.from_dict(manifest.ipcv)
    with_indices = any(o.name == KEEP_IDX for o in manifest.outputs)
    encoder = RowEncoder(loaded, config, manifest.image_size, with_indices)
    if encoder.adapter.family != manifest.family:
        raise ArtifactError(
            f"{artifact.path} is a {manifest.family} artifact but its source rebuilt as "
            f"{encoder.adapter.family}; re-export"
        )
    return encoder.eval()


def _with_op_outputs(artifact: Artifact) -> tuple[bytes, list[tuple[str, tuple[str, ...]]]]:
    """The ``ort`` flavour, serialized, also outputting every ``ipcv`` node's outputs."""
    import onnx

    model = onnx.load(str(artifact.flavour_file("ort")), load_external_data=False)
    nodes = [(n.op_type, tuple(n.output)) for n in model.graph.node if n.domain == DOMAIN]
    for _, names in nodes:
        model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    return model.SerializeToString(), nodes


def verify_artifact(
    artifact: Artifact,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    threads: int | None = None,
    engine_dir: Path | None = None,
) -> ParityReport:
    """Run seeded inputs through PyTorch and ONNX Runtime (or a TensorRT engine) and compare.

    Args:
        artifact: a loaded artifact with the ``ort`` flavour.
        batch: images per call (exercises the dynamic batch).
        seed: seed of the random pixels.
        rtol: max |diff| / max |ref| allowed; default 1e-5 for fp32, 1e-2 for fp16 / bf16
            (and for TensorRT engines, which may run reduced precision).
        threads: ONNX Runtime intra-op threads.
        engine_dir: compare this TensorRT engine (outputs only) instead of ONNX Runtime.

    Returns:
        The ``ParityReport``; ``report.passed`` says whether the artifact is faithful.
    """
    from ipcv_deploy.backends.onnxruntime_backend import OrtBackend

    if batch < 1:
        raise InputError(f"batch must be >= 1, got {batch}")
    if rtol is None:
        exact = artifact.manifest.dtype == "float32" and engine_dir is None
        rtol = 1e-5 if exact else 1e-2
    encoder = reference_encoder(artifact)
    pixels = encoder.inputs(batch, seed)
    recorder = _IpcvRecorder()
    with recorder:
        expected = TorchBackend(encoder)(pixels)
    if engine_dir is not None:
        from ipcv_deploy.trt.runner import TrtBackend

        report = ParityReport(str(artifact.path), "torch", "tensorrt", batch, seed, rtol)
        got = TrtBackend(engine_dir)(pixels)
        for name in encoder.output_names:
            report.outputs.append(_check(name, expected[name], got[name], rtol, sets=False))
        return report
    report = ParityReport(str(artifact.path), "torch", "onnxruntime", batch, seed, rtol)
    model, nodes = _with_op_outputs(artifact)
    got = OrtBackend(artifact, threads=threads, model=model)(pixels)
    for name in encoder.output_names:
        report.outputs.append(_check(name, expected[name], got[name], rtol, sets=False))
    if len(nodes) != len(recorder.calls):
        raise ArtifactError(
            f"{artifact.path} has {len(nodes)} ipcv nodes but the PyTorch reference made "
            f"{len(recorder.calls)} ipcv calls: the artifact does not match its manifest"
        )
    counts: dict[str, int] = {}
    for (op_type, names), (called, values) in zip(nodes, recorder.calls, strict=True):
        if op_type != called:
            raise ArtifactError(
                f"ipcv node order differs from the reference ({op_type} vs {called}); re-export"
            )
        index = counts[op_type] = counts.get(op_type, -1) + 1
        spec = next(s for s in OP_SPECS if s.name == op_type)
        for out_spec, onnx_name, value in zip(spec.outputs, names, values, strict=True):
            report.ops.append(
                _check(
                    f"{op_type}_{index}:{out_spec.name}",
                    value,
                    got[onnx_name],
                    rtol,
                    sets=out_spec.name == "nbr",
                )
            )
    return report
