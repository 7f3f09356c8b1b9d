"""The runtime end to end on the tiny presets: processor, vision backends, stitch, answers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ipcv_deploy import IPCVConfig
from ipcv_deploy.cli import main
from ipcv_deploy.compression.llm_pruning import LLMPruningConfig
from ipcv_deploy.errors import ArtifactError, ConfigError, InputError
from ipcv_deploy.models import load_model
from ipcv_deploy.runtime import SamplingConfig, VLMPipeline, load_image
from ipcv_deploy.runtime.evaluate import evaluate, load_items, score_answer
from ipcv_deploy.runtime.generate import generate
from ipcv_deploy.runtime.testcard import make_test_card
from tests.conftest import NATIVE_MAX_PIXELS

RUNTIME_PRESETS = (
    "tiny-qwen2-vl",
    "tiny-qwen2.5-vl",
    "tiny-internvl",
    "tiny-llava",
    "tiny-llava-next",
    "tiny-paligemma",
)
PROMPTS = ["What is this?", "Count the colour bars from left to right, please."]


def _images(pipeline: VLMPipeline) -> list:
    """Two images at the encoder's size; anyres models get two of their own sizes."""
    if pipeline.loaded.adapter.anyres:
        return _native_cards()
    h, w = pipeline.vision.image_size
    return [make_test_card().resize((w, h)), make_test_card(120, 90).resize((w, h))]


def _hf_generate(pipeline: VLMPipeline, batch, tokens: int) -> torch.Tensor:
    """The transformers model's own greedy ``generate`` on a processor batch: new tokens."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}  # PaliGemma's training labels
    out = pipeline.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out[:, batch["input_ids"].shape[1] :]


@pytest.mark.parametrize("name", RUNTIME_PRESETS)
def test_ipcv_keep_all_generates_what_the_dense_hf_model_does(name: str) -> None:
    """IPCV at keep 1.0, no LLM pruning: token for token the transformers model's generate,
    on a left-padded batch, from the model's own processor outputs."""
    loaded = load_model(name)
    keep_all = dataclasses.replace(loaded.adapter.reference_ipcv(), keep_ratio=1.0)
    pipeline = VLMPipeline.create(loaded, ipcv=keep_all)
    images = _images(pipeline)
    texts = [pipeline.format_prompt(p) for p in PROMPTS]
    batch = pipeline.processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert int(batch["attention_mask"].sum(1).min()) < batch["input_ids"].shape[1]  # padded
    ours = pipeline.run(images, PROMPTS, SamplingConfig(6))
    assert torch.equal(ours.tokens, _hf_generate(pipeline, batch, 6))
    assert ours.stats["visual_tokens"]["vit_kept"] == ours.stats["visual_tokens"]["vit_input"]


def test_batch_equals_single_prompts_with_ipcv_and_dart() -> None:
    pipeline = VLMPipeline.create(
        "tiny-qwen2-vl",
        ipcv=load_model("tiny-qwen2-vl").adapter.reference_ipcv(),
        llm_pruning=LLMPruningConfig("dart", 0.35),
    )
    images = _images(pipeline)
    together = pipeline.run(images, PROMPTS, SamplingConfig(5))
    for b in range(2):
        alone = pipeline.run([images[b]], [PROMPTS[b]], SamplingConfig(5))
        assert torch.equal(together.tokens[b], alone.tokens[0])
        assert alone.answers[0] == together.answers[b]
    vt = together.stats["visual_tokens"]
    assert (vt["vit_input"], vt["llm_input"], vt["llm_kept"]) == (256, 64, 4 + 8 * 2)
    assert together.stats["llm_pruning"]["layer"] == 3  # DART after IPCV
    kv = together.stats["kv"]
    assert kv["tokens_after_prefill"] == kv["prompt_tokens"] - (64 - 20)


@pytest.fixture
def qwen_artifact(exports) -> Path:
    return exports("tiny-qwen2-vl", return_indices=True).path


