"""Qwen2-VL / Qwen2.5-VL videos through the runtime: frames, the tower, stitching, answers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers.utils import is_torchvision_available

from ipcv_deploy.backends import RowEncoder, TorchBackend
from ipcv_deploy.cli import main
from ipcv_deploy.errors import BackendUnavailableError, InputError
from ipcv_deploy.export import PixelRange
from ipcv_deploy.models import load_model
from ipcv_deploy.runtime import SamplingConfig, VLMPipeline
from ipcv_deploy.runtime.evaluate import load_items
from ipcv_deploy.runtime.generate import generate
from ipcv_deploy.runtime.images import load_video
from ipcv_deploy.runtime.pipeline import EncodedBatch
from ipcv_deploy.runtime.testcard import make_test_card
from tests.conftest import NATIVE_MAX_PIXELS

QWEN = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")
#: Two videos and an image in one call: 2 and 3 temporal patches.
GRIDS = [[2, 8, 12], [1, 6, 8], [3, 4, 4]]


def _pixels(grid: list[list[int]], seed: int = 0) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grid)
    return torch.randn(rows, 1176, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", QWEN)
def test_torch_backend_encodes_videos_as_the_tower_does(name: str) -> None:
    """Videos (t > 1) next to an image in one call: dense and keep 1.0 equal the transformers
    tower; IPCV keeps floor(h * w * keep) of every frame."""
    loaded = load_model(name)
    grid = torch.tensor(GRIDS)
    pixels = _pixels(GRIDS)
    with torch.no_grad():
        reference = loaded.model.model.visual(pixels, grid_thw=grid).pooler_output
    keep_all = dataclasses.replace(loaded.adapter.reference_ipcv(), keep_ratio=1.0)
    for config in (None, keep_all):
        encoder = TorchBackend(RowEncoder(loaded, config, native=True))
        torch.testing.assert_close(encoder(pixels, grid)["image_embeds"], reference)
    config = loaded.adapter.reference_ipcv()
    ipcv = TorchBackend(RowEncoder(loaded, config, native=True, return_indices=True))
    kept = ipcv(pixels, grid)["keep_idx"].shape[-1]
    assert kept == sum(t * config.kept_count(h * w) for t, h, w in GRIDS)


def _video_batch(pipeline: VLMPipeline, grid: tuple[int, int, int], prompts: list[str]) -> dict:
    """What the model's processor makes of a video of ``grid`` per prompt (random pixels):
    the placeholder expanded to the video's tokens, left-padded, with the processor's own
    mm_token_type_ids (its video path needs torchvision: this is the path without)."""
    merge = pipeline.loaded.vision.spatial_merge_size**2
    video = pipeline.processor.video_token
    tokens = grid[0] * grid[1] * grid[2] // merge
    texts = [
        pipeline.format_prompt(p, images=0, videos=1).replace(video, video * tokens)
        for p in prompts
    ]
    tokenizer = pipeline.processor.tokenizer
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    types = pipeline.processor.create_mm_token_type_ids(batch["input_ids"].tolist())
    batch["mm_token_type_ids"] = torch.tensor(types)
    batch["pixel_values_videos"] = _pixels([list(grid)] * len(prompts))
    batch["video_grid_thw"] = torch.tensor([list(grid)] * len(prompts))
    return batch


@pytest.mark.parametrize("name", QWEN)
def test_video_prompts_generate_what_the_hf_model_does(name: str) -> None:
    """A batch of video prompts (keep 1.0), encoded by the vision backend and stitched into
    the video placeholders with the model's video mRoPE positions: token for token the
    transformers model's generate on the same processor outputs."""
    loaded = load_model(name)
    keep_all = dataclasses.replace(loaded.adapter.reference_ipcv(), keep_ratio=1.0)
    pipeline = VLMPipeline.create(loaded, ipcv=keep_all)
    prompts = ["What happens?", "Describe the video, please."]
    grid = (2, 8, 12)
    batch = _video_batch(pipeline, grid, prompts)
    assert int((batch["mm_token_type_ids"] == 2).sum()) == 2 * 48  # video rows
    reference = loaded.model.generate(**batch, max_new_tokens=6, do_sample=False)
    embeds = pipeline.vision.backend(batch["pixel_values_videos"], batch["video_grid_thw"])
    no_images = torch.zeros(0, loaded.model.get_input_embeddings().embedding_dim)
    encoded = EncodedBatch(
        batch, no_images, [], [0, 0], [], {}, embeds["image_embeds"], [grid, grid]
    )
    inputs, _ = pipeline.stitch(encoded)
    assert int(inputs.image_mask.sum()) == 2 * 48  # LLM-side pruning sees the video tokens
    ours = generate(pipeline.model, inputs, SamplingConfig(6))
    assert torch.equal(ours.tokens, reference[:, batch["input_ids"].shape[1] :])
    ipcv = VLMPipeline.create(loaded, ipcv=loaded.adapter.reference_ipcv())
    visual = ipcv.visual_tokens(encoded)
    kept = loaded.adapter.reference_ipcv().kept_count(96)
    assert visual == {"vit_input": 192, "vit_kept": 2 * kept, "llm_input": 48}


