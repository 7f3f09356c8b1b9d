"""Native resolution: the Qwen towers' own call (``pixel_values [num_patches, 1176]`` +
``image_grid_thw``) exported once, run at any grid in range, equal to PyTorch everywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from ipcv_deploy import IPCVConfig, apply_ipcv
from ipcv_deploy.backends.onnxruntime_backend import OrtBackend
from ipcv_deploy.backends.torch_backend import RowEncoder, TorchBackend
from ipcv_deploy.backends.verify import native_cases, verify_artifact
from ipcv_deploy.cli import main
from ipcv_deploy.errors import ConfigError, InputError
from ipcv_deploy.export import PixelRange
from ipcv_deploy.models import load_model
from ipcv_deploy.ops import token_select
from ipcv_deploy.parity import compare
from ipcv_deploy.trt.check import check_model
from ipcv_deploy.trt.engine import Profile, check_profiles, default_profiles
from tests.conftest import NATIVE_MAX_PIXELS

QWEN = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")
FIXED = ("tiny-internvl", "tiny-llava", "tiny-paligemma")
RANGE = PixelRange(56 * 56, NATIVE_MAX_PIXELS)
#: Grids (patch rows, columns) with short last windows, 1-unit sides and odd unit counts.
GRIDS = [(2, 2), (2, 30), (30, 2), (6, 10), (16, 16), (18, 26), (10, 34), (32, 8)]


@pytest.fixture(params=QWEN)
def native_artifact(request, exports):
    return exports(request.param, native=RANGE, return_indices=True)


@pytest.mark.parametrize("name", QWEN)
def test_grid_positions_and_windows_in_closed_form_equal_transformers(name):
    """The graph's arithmetic on the token index gives transformers' RoPE positions and (2.5)
    window order at every grid, so no data-dependent shape is needed."""
    loaded = load_model(name)
    adapter = loaded.adapter(loaded.vision)
    cfg = loaded.vision.config
    for grid in GRIDS:
        grid_thw = torch.tensor([[1, *grid]])
        layout = adapter._native_layout(grid_thw, grid[0] * grid[1])
        positions = get_vision_position_ids(grid_thw, 2)
        cos, sin = loaded.vision.rotary_pos_emb(loaded.vision.patch_embed.proj.weight, positions)
        if name == "tiny-qwen2-vl":
            assert torch.equal(layout.cos, cos) and torch.equal(layout.sin, sin), grid
            continue
        order, cu_windows = get_vision_window_index(grid_thw, 2, cfg.window_size, cfg.patch_size)
        assert torch.equal(layout.order, order), grid
        tokens = torch.arange(grid[0] * grid[1])
        assert torch.equal(
            layout.window_ids, torch.bucketize(tokens, cu_windows[1:].long(), right=True)
        ), grid


def test_ratio_selection_equals_the_fixed_count():
    """TokenSelect with P derived from N (keep_num / keep_den) keeps what the fixed count keeps."""
    config = IPCVConfig(keep_ratio=0.35)
    num, den = config.keep_fraction
    assert (num, den) == (7, 20)
    gen = torch.Generator().manual_seed(0)
    for tokens in (20, 40, 64, 257, 1020):
        h_prev, h_cur = torch.randn(2, 2, tokens, 8, generator=gen)
        fixed = token_select(h_prev, h_cur, config.kept_count(tokens))
        ratio = token_select(h_prev, h_cur, 0, 0, num, den)
        assert all(torch.equal(a, b) for a, b in zip(fixed, ratio, strict=True)), tokens


def test_native_graph_io_is_the_towers_call(native_artifact):
    manifest = native_artifact.manifest
    pixels, grid = manifest.inputs
    assert (pixels.name, pixels.shape) == ("pixel_values", ("num_patches", 1176))
    assert (grid.name, grid.dtype, grid.shape) == ("image_grid_thw", "int64", (1, 3))
    assert manifest.outputs[0].shape[0] == "num_image_tokens"
    assert manifest.native["min_tokens"] == 32 and manifest.native["max_tokens"] == 512
    model = onnx.load(str(native_artifact.flavour_file("trt")), load_external_data=False)
    selects = [n for n in model.graph.node if n.op_type == "TokenSelect"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in selects[0].attribute}
    assert (attrs["num_keep"], attrs["keep_num"], attrs["keep_den"]) == (0, 7, 20)
    assert check_model(model).passed, "the static TensorRT check refuses the dynamic graph"


def test_verify_at_many_grids_two_images_and_polygraphy(native_artifact, tmp_path):
    """verify: every grid case passes; its saved inputs / reference then pass ``polygraphy run
    vision.onnx --onnxrt`` (polygraphy's own comparator on the function-body graph)."""
    report = verify_artifact(native_artifact, polygraphy_dir=tmp_path)
    assert report.passed, [c for c in report.outputs + report.ops if not c.passed]
    names = [c.name.split("/")[0] for c in report.outputs if c.name.endswith("image_embeds")]
    assert len(report.outputs) == 2 * len(names)  # image_embeds and keep_idx of every case
    assert [n.split()[0] for n in names] == ["square", "16:9", "9:16", "smallest", "largest", "two"]
    assert "smallest 4x8" in names and "largest 16x32" in names  # the range's two ends, exact
    # ipcv ops compared on every single-image case (not on the two-image call)
    assert {c.name.split("/")[0] for c in report.ops} == set(names[:5])
    assert all(c.mismatched == 0 for c in report.ops if c.kind == "index")
    # the script beside this interpreter (its venv need not be on PATH)
    polygraphy = shutil.which("polygraphy", path=str(Path(sys.executable).parent))
    assert polygraphy, "polygraphy's command is not installed beside this Python"
    command = [
        polygraphy, "run", str(native_artifact.flavour_file("ort")), "--onnxrt",
        "--load-inputs", str(tmp_path / "inputs.json"),
        "--load-outputs", str(tmp_path / "reference.json"),
        "--atol", "1e-5", "--rtol", "1e-4",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASSED" in run.stdout


@pytest.mark.parametrize("name", QWEN)
def test_a_plain_session_on_the_processors_output_equals_apply_ipcv(name, exports):
    """The model's own image processor -> onnxruntime by input name (no project code) equals
    ``apply_ipcv`` on the stock transformers tower, at several image sizes."""
    import onnxruntime

    artifact = exports(name, native=RANGE, return_indices=True)
    session = onnxruntime.InferenceSession(str(artifact.flavour_file("ort")))
    native = artifact.manifest.native  # the processor bounded to the artifact's range
    processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": native["min_pixels"], "longest_edge": native["max_pixels"]},
    )
    loaded = load_model(name)
    apply_ipcv(loaded.vision, loaded.adapter.reference_ipcv())
    rng = np.random.default_rng(0)
    for width, height in ((640, 360), (300, 420), (224, 224), (90, 60)):
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        batch = processor(images=[image], return_tensors="np")
        (got,) = session.run(
            ["image_embeds"],
            {
                "pixel_values": batch["pixel_values"].astype(np.float32),
                "image_grid_thw": batch["image_grid_thw"].astype(np.int64),
            },
        )
        with torch.no_grad():
            want = loaded.vision(
                torch.from_numpy(batch["pixel_values"]).float(),
                grid_thw=torch.from_numpy(batch["image_grid_thw"]),
            ).pooler_output
        agreement = compare(want, torch.from_numpy(got))
        assert agreement.max_rel < 1e-5, (width, height, agreement)


@pytest.mark.parametrize("name", QWEN)
def test_keep_1_equals_the_dense_tower_at_every_grid(name):
    """keep 1.0 in the native form (what is exported) equals the stock tower at every grid."""
    loaded = load_model(name)
    keep_all = RowEncoder(loaded, IPCVConfig(keep_ratio=1.0), native=True)
    for grid in [*GRIDS, (16, 32)]:
        pixels, grid_thw = keep_all.inputs(1, 0, grid)
        with torch.no_grad():
            stock = loaded.vision(pixels, grid_thw=grid_thw).pooler_output
            eager = keep_all(pixels, grid_thw)[0]
        assert compare(stock, eager).max_rel < 1e-5, grid


@pytest.mark.parametrize("name", FIXED)
def test_fixed_tile_families_take_any_number_of_tiles(name, exports):
    """Dim 0 of a fixed-size export is the processor's images / tiles: one tile and five
    (verify covers 2 and 3) equal PyTorch."""
    artifact = exports(name, return_indices=True)
    assert artifact.manifest.inputs[0].shape[0] == "batch"
    loaded = load_model(name)
    encoder = RowEncoder(loaded, loaded.adapter.reference_ipcv(), return_indices=True)
    backend = OrtBackend(artifact)
    for tiles in (1, 5):
        (pixels,) = encoder.inputs(tiles, seed=tiles)
        want = TorchBackend(encoder)(pixels)
        got = backend(pixels)
        assert compare(want["image_embeds"], got["image_embeds"]).max_rel < 1e-5, tiles
        assert torch.equal(want["keep_idx"], got["keep_idx"]), tiles


def test_bad_grids_are_one_line_errors_naming_the_range(native_artifact):
    backend = OrtBackend(native_artifact)
    encoder = RowEncoder(load_model(native_artifact.manifest.source["preset"]), None, native=True)
    pixels, _ = encoder.inputs(1, 0, (16, 16))
    cases = [
        (pixels, torch.tensor([[1, 16, 14]]), "do not match image_grid_thw"),
        (pixels[:255], torch.tensor([[1, 15, 17]]), "not divisible by the merge size 2"),
        (
            torch.zeros(2 * 1024, 1176),
            torch.tensor([[1, 32, 64]]),
            "outside this artifact's 32..512",
        ),
        (pixels[:4], torch.tensor([[1, 2, 2]]), "outside this artifact's 32..512"),
        (torch.cat([pixels, pixels]), torch.tensor([[2, 16, 16]]), "holds a video"),
        (pixels, torch.tensor([1, 16, 16]), "must be [num_images, 3]"),
    ]
    for values, bad_grid, message in cases:
        with pytest.raises(InputError, match=message.replace("[", r"\[")) as caught:
            backend(values, bad_grid)
        assert "\n" not in str(caught.value)
    with pytest.raises(InputError, match="pass image_grid_thw"):
        backend(pixels)


def test_native_engine_profiles_are_image_tokens():
    native = {"min_tokens": 32, "max_tokens": 1020, "merge_size": 2}
    assert default_profiles(native, 1024) == (Profile(32, 1020, 1020),)
    assert default_profiles(native, 256) == (Profile(32, 256, 1020),)
    assert default_profiles(None, 256) == (Profile(1, 1, 4),)
    check_profiles((Profile(32, 256, 512), Profile(516, 800, 1020)), native)
    for bad in (Profile(16, 256, 1020), Profile(32, 256, 2048), Profile(32, 255, 1020)):
        with pytest.raises(ConfigError, match=r"within 32\.\.1020"):
            check_profiles((bad,), native)


def test_torch_backend_runs_several_images_of_different_sizes(native_artifact):
    loaded = load_model(native_artifact.manifest.source["preset"])
    encoder = RowEncoder(loaded, loaded.adapter.reference_ipcv(), native=True)
    cases = native_cases(native_artifact.manifest.native, (224, 224), 4096)
    grids = dict(cases)["two images"]
    parts = [encoder.inputs(1, i, g) for i, g in enumerate(grids)]
    together = TorchBackend(encoder)(
        torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
    )
    alone = [TorchBackend(encoder)(p, g)["image_embeds"] for p, g in parts]
    assert torch.equal(together["image_embeds"], torch.cat(alone))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "tiny-internvl", "--image-size", "native"], "takes images of one size"),
        (["--model", "tiny-internvl", "--max-pixels", "100000"], "takes images of one size"),
        (
            ["--model", "tiny-qwen2-vl", "--image-size", "224x224", "--min-pixels", "1000"],
            "bound a native-resolution export",
        ),
        (
            ["--model", "tiny-qwen2-vl", "--min-pixels", "90000", "--max-pixels", "50000"],
            "is below --min-pixels",
        ),
        (
            ["--model", "tiny-qwen2-vl", "--min-pixels", "100", "--max-pixels", "3000"],
            "no image between min_pixels",
        ),
    ],
)
def test_native_export_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", *argv, "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("error: ") and message in last
    assert not out.exists() and list(tmp_path.iterdir()) == []