def test_onnxruntime_vision_answers_like_torch(qwen_artifact: Path) -> None:
    loaded = load_model("tiny-qwen2-vl")
    ort = VLMPipeline.create(loaded, vision_backend="ort", artifact=qwen_artifact)
    torch_ = VLMPipeline.create(loaded, ipcv=loaded.adapter.reference_ipcv())
    images = _images(ort)
    a = ort.run(images, PROMPTS, SamplingConfig(6))
    b = torch_.run(images, PROMPTS, SamplingConfig(6))
    assert torch.equal(a.tokens, b.tokens)
    assert a.stats["vision_backend"] == "onnxruntime"
    assert a.stats["visual_tokens"] == b.stats["visual_tokens"]


def _native_cards() -> list[Image.Image]:
    """Two images of their own sizes (not resized): 320 and 48 patches after smart_resize."""
    return [make_test_card(224, 280), make_test_card(90, 120)]


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_native_resolution_generates_what_the_hf_model_does(name: str) -> None:
    """Qwen at native resolution (the default): each image at its own smart_resize grid, keep
    1.0, token for token the transformers model's generate on the processor's outputs."""
    loaded = load_model(name)
    keep_all = dataclasses.replace(loaded.adapter.reference_ipcv(), keep_ratio=1.0)
    pipeline = VLMPipeline.create(loaded, ipcv=keep_all)
    assert pipeline.vision.native
    images = _native_cards()
    texts = [pipeline.format_prompt(p) for p in PROMPTS]
    batch = pipeline.processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert batch["image_grid_thw"].tolist() == [[1, 16, 20], [1, 6, 8]]
    ref = loaded.model.generate(**batch, max_new_tokens=6, do_sample=False)
    ours = pipeline.run(images, PROMPTS, SamplingConfig(6))
    assert torch.equal(ours.tokens, ref[:, batch["input_ids"].shape[1] :])
    assert ours.stats["visual_tokens"]["vit_input"] == 320  # the first prompt's image


@pytest.mark.parametrize("name", RUNTIME_PRESETS)
def test_several_images_per_prompt_generate_what_the_hf_model_does(name: str) -> None:
    """Two images in one prompt, one in the other, keep 1.0: token for token the
    transformers model's generate on the processor's outputs; IPCV then counts each image's
    kept tokens on its own."""
    loaded = load_model(name)
    keep_all = dataclasses.replace(loaded.adapter.reference_ipcv(), keep_ratio=1.0)
    pipeline = VLMPipeline.create(loaded, ipcv=keep_all)
    a, b = _native_cards() if pipeline.vision.native else _images(pipeline)
    groups = [[a, b], [b]]
    texts = [pipeline.format_prompt(p, images=len(g)) for p, g in zip(PROMPTS, groups, strict=True)]
    batch = pipeline.processor(text=texts, images=groups, return_tensors="pt", padding=True)
    ours = pipeline.run(groups, PROMPTS, SamplingConfig(6))
    assert torch.equal(ours.tokens, _hf_generate(pipeline, batch, 6))
    one = [pipeline.run([[image]], PROMPTS[:1], SamplingConfig(1)) for image in (a, b)]
    vt = ours.stats["visual_tokens"]  # the first prompt: both images
    for key in ("vit_input", "llm_input"):
        assert vt[key] == sum(r.stats["visual_tokens"][key] for r in one)
    ipcv = VLMPipeline.create(loaded, ipcv=loaded.adapter.reference_ipcv())
    vt = ipcv.run(groups, PROMPTS, SamplingConfig(1)).stats["visual_tokens"]
    kept = [ipcv.run([image], PROMPTS[:1], SamplingConfig(1)) for image in (a, b)]
    assert vt["vit_kept"] == sum(r.stats["visual_tokens"]["vit_kept"] for r in kept)


