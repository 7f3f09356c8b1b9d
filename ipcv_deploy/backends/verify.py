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
from ipcv_deploy.errors import ArtifactError, BackendUnavailableError, InputError
from ipcv_deploy.models import DTYPES, load_model
from ipcv_deploy.ops import DOMAIN, OP_SPECS
from ipcv_deploy.parity import compare

__all__ = [
    "INT8_LIMITS",
    "Check",
    "ParityReport",
    "native_cases",
    "reference_encoder",
    "save_polygraphy",
    "verify_artifact",
]

#: What an int8 artifact must still meet against the fp32 PyTorch reference, by mode: every
#: float output (graph and op) keeps a row cosine of at least ``min_cosine``; at most
#: ``index_mismatch`` of the kept / pruned indices (and of the neighbour sets) may differ.
#: ``int8`` selects on fp32 hidden states, so its indices are those of fp32. ``int8-full``
#: quantizes the blocks that score the tokens: int8 noise reorders close scores, identical
#: indices cannot be promised (measured 40-67% of the kept tokens differ on the random-weight
#: presets), so only the output is held to a (lower) cosine.
INT8_LIMITS = {
    "int8": {"min_cosine": 0.97, "index_mismatch": 0.0},
    "int8-full": {"min_cosine": 0.8, "index_mismatch": 1.0},
}

_SPEC_BY_TORCH_NAME = {f"{DOMAIN}::{s.torch_name}": s for s in OP_SPECS}


@dataclass(frozen=True)
class Check:
    """One compared tensor.

    Attributes:
        name: graph output name, or ``<node>:<output>`` for an ``ipcv`` node.
        kind: ``float`` (tolerance) or ``index`` (must be identical; ``nbr`` as sets).
        max_abs / max_rel / cosine: float agreement (``parity.compare``; ``cosine`` is the
            lowest of the rows).
        mismatched: indices not in the reference's set of their row; for neighbour sets,
            the reference's pruned tokens whose neighbours (as token positions) differ.
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
    """Everything ``verify`` found.

    ``limits`` is ``INT8_LIMITS`` for an int8 artifact (checked instead of ``rtol`` and
    identical indices), else ``None``.
    """

    artifact: str
    reference: str
    candidate: str
    batch: int
    seed: int
    rtol: float
    limits: dict[str, float] | None = None
    outputs: list[Check] = field(default_factory=list)
    ops: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every output and every op check passed."""
        return all(c.passed for c in self.outputs + self.ops)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**asdict(self), "passed": self.passed}


def _check(
    name: str,
    ref: torch.Tensor,
    got: torch.Tensor,
    rtol: float,
    sets: bool,
    limits: dict[str, float] | None = None,
) -> Check:
    if ref.shape != got.shape:
        return Check(name, "index", tuple(ref.shape), float("inf"), float("inf"), 0.0, -1, False)
    if not ref.is_floating_point():
        if sets:  # neighbour sets: rows whose set differs
            ref, got = ref.sort(-1).values, got.sort(-1).values
            bad, units = int((ref != got).any(-1).sum()), ref[..., 0].numel()
        else:  # sorted index sets per row: indices the reference does not have
            rows = zip(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]), strict=True)
            missing = sum(int((~torch.isin(g, r)).sum()) for r, g in rows)
            # the same sets in another order count as the rows out of order
            bad = missing or int((ref != got).any(-1).sum())
            units = ref.numel()
        allowed = 0 if limits is None else limits["index_mismatch"] * units
        return Check(name, "index", tuple(ref.shape), 0.0, 0.0, 1.0, bad, bad <= allowed)
    a = compare(ref, got)
    passed = a.max_rel <= rtol if limits is None else a.min_cosine >= limits["min_cosine"]
    return Check(name, "float", tuple(ref.shape), a.max_abs, a.max_rel, a.min_cosine, 0, passed)


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
    encoder = RowEncoder(
        loaded, config, manifest.image_size, with_indices, native=manifest.native is not None
    )
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


