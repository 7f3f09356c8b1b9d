"""The ONNX Runtime GenAI backend end to end: package export, torch-free answers, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ipcv_deploy.cli import main
from ipcv_deploy.errors import ArtifactError
from ipcv_deploy.export import PixelRange
from ipcv_deploy.models import load_model
from ipcv_deploy.runtime import SamplingConfig, VLMPipeline
from ipcv_deploy.runtime.ort_genai import GenaiPipeline
from ipcv_deploy.runtime.testcard import make_test_card
from tests.conftest import NATIVE_MAX_PIXELS
from tests.runtime.references import teacher_forced_logits

pytest.importorskip("onnxruntime_genai", reason="the ort-genai backend needs onnxruntime-genai")

FAMILIES = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")
PROMPT = "Count the colour bars, please."
NEW_TOKENS = 8


def card():
    """224x280: sides multiples of 28 inside the package's range, so neither processor
    resizes (ONNX Runtime Extensions' cubic resize is not PIL's)."""
    return make_test_card(224, 280)


@pytest.fixture(scope="module")
def packages(tmp_path_factory, exports) -> dict[str, Path]:
    """Qwen2-VL's package exports its encoder; Qwen2.5-VL's packages the session's native
    export of it (``--vision-artifact``), which the export tests verify at many grids."""
    root = tmp_path_factory.mktemp("genai")
    made = {}
    for name in FAMILIES:
        out = root / name
        argv = ["export", "--model", name, "--format", "ort-genai", "--out", str(out)]
        if name == "tiny-qwen2-vl":
            argv += ["--max-pixels", str(NATIVE_MAX_PIXELS)]
        else:
            vision = exports(
                name, native=PixelRange(56 * 56, NATIVE_MAX_PIXELS), return_indices=True
            )
            argv += ["--vision-artifact", str(vision.path)]
        assert main(argv) == 0
        made[name] = out
    return made


@pytest.mark.parametrize("name", FAMILIES)
def test_package_answers_like_the_transformers_backend(packages, name):
    """Same IPCV vision graph, ONNX Runtime GenAI's processor, embedding and decoder against
    the transformers LLM: identical greedy tokens, logits within 1e-4 at every step."""
    package = packages[name]
    genai = GenaiPipeline(package, expect_model=name)
    ours = genai.answer(card(), PROMPT, SamplingConfig(NEW_TOKENS), return_logits=True)
    reference = VLMPipeline.create(
        load_model(name), vision_backend="ort", artifact=package / "vision"
    )
    theirs = reference.run([card()], [PROMPT], SamplingConfig(NEW_TOKENS))
    assert ours.tokens == theirs.tokens[0].tolist()
    np.testing.assert_allclose(
        np.stack(ours.logits),
        teacher_forced_logits(reference, card(), PROMPT, ours.tokens),
        atol=1e-4,
        rtol=0,
    )
    vt, ref_vt = ours.stats["visual_tokens"], theirs.stats["visual_tokens"]
    assert (vt["vit_input"], vt["vit_kept"], vt["llm_input"]) == (
        ref_vt["vit_input"],
        ref_vt["vit_kept"],
        ref_vt["llm_input"],
    )
    assert vt["vit_input"] == 16 * 20 and vt["vit_kept"] < vt["vit_input"]  # IPCV pruned


def test_run_answers_in_a_process_that_cannot_import_torch(packages, tmp_path):
    """``ipcv-export run --llm-backend ort-genai`` with torch and transformers made
    unimportable: it answers, and the answer is the in-process one."""
    package = packages["tiny-qwen2-vl"]
    image = tmp_path / "card.png"
    card().save(image)
    argv = ["run", "--llm-backend", "ort-genai", "--artifact", str(package), "--json"]
    argv += ["--image", str(image), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]
    code = (
        "import sys\n"
        "sys.modules['torch'] = sys.modules['transformers'] = None  # any import fails\n"
        "from ipcv_deploy.cli import main\n"
        f"rc = main({argv!r})\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')"
        " and sys.modules[m] is not None)\n"
        "print(rc, loaded, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "0 []", done.stderr
    answer = json.loads(done.stdout)
    expected = GenaiPipeline(package).answer(card(), PROMPT, SamplingConfig(NEW_TOKENS))
    assert answer["tokens"] == expected.tokens and answer["llm_backend"] == "ort-genai"


def test_cli_streams_and_reports(packages, capsys):
    assert (
        main(["run", "--llm-backend", "ort-genai", "--artifact", str(packages["tiny-qwen2-vl"])])
        == 0
    )
    out = capsys.readouterr().out
    assert "ort-genai (IPCV K=3 keep 35% AS=7)" in out and "time to first token" in out
    assert "visual tokens        ViT" in out


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_eval_scores_a_package_against_the_dense_transformers_model(packages, tmp_path, capsys):
    card().save(tmp_path / "card.png")
    item = {"image": "card.png", "question": PROMPT, "answer": "four"}
    data = tmp_path / "vqa.jsonl"
    data.write_text("\n".join(json.dumps(item) for _ in range(2)))
    package = str(packages["tiny-qwen2-vl"])
    argv = ["eval", str(data), "--model", "tiny-qwen2-vl", "--llm-backend", "ort-genai"]
    assert main([*argv, "--artifact", package, "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    variants = report["variants"]
    assert list(variants) == ["dense (transformers)", "compressed (ort-genai)"]
    assert variants["compressed (ort-genai)"]["llm_backend"] == "ort-genai"
    vt = variants["compressed (ort-genai)"]["visual_tokens"]
    assert (
        vt["vit_kept"]
        < vt["vit_input"]
        == variants["dense (transformers)"]["visual_tokens"]["vit_kept"]
    )
    assert _error(capsys, [*argv, "--artifact", package, "--batch", "2"]).endswith(
        "takes one at a time: drop --batch"
    )
    assert "evaluates a package: pass --artifact DIR" in _error(capsys, argv)


def test_bad_packages_and_options_are_one_line_errors(packages, tmp_path, capsys):
    package = packages["tiny-qwen2-vl"]
    run = ["run", "--llm-backend", "ort-genai", "--artifact"]
    assert "not an ONNX Runtime GenAI package" in _error(capsys, [*run, str(package / "vision")])
    assert "belongs to" not in _error(capsys, [*run, str(tmp_path / "missing")])
    assert "is a package of tiny-qwen2-vl, not tiny-qwen2.5-vl" in _error(
        capsys, [*run, str(package), "--model", "tiny-qwen2.5-vl"]
    )
    assert "--llm-pruning: not an option of --llm-backend ort-genai" in _error(
        capsys, [*run, str(package), "--llm-pruning", "dart"]
    )
    assert "pass --artifact DIR" in _error(capsys, ["run", "--llm-backend", "ort-genai"])
    two = ["--image", "a.png", "--image", "b.png"]
    assert "one image per prompt: pass one --image" in _error(capsys, [*run, str(package), *two])
    item = {"video": "clip", "question": "What happens?", "answer": "bars"}
    (tmp_path / "vqa.jsonl").write_text(json.dumps(item) + "\n")
    evaluate = ["eval", str(tmp_path), "--model", "tiny-qwen2-vl", "--llm-backend", "ort-genai"]
    assert "items with a video run on --llm-backend transformers, not ort-genai" in _error(
        capsys, [*evaluate, "--artifact", str(package)]
    )

    modified = tmp_path / "modified"
    shutil.copytree(package, modified)
    data = modified / "embedding.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])
    assert "truncated or does not belong" in _error(capsys, [*run, str(modified)])

    other = tmp_path / "other"
    shutil.copytree(package, other)
    meta = json.loads((other / "package.json").read_text())
    meta["llm"]["hidden_size"] += 1
    (other / "package.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="belongs to another model"):
        GenaiPipeline(other)


def test_export_refuses_what_it_cannot_package(tmp_path, capsys, exports):
    out = str(tmp_path / "p")
    export = ["export", "--format", "ort-genai", "--out", out]
    assert "not InternVL" in _error(capsys, [*export, "--model", "tiny-internvl"])
    fixed = exports("tiny-qwen2-vl", return_indices=True).path
    other = exports(
        "tiny-qwen2.5-vl", native=PixelRange(56 * 56, NATIVE_MAX_PIXELS), return_indices=True
    ).path
    qwen = [*export, "--model", "tiny-qwen2-vl", "--vision-artifact"]
    assert "not a native-resolution export" in _error(capsys, [*qwen, str(fixed)])
    assert "does not belong to this model" in _error(capsys, [*qwen, str(other)])
    assert "add --format ort-genai" in _error(
        capsys, ["export", "--model", "tiny-qwen2-vl", "--vision-artifact", str(other)]
    )
    assert "drop --quantize / --target" in _error(
        capsys, [*export, "--model", "tiny-qwen2-vl", "--quantize", "int8"]
    )
    assert "drop --image-size" in _error(
        capsys, [*export, "--model", "tiny-qwen2-vl", "--image-size", "224x224"]
    )
    assert not Path(out).exists() and list(tmp_path.iterdir()) == []


def test_backend_benchmark_sets_both_backends_side_by_side(packages, tmp_path):
    from ipcv_deploy.bench.runtime import BACKEND_HEADERS, backend_benchmark, backend_table

    name = "tiny-qwen2-vl"
    report = backend_benchmark(
        load_model(name), tmp_path, runs=1, max_new_tokens=3, package=packages[name]
    )
    rows = {(r["backend"], r["variant"]): r for r in report["rows"]}
    assert set(rows) == {(b, v) for b in ("transformers", "ort-genai") for v in ("dense", "IPCV")}
    assert rows["transformers", "dense"]["ttft_speedup"] == 1.0
    for backend in ("transformers", "ort-genai"):
        dense, ipcv = (
            rows[backend, "dense"]["visual_tokens"],
            rows[backend, "IPCV"]["visual_tokens"],
        )
        assert dense["vit_kept"] == dense["vit_input"] > ipcv["vit_kept"]
    assert all(len(row) == len(BACKEND_HEADERS) for row in backend_table(report))