def test_internvl_dynamic_tiles_generate_what_the_hf_model_does(exports) -> None:
    """InternVL keeps its processor's dynamic tiling (a 4:3 image: 12 tiles + a thumbnail):
    keep 1.0 is token for token the transformers model's generate; IPCV keeps its count per
    tile; the exported encoder (a tile per row, any number of rows) answers like torch."""
    loaded = load_model("tiny-internvl")
    reference = loaded.adapter.reference_ipcv()
    pipeline = VLMPipeline.create(loaded, ipcv=dataclasses.replace(reference, keep_ratio=1.0))
    assert pipeline.vision.tiles and pipeline.vision.image_size == (112, 112)
    images = [make_test_card(), make_test_card(112, 112)]  # 448x336: 13 tiles; 112x112: 1
    texts = [pipeline.format_prompt(p) for p in PROMPTS]
    batch = pipeline.processor(text=texts, images=images, return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape[0] == 14
    ref = loaded.model.generate(**batch, max_new_tokens=6, do_sample=False)
    ours = pipeline.run(images, PROMPTS, SamplingConfig(6))
    assert torch.equal(ours.tokens, ref[:, batch["input_ids"].shape[1] :])
    assert ours.stats["visual_tokens"]["vit_input"] == 13 * pipeline.vision.tokens_per_image
    ipcv = VLMPipeline.create(loaded, ipcv=reference)
    artifact = exports("tiny-internvl", return_indices=True).path
    ort = VLMPipeline.create(loaded, vision_backend="ort", artifact=artifact)
    assert ort.vision.tiles
    a, b = (p.run(images, PROMPTS, SamplingConfig(6)) for p in (ort, ipcv))
    assert torch.equal(a.tokens, b.tokens)
    assert a.stats["visual_tokens"] == b.stats["visual_tokens"]
    assert b.stats["visual_tokens"]["vit_kept"] == 13 * ipcv.vision.kept_per_image
    fixed = VLMPipeline.create(loaded, ipcv=reference, image_size=(112, 112))
    assert not fixed.vision.tiles  # --image-size: one tile of that size per image
    assert fixed.run(images, PROMPTS, SamplingConfig(1)).stats["visual_tokens"]["vit_input"] == (
        fixed.vision.tokens_per_image
    )


def test_llava_next_anyres_tiles_through_torch_and_onnxruntime(exports) -> None:
    """LLaVA-NeXT keeps its processor's anyres tiles (base image + crops) and the model's own
    packing (unpad, image_newline); the exported tile encoder answers like torch IPCV, which
    counts its kept tokens per tile."""
    loaded = load_model("tiny-llava-next")
    reference = loaded.adapter.reference_ipcv()
    ipcv = VLMPipeline.create(loaded, ipcv=reference)
    artifact = exports("tiny-llava-next", return_indices=True).path
    ort = VLMPipeline.create(loaded, vision_backend="ort", artifact=artifact)
    assert ort.vision.tiles and ipcv.vision.tiles
    images = _native_cards()  # 224x280 and 90x120: 5 and 3 tiles
    a, b = (p.run(images, PROMPTS, SamplingConfig(6)) for p in (ort, ipcv))
    assert torch.equal(a.tokens, b.tokens)
    assert a.stats["visual_tokens"] == b.stats["visual_tokens"]
    vt = b.stats["visual_tokens"]
    assert (vt["vit_input"], vt["vit_kept"]) == (5 * 65, 5 * ipcv.vision.kept_per_image)
    assert vt["llm_input"] == ipcv.encode(images[:1], PROMPTS[:1]).tokens_per_image[0]


def _prefill_logits(pipeline: VLMPipeline, prefix_lm: bool = True) -> torch.Tensor:
    inputs, _ = pipeline.prepare(_images(pipeline), PROMPTS)
    if not prefix_lm:
        inputs = dataclasses.replace(inputs, prefix_blocks=None)
    gen = generate(pipeline.model, inputs, SamplingConfig(1), return_scores=True)
    return gen.scores[:, 0]


def test_paligemma_prefill_uses_its_prefix_lm_mask(exports) -> None:
    """PaliGemma's image and prompt attend to each other both ways at prefill: the first
    token's logits equal the model's own forward (1e-5), and differ from a causal prefill.
    LLM-side pruning runs on that mask, a batch as its prompts one at a time; its exported
    encoder answers like torch IPCV."""
    loaded = load_model("tiny-paligemma")
    pipeline = VLMPipeline.create(loaded)
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "caption"}]}
    assert pipeline.chat_prompt([user]) == pipeline.format_prompt("caption") == "<image>caption"
    with pytest.raises(InputError, match="has no chat template"):  # the server's messages
        pipeline.chat_prompt([user, {"role": "assistant", "content": "a"}, user])
    batch = pipeline.processor(
        text=[pipeline.format_prompt(p) for p in PROMPTS],
        images=_images(pipeline),
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        reference = loaded.model(**inputs).logits[:, -1]
    ours = _prefill_logits(pipeline)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (_prefill_logits(pipeline, prefix_lm=False) - reference).abs().max() > 1e-3
    dart = VLMPipeline.create(
        loaded, ipcv=loaded.adapter.reference_ipcv(), llm_pruning=LLMPruningConfig("dart", 0.35)
    )
    images = _images(dart)
    together = dart.run(images, PROMPTS, SamplingConfig(4))
    for b in range(2):
        alone = dart.run([images[b]], [PROMPTS[b]], SamplingConfig(4))
        assert torch.equal(together.tokens[b, : alone.tokens.shape[1]], alone.tokens[0])
    artifact = exports("tiny-paligemma", return_indices=True).path
    ort = VLMPipeline.create(loaded, vision_backend="ort", artifact=artifact)
    ipcv = VLMPipeline.create(loaded, ipcv=loaded.adapter.reference_ipcv())
    onnx, eager = (p.run(images, PROMPTS, SamplingConfig(4)) for p in (ort, ipcv))
    assert torch.equal(onnx.tokens, eager.tokens)
    assert onnx.stats["visual_tokens"] == eager.stats["visual_tokens"]


def test_native_artifact_answers_like_torch(exports) -> None:
    from ipcv_deploy.export import PixelRange

    artifact = exports(
        "tiny-qwen2-vl", native=PixelRange(56 * 56, NATIVE_MAX_PIXELS), return_indices=True
    )
    loaded = load_model("tiny-qwen2-vl")
    ort = VLMPipeline.create(loaded, vision_backend="ort", artifact=artifact.path)
    torch_ = VLMPipeline.create(loaded, ipcv=loaded.adapter.reference_ipcv())
    assert ort.vision.native and ort.vision.pixel_range == (6272, NATIVE_MAX_PIXELS)
    images = _native_cards()
    a = ort.run(images, PROMPTS, SamplingConfig(6))
    b = torch_.run(images, PROMPTS, SamplingConfig(6))
    assert torch.equal(a.tokens, b.tokens)
    assert a.stats["visual_tokens"] == b.stats["visual_tokens"]
    big = make_test_card(700, 900)  # smart_resize keeps it inside the artifact's range
    assert ort.run([big], PROMPTS[:1], SamplingConfig(2)).stats["visual_tokens"]["vit_input"] <= 512


def test_artifact_of_another_model_is_refused(qwen_artifact: Path) -> None:
    with pytest.raises(ArtifactError, match=r"does not belong to this model.*seed 1"):
        VLMPipeline.create(
            load_model("tiny-qwen2-vl", seed=1), vision_backend="ort", artifact=qwen_artifact
        )
    with pytest.raises(ArtifactError, match="Qwen2-VL encoder, the LLM is InternVL"):
        VLMPipeline.create("tiny-internvl", vision_backend="ort", artifact=qwen_artifact)


def test_prompt_placeholder_rules() -> None:
    pipeline = VLMPipeline.create("tiny-llava")
    assert pipeline.format_prompt("hi").count("<image>") == 1
    assert pipeline.format_prompt("USER: <image>\nhi ASSISTANT:", raw=True)
    with pytest.raises(InputError, match="needs exactly one"):
        pipeline.format_prompt("no image here", raw=True)
    assert pipeline.format_prompt("hi", images=2).count("<image>") == 2
    with pytest.raises(InputError, match=r"needs one per image \(2\)"):
        pipeline.format_prompt("USER: <image>\nhi ASSISTANT:", raw=True, images=2)
    with pytest.raises(InputError, match="the chat template adds it"):
        pipeline.format_prompt("<image> twice")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_run_cli_streams_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "card.png"
    make_test_card().save(image)
    code, out, _ = _cli(
        capsys, "run", "--image", str(image), "--llm-pruning", "fastv", "--max-new-tokens", "4"
    )
    assert code == 0
    assert "answer: " in out and "time to first token" in out and "KV cache" in out
    # native resolution: the 448x336 card keeps its aspect, a 32x24 patch grid
    assert "ViT 768 -> 268 in the IPCV blocks -> 192 to the LLM -> 67 after LLM pruning" in out
    code, out, _ = _cli(capsys, "run", "--max-new-tokens", "3", "--dense", "--json")
    report = json.loads(out)
    assert report["visual_tokens"] == {
        "vit_input": 768,
        "vit_kept": 768,
        "llm_input": 192,
        "llm_kept": 192,
    }
    assert len(report["tokens"]) <= 3 and report["ipcv"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "missing.png"], "image not found: missing.png"),
        (["--image", "NOTIMAGE"], "cannot read image"),
        (["--raw-prompt", "--prompt", "no placeholder"], "image placeholders"),
        (["--llm-pruning", "dart", "--llm-keep", "1.5"], r"--llm-keep must be in (0, 1]"),
        (["--llm-keep", "0"], r"--llm-keep must be in (0, 1]"),
        (["--llm-pruning", "tokencarve", "--llm-layer", "9"], "does not fit an LLM of 4 layers"),
        (["--vision-backend", "ort"], "pass --artifact"),
        (["--model", "tiny-llava-next", "--image-size", "112x112"], "drop --image-size"),
        # PaliGemma's processor adds <loc....> tokens the tiny LLM's vocabulary lacks
        (["--model", "tiny-paligemma", "--prompt", "detect <loc0001>"], "outside the LLM's"),
        (["--model", "qwen2-vl-7b-vit"], "without an LLM"),
    ],
)
def test_run_cli_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    not_image = tmp_path / "fake.png"
    not_image.write_text("this is text")
    argv = [str(not_image) if a == "NOTIMAGE" else a for a in argv]
    code, _, err = _cli(capsys, "run", "--max-new-tokens", "2", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], err