def native_cases(
    native: dict[str, int], image_size: tuple[int, int], max_tokens: int
) -> list[tuple[str, list[tuple[int, int]]]]:
    """Grids (patch rows, columns) a native artifact is verified at, by case name.

    Square at the example size, 16:9 and 9:16 of about its token count, the smallest and
    the largest grid of the artifact's range (the largest capped at ``max_tokens`` patches,
    what fits a CPU check), and two images of different sizes in one call.
    """
    m, patch = native["merge_size"], native["patch_size"]
    low, high = native["min_tokens"] // (m * m), min(native["max_tokens"], max_tokens) // (m * m)

    def fit(units: int, aspect: float) -> tuple[int, int]:
        units = max(low, min(high, units))
        rows = max(1, round((units / aspect) ** 0.5))
        cols = max(1, units // rows)
        while rows * cols < low:
            cols += 1
        while rows * cols > high:
            rows, cols = (rows - 1, cols) if rows > cols else (rows, cols - 1)
        return rows * m, cols * m

    def exact(units: int) -> tuple[int, int]:  # the most nearly square grid of ``units``
        rows = max(r for r in range(1, int(units**0.5) + 1) if units % r == 0)
        return rows * m, units // rows * m

    example = (image_size[0] // patch // m) * (image_size[1] // patch // m)
    square, wide = fit(example, 1.0), fit(example, 16 / 9)
    return [
        (f"square {square[0]}x{square[1]}", [square]),
        (f"16:9 {wide[0]}x{wide[1]}", [wide]),
        (f"9:16 {wide[1]}x{wide[0]}", [(wide[1], wide[0])]),
        (f"smallest {exact(low)[0]}x{exact(low)[1]}", [exact(low)]),
        (
            f"largest {exact(high)[0]}x{exact(high)[1]}"
            + ("" if high * m * m == native["max_tokens"] else f" (capped at {max_tokens})"),
            [exact(high)],
        ),
        ("two images", [square, wide]),
    ]


def _native_inputs(
    encoder: RowEncoder, grids: list[tuple[int, int]], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [encoder.inputs(1, seed + i, grid) for i, grid in enumerate(grids)]
    return torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])


def verify_artifact(
    artifact: Artifact,
    batch: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    threads: int | None = None,
    engine_dir: Path | None = None,
    max_tokens: int = 4096,
    polygraphy_dir: Path | None = None,
) -> ParityReport:
    """Run seeded inputs through PyTorch and ONNX Runtime (or a TensorRT engine) and compare.

    A fixed-size artifact runs one call of ``batch`` images; a native-resolution one runs
    every case of ``native_cases`` (checks named ``<case>/<output>``), the ipcv ops compared
    on each single-image case.

    Args:
        artifact: a loaded artifact with the ``ort`` flavour.
        batch: images per call (exercises the dynamic batch; fixed-size artifacts).
        seed: seed of the random pixels.
        rtol: max |diff| / max |ref| allowed; default 1e-5 for fp32, 1e-2 for fp16 / bf16
            (and for TensorRT engines, which may run reduced precision). An int8 artifact is
            held to ``INT8_LIMITS`` of its mode instead.
        threads: ONNX Runtime intra-op threads.
        engine_dir: compare this TensorRT engine (outputs only) instead of ONNX Runtime.
        max_tokens: native artifacts: the largest grid checked, in patches.
        polygraphy_dir: also write the first call's inputs (``inputs.json``) and PyTorch
            outputs (``reference.json``) in polygraphy's JSON format there, for ``polygraphy
            run ... --load-inputs inputs.json --load-outputs reference.json``.

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
    manifest = artifact.manifest
    if manifest.native is None:
        calls = [("", encoder.inputs(batch, seed))]
    else:
        batch = 1
        cases = native_cases(manifest.native, manifest.image_size, max_tokens)
        calls = [(f"{name}/", _native_inputs(encoder, grids, seed)) for name, grids in cases]
    quantization = manifest.quantization
    limits = INT8_LIMITS[quantization["mode"]] if quantization else None
    candidate = "tensorrt" if engine_dir is not None else "onnxruntime"
    report = ParityReport(str(artifact.path), "torch", candidate, batch, seed, rtol, limits)
    if engine_dir is not None:
        from ipcv_deploy.trt.runner import TrtBackend

        runner = TrtBackend(engine_dir, to_host=True)
    else:
        model, nodes = _with_op_outputs(artifact)
        with_ops = OrtBackend(artifact, threads=threads, model=model)
        # a second session only for the call of several images (op outputs do not join)
        plain = OrtBackend(artifact, threads=threads) if manifest.native else with_ops
    for index, (prefix, inputs) in enumerate(calls):
        recorder = _IpcvRecorder()
        with recorder:
            expected = TorchBackend(encoder)(*inputs)
        if polygraphy_dir is not None and index == 0:
            save_polygraphy(polygraphy_dir, encoder, inputs, expected)
        single = manifest.native is None or int(inputs[1].shape[0]) == 1
        if engine_dir is not None:
            got = runner(*inputs)
        else:
            got = (with_ops if single else plain)(*inputs)
        for name in encoder.output_names:
            report.outputs.append(
                _check(f"{prefix}{name}", expected[name], got[name], rtol, False, limits)
            )
        if engine_dir is None and single:
            report.ops.extend(_op_checks(artifact, nodes, recorder, got, rtol, limits, prefix))
    return report


def save_polygraphy(
    directory: Path, encoder: RowEncoder, inputs: tuple[torch.Tensor, ...], expected: dict
) -> None:
    """Inputs and reference outputs of one call in polygraphy's JSON formats.

    Raises:
        BackendUnavailableError: polygraphy is not installed.
    """
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import save_json
    except ImportError:
        raise BackendUnavailableError(
            "polygraphy is not installed; pip install polygraphy (or 'ipcv-deploy[dev]')"
        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    feed = {
        name: value.detach().cpu().numpy()
        for name, value in zip(encoder.input_names, inputs, strict=True)
    }
    save_json([feed], str(directory / "inputs.json"), description="ipcv-deploy inputs")
    outputs = {name: value.detach().cpu().numpy() for name, value in expected.items()}
    results = RunResults()
    results.append(("torch", [IterationResult(outputs=outputs, runner_name="torch")]))
    results.save(str(directory / "reference.json"))


def _op_checks(
    artifact: Artifact,
    nodes: list[tuple[str, tuple[str, ...]]],
    recorder: _IpcvRecorder,
    got: dict[str, torch.Tensor],
    rtol: float,
    limits: dict[str, float] | None,
    prefix: str,
) -> list[Check]:
    """Every ipcv node's outputs against the matching ``torch.ops.ipcv`` call."""
    if len(nodes) != len(recorder.calls):
        raise ArtifactError(
            f"{artifact.path} has {len(nodes)} ipcv nodes but the PyTorch reference made "
            f"{len(recorder.calls)} ipcv calls: the artifact does not match its manifest"
        )
    checks = []
    counts: dict[str, int] = {}
    selection: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # keep/drop: (ref, candidate)
    for (op_type, names), (called, values) in zip(nodes, recorder.calls, strict=True):
        if op_type != called:
            raise ArtifactError(
                f"ipcv node order differs from the reference ({op_type} vs {called}); re-export"
            )
        index = counts[op_type] = counts.get(op_type, -1) + 1
        spec = next(s for s in OP_SPECS if s.name == op_type)
        for out_spec, onnx_name, value in zip(spec.outputs, names, values, strict=True):
            name, ref, cand = f"{prefix}{op_type}_{index}:{out_spec.name}", value, got[onnx_name]
            if out_spec.name in ("keep_idx", "drop_idx"):
                selection[out_spec.name] = (ref, cand)
            if out_spec.name == "nbr" and len(selection) == 2 and ref.shape == cand.shape:
                checks.append(_neighbour_check(name, ref, cand, selection, limits))
            else:
                sets = out_spec.name == "nbr"
                checks.append(_check(name, ref, cand, rtol, sets, limits))
    return checks


def _neighbour_check(
    name: str,
    ref: torch.Tensor,
    cand: torch.Tensor,
    selection: dict[str, tuple[torch.Tensor, torch.Tensor]],
    limits: dict[str, float] | None,
) -> Check:
    """Neighbour sets compared per pruned token, as token positions.

    The row form holds one pool per row: ``nbr[b, r]`` are indices into row ``b``'s kept
    tokens for its ``r``-th pruned token. Mapped through each side's own keep / drop
    indices, sets stay comparable when the two sides kept different tokens; a reference
    pruned token the candidate did not prune counts as differing.
    """
    (ref_keep, cand_keep), (ref_drop, cand_drop) = selection["keep_idx"], selection["drop_idx"]
    bad = 0
    for b in range(ref.shape[0]):
        theirs = {
            int(t): set(cand_keep[b, cand[b, r]].tolist()) for r, t in enumerate(cand_drop[b])
        }
        bad += sum(
            theirs.get(int(t)) != set(ref_keep[b, ref[b, r]].tolist())
            for r, t in enumerate(ref_drop[b])
        )
    units = ref.shape[0] * ref.shape[1]
    allowed = 0 if limits is None else limits["index_mismatch"] * units
    return Check(name, "index", tuple(ref.shape), 0.0, 0.0, 1.0, bad, bad <= allowed)