def _frames(count: int = 4, size: tuple[int, int] = (112, 84)) -> list[Image.Image]:
    return [make_test_card(*size).rotate(15 * i) for i in range(count)]


def test_frames_from_a_folder_an_animation_or_a_list(tmp_path: Path) -> None:
    frames = _frames()
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:])
    for source in (folder, tmp_path / "clip.gif", frames):
        loaded = load_video(source)
        assert len(loaded) == 4 and {f.size for f in loaded} == {(84, 112)}
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    frames[0].save(mixed / "0.png")
    make_test_card(64, 64).save(mixed / "1.png")
    (tmp_path / "text.gif").write_text("no")
    cases = [
        (tmp_path / "missing", "video not found"),
        (tmp_path / "empty", "holds no frames"),
        (mixed, "differ in size (64x64, 84x112)"),
        (tmp_path / "text.gif", "cannot read video"),
    ]
    for source, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_video(source)


def test_videos_are_refused_where_they_cannot_run(exports, tmp_path: Path, capsys) -> None:
    frames = _frames()
    tiles = VLMPipeline.create("tiny-internvl")
    with pytest.raises(InputError, match=r"InternVL.* takes no videos"):
        tiles.run([[]], ["What happens?"], SamplingConfig(2), videos=[frames])
    fixed = VLMPipeline.create("tiny-qwen2-vl", image_size=(112, 112))
    with pytest.raises(InputError, match="videos need a native-resolution encoder"):
        fixed.run([[]], ["What happens?"], SamplingConfig(2), videos=[frames])
    artifact = exports(
        "tiny-qwen2-vl", native=PixelRange(56 * 56, NATIVE_MAX_PIXELS), return_indices=True
    ).path
    exported = VLMPipeline.create("tiny-qwen2-vl", vision_backend="ort", artifact=artifact)
    with pytest.raises(InputError, match="run videos with --vision-backend torch"):
        exported.run([[]], ["What happens?"], SamplingConfig(2), videos=[frames])
    pipeline = VLMPipeline.create("tiny-qwen2-vl")
    with pytest.raises(InputError, match="needs at least one image"):
        pipeline.run([[]], ["What happens?"], SamplingConfig(2))
    if not is_torchvision_available():
        with pytest.raises(BackendUnavailableError, match="needs torchvision"):
            pipeline.run([[]], ["What happens?"], SamplingConfig(2), videos=[frames])
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"{i}.png")
    argv = ["run", "--model", "tiny-qwen2-vl", "--video", str(folder), "--max-new-tokens", "2"]
    cases = [
        (["--llm-backend", "ort-genai"], "--video: not an option of --llm-backend ort-genai"),
        (["--llm-backend", "vllm"], "--video runs on --llm-backend transformers, not vllm"),
        (["--image-size", "112x112"], "videos need a native-resolution encoder"),
    ]
    for extra, message in cases:
        assert main([*argv, *extra]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    (tmp_path / "vqa.jsonl").write_text(_video_item("clip"))
    (item,) = load_items(tmp_path)
    assert (item.image, item.video) == ((), folder)
    if not is_torchvision_available():
        assert main(["eval", str(tmp_path), "--model", "tiny-qwen2-vl"]) == 2
        assert "needs torchvision" in capsys.readouterr().err


def _video_item(video: str) -> str:
    return json.dumps({"video": video, "question": "What happens?", "answer": "bars"}) + "\n"


@pytest.mark.skipif(
    not is_torchvision_available(), reason="transformers' video processor needs torchvision"
)
@pytest.mark.parametrize("name", QWEN)
def test_video_through_the_models_own_processor(name: str, tmp_path: Path) -> None:
    """With torchvision: the processor's own video path (frames through the temporal patch),
    a video after an image, keep 1.0: token for token the transformers model's generate;
    `run --video` answers."""
    loaded = load_model(name)
    keep_all = dataclasses.replace(loaded.adapter.reference_ipcv(), keep_ratio=1.0)
    pipeline = VLMPipeline.create(loaded, ipcv=keep_all)
    frames, image = _frames(), make_test_card(224, 168)
    prompts = ["What happens?", "And here?"]
    texts = [pipeline.format_prompt(prompts[0], images=1, videos=1)]
    texts.append(pipeline.format_prompt(prompts[1], images=0, videos=1))
    batch = pipeline.processor(
        text=texts, images=[image], videos=[frames, frames[:2]], return_tensors="pt", padding=True
    )
    inputs = {k: v for k, v in batch.items()}
    reference = loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    ours = pipeline.run([[image], []], prompts, SamplingConfig(6), videos=[frames, frames[:2]])
    assert torch.equal(ours.tokens, reference[:, batch["input_ids"].shape[1] :])
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert ours.stats["visual_tokens"]["vit_input"] == 168 // 14 * 224 // 14 + t * h * w
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"{i}.png")
    assert main(["run", "--model", name, "--video", str(folder), "--max-new-tokens", "2"]) == 0
    (tmp_path / "vqa.jsonl").write_text(_video_item("clip"))
    assert main(["eval", str(tmp_path), "--model", name, "--max-new-tokens", "2"]) == 0