def test_eval_on_a_synthetic_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_model("tiny-qwen2-vl")
    size = (224, 224)  # one fixed size (the native path is tested apart): known token counts
    dense = VLMPipeline.create(loaded, image_size=size)
    cards = [make_test_card(), make_test_card(200, 300), make_test_card(90, 90)]
    questions = ["What is shown?", "Which colour is first?", "Is there a square?"]
    truth = dense.run(cards, questions, SamplingConfig(4)).answers
    lines = []
    for i, (card, question) in enumerate(zip(cards, questions, strict=True)):
        card.save(tmp_path / f"{i}.png")
        answer = truth[i] if i < 2 else ["zebra", "giraffe"]
        lines.append(json.dumps({"image": f"{i}.png", "question": question, "answer": answer}))
    (tmp_path / "vqa.jsonl").write_text("\n".join(lines) + "\n")
    items = load_items(tmp_path)
    ipcv = VLMPipeline.create(
        loaded, ipcv=IPCVConfig(prune_layer=3, keep_ratio=0.1), image_size=size
    )
    variants = {"dense": dense, "ipcv": ipcv}
    report = evaluate(variants, items, SamplingConfig(4), batch_size=2)
    assert report["variants"]["dense"]["exact_match"] == pytest.approx(2 / 3)
    # agreement: the share of answers identical to the first variant's, item by item
    alone = [ipcv.run([i.image], [i.question], SamplingConfig(4)).answers[0] for i in items]
    same = sum(a == t for a, t in zip(alone, truth, strict=True))
    assert 0 < same < len(items), "the data must tell agreement apart from 0 and 1"
    assert report["variants"]["ipcv"]["agreement"] == pytest.approx(same / len(items))
    assert [p["ipcv"] for p in report["predictions"]] == alone
    out_file = tmp_path / "report.json"
    code, out, _ = _cli(
        capsys,
        "eval",
        str(tmp_path),
        "--model",
        "tiny-qwen2-vl",
        "--image-size",
        "224x224",
        "--max-new-tokens",
        "4",
        "--batch",
        "2",
        "--out",
        str(out_file),
    )
    assert code == 0 and "same as dense" in out
    saved = json.loads(out_file.read_text())
    assert saved["variants"]["dense"]["exact_match"] == pytest.approx(2 / 3)
    assert set(saved["variants"]) == {"dense", "compressed"}
    assert saved["variants"]["compressed"]["visual_tokens"]["vit_kept"] == 89


@pytest.mark.parametrize(
    ("name", "visual"),
    [
        # 448x336 card: base + 2x2 crops of 65 ViT tokens; 64 + unpadded 16x12 grid + newlines
        ("tiny-llava-next", {"vit_input": 325, "vit_kept": 115, "llm_input": 268}),
        ("tiny-paligemma", {"vit_input": 64, "vit_kept": 22, "llm_input": 64}),
        # 12 tiles + thumbnail of 65 tokens; eval's dense variant tiles the same way
        ("tiny-internvl", {"vit_input": 845, "vit_kept": 299, "llm_input": 208}),
    ],
)
def test_run_and_eval_serve_tiled_and_prefix_lm_models(
    name: str, visual: dict[str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "card.png"
    make_test_card().save(image)
    code, out, _ = _cli(
        capsys, "run", "--model", name, "--image", str(image), "--max-new-tokens", "3", "--json"
    )
    assert code == 0
    report = json.loads(out)
    assert {k: report["visual_tokens"][k] for k in visual} == visual
    line = {"image": "card.png", "question": "What is shown?", "answer": "bars"}
    (tmp_path / "vqa.jsonl").write_text(json.dumps(line) + "\n")
    code, out, _ = _cli(
        capsys, "eval", str(tmp_path), "--model", name, "--max-new-tokens", "3", "--json"
    )
    assert code == 0
    variants = json.loads(out)["variants"]
    assert variants["compressed"]["visual_tokens"]["vit_kept"] == visual["vit_kept"]
    dense = {**visual, "vit_kept": visual["vit_input"], "llm_kept": visual["llm_input"]}
    assert variants["dense"]["visual_tokens"] == dense


@pytest.mark.parametrize("method", ["none", "dart", "fastv", "tokencarve"])
def test_run_and_eval_every_llm_pruning_method_on_the_default(
    method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--llm-pruning none`` is "off", so scripts can loop over every method; the built-in
    default model serves them all through run and eval."""
    code, out, err = _cli(capsys, "run", "--llm-pruning", method, "--max-new-tokens", "3")
    assert code == 0, err
    assert "ViT 768 -> 268 in the IPCV blocks -> 192 to the LLM" in out  # the card's own grid
    assert ("no LLM pruning" in out) == (method == "none")
    make_test_card().save(tmp_path / "card.png")
    line = {"image": "card.png", "question": "What is shown?", "answer": "a test card"}
    (tmp_path / "vqa.jsonl").write_text(json.dumps(line) + "\n")
    code, out, err = _cli(
        capsys, "eval", str(tmp_path), "--llm-pruning", method, "--max-new-tokens", "3", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    pruning = report["variants"]["compressed"]["llm_pruning"]
    assert (pruning is None) == (method == "none")


def test_an_image_pil_refuses_as_a_bomb_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "big.png"
    make_test_card(64, 64).save(image)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is past twice the limit
    code, _, err = _cli(capsys, "run", "--model", "tiny-qwen2-vl", "--image", str(image))
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("error: image"), err
    assert "too large to decode safely" in err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: a warning in PIL
    with pytest.raises(InputError, match="too large to decode safely"):
        load_image(image)


def test_llm_pruning_needs_recordable_attention() -> None:
    loaded = load_model("tiny-qwen2-vl")
    loaded.model.set_attn_implementation("eager")
    pipeline = VLMPipeline.create(loaded, llm_pruning=LLMPruningConfig("fastv"))
    with pytest.raises(ConfigError, match=r"runs 'eager' attention; load the model with"):
        pipeline.run([make_test_card()], ["hi"], SamplingConfig(2))


def test_right_padded_prompts_are_refused_and_checkpoints_pad_left(tmp_path: Path) -> None:
    loaded = load_model("tiny-llava")
    loaded.model.save_pretrained(tmp_path)
    processor = VLMPipeline.create(loaded).processor
    processor.tokenizer.padding_side = "right"  # as many checkpoints ship it
    processor.save_pretrained(tmp_path)
    pipeline = VLMPipeline.create(str(tmp_path))
    assert pipeline.processor.tokenizer.padding_side == "left"
    inputs, _ = pipeline.prepare(_images(pipeline), PROMPTS)
    assert bool(inputs.attention_mask[:, -1].all())  # padding on the left
    flipped = dataclasses.replace(inputs, attention_mask=inputs.attention_mask.flip(1))
    with pytest.raises(InputError, match="not left-padded"):
        generate(pipeline.model, flipped, SamplingConfig(2))


def test_eval_item_with_several_images(tmp_path: Path) -> None:
    for name, size in (("a.png", (224, 280)), ("b.png", (90, 120))):
        make_test_card(*size).save(tmp_path / name)
    item = {"image": ["a.png", "b.png"], "question": "Same?", "answer": "no"}
    (tmp_path / "two.jsonl").write_text(json.dumps(item))
    (loaded,) = load_items(tmp_path)
    assert loaded.image == (tmp_path / "a.png", tmp_path / "b.png")
    pipeline = VLMPipeline.create("tiny-qwen2-vl")
    report = evaluate({"dense": pipeline}, [loaded], SamplingConfig(2))
    assert report["predictions"][0]["image"] == [str(i) for i in loaded.image]
    assert report["variants"]["dense"]["visual_tokens"]["vit_input"] == 320 + 48


def test_scoring_and_data_errors(tmp_path: Path) -> None:
    assert score_answer("The Cat.", ["cat"]) == {"exact": True, "contains": True}
    assert score_answer("a black cat sits", ["cat", "dog"]) == {"exact": False, "contains": True}
    assert score_answer("category", ["cat"]) == {"exact": False, "contains": False}
    with pytest.raises(InputError, match="not found"):
        load_items(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.png"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:1 is not an object with image, question"):
        load_items(bad)


def test_checkpoint_directory_uses_its_own_processor(tmp_path: Path) -> None:
    loaded = load_model("tiny-llava")
    loaded.model.save_pretrained(tmp_path)
    VLMPipeline.create(loaded).processor.save_pretrained(tmp_path)
    from_dir = VLMPipeline.create(str(tmp_path)).run([make_test_card()], ["hi"], SamplingConfig(3))
    preset = VLMPipeline.create(loaded).run([make_test_card()], ["hi"], SamplingConfig(3))
    assert torch.equal(from_dir.tokens, preset.tokens)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    with pytest.raises(ArtifactError, match="could not load the processor"):
        VLMPipeline.create(str(tmp_path))


def test_a_qwen_checkpoint_without_torchvision_serves_images(tmp_path: Path) -> None:
    """transformers' Qwen2-VL processor loads a video processor, which needs torchvision;
    without it (as here), the checkpoint's own image processor, tokenizer and chat template
    serve images, with the preset's answer."""
    loaded = load_model("tiny-qwen2-vl")
    loaded.model.save_pretrained(tmp_path)
    processor = VLMPipeline.create(loaded).processor
    processor.tokenizer.chat_template = processor.chat_template
    processor.tokenizer.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text('{"processor_class": "Qwen2VLProcessor"}')
    from_dir = VLMPipeline.create(str(tmp_path)).run([make_test_card()], ["hi"], SamplingConfig(3))
    preset = VLMPipeline.create(loaded).run([make_test_card()], ["hi"], SamplingConfig(3))
    assert torch.equal(from_dir.tokens, preset.tokens)
