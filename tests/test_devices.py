"""Device correctness: device-less tensor factories, --device / --dtype, buffers, providers,
and (where CUDA is) tokens on CUDA equal to tokens on the CPU."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ipcv_deploy.backends import RowEncoder, TorchBackend
from ipcv_deploy.backends.onnxruntime_backend import (
    ORT_PROVIDERS,
    TRT_PLUGIN_DOMAIN,
    OrtBackend,
    execution_providers,
    trt_plugin_model,
)
from ipcv_deploy.cli import main
from ipcv_deploy.compression.llm_pruning import LLM_PRUNING_METHODS, LLMPruningConfig
from ipcv_deploy.errors import BackendUnavailableError, ConfigError
from ipcv_deploy.models import load_model, resolve_device
from ipcv_deploy.ops import DOMAIN
from ipcv_deploy.runtime import SamplingConfig, VLMPipeline
from ipcv_deploy.runtime.testcard import make_test_card
from tests.conftest import TOWERS

PACKAGE = Path(__file__).resolve().parents[1] / "ipcv_deploy"
#: torch functions that make a new tensor (or generator) and take ``device=``.
FACTORIES = frozenset(
    {
        "arange",
        "as_tensor",
        "empty",
        "empty_strided",
        "eye",
        "full",
        "Generator",
        "linspace",
        "logspace",
        "ones",
        "rand",
        "randint",
        "randn",
        "randperm",
        "range",
        "tensor",
        "zeros",
    }
)
RUNTIME_PRESETS = ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-internvl", "tiny-llava")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CUDA-less error")


def deviceless_factories(source: str) -> list[tuple[int, str]]:
    """(line, call) of every ``torch.<factory>(...)`` (or imported factory) without ``device=``.

    ``*_like`` and ``tensor.new_*`` forms take the device of their input and are not flagged.
    """
    tree = ast.parse(source)
    imported = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "torch"
        for alias in node.names
        if alias.name in FACTORIES
    }
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            name = func.attr if func.value.id == "torch" and func.attr in FACTORIES else None
        else:
            name = func.id if isinstance(func, ast.Name) and func.id in imported else None
        if name is not None and not any(k.arg == "device" for k in node.keywords):
            found.append((node.lineno, name))
    return found


def test_the_guard_flags_a_deviceless_factory() -> None:
    snippet = (
        "import torch\nfrom torch import zeros as z\n"
        "a = torch.zeros(3, dtype=torch.bool)\n"
        "b = torch.ones(3, device=x.device)\n"
        "c = torch.zeros_like(b) + b.new_ones(3)\n"
        "g = torch.Generator()\n"
        "d = z(4)\n"
        "e = torch.tensor([1, 2], device=b.device)\n"
    )
    assert deviceless_factories(snippet) == [(3, "zeros"), (6, "Generator"), (7, "z")]


@pytest.mark.parametrize("package", ["compression", "runtime"])
def test_no_deviceless_tensor_factory_in(package: str) -> None:
    """Every helper tensor in the runtime's hot path is made on its input's device."""
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: torch.{name}(...) without device="
        for path in sorted((PACKAGE / package).rglob("*.py"))
        for line, name in deviceless_factories(path.read_text())
    ]
    assert not offenders, "\n".join(offenders)


# --- --device / --dtype ----------------------------------------------------------------------
def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    with pytest.raises(ConfigError, match="device must be one of cpu, cuda, auto"):
        resolve_device("tpu")


@no_cuda
def test_cuda_without_cuda_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BackendUnavailableError, match=r"CUDA is not available.*--device cpu"):
        resolve_device("cuda")
    assert main(["run", "--model", "tiny-qwen2-vl", "--device", "cuda", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device cuda: CUDA is not available")


def test_run_on_cpu_in_float16_answers(capsys: pytest.CaptureFixture[str]) -> None:
    """fp16 on the CPU is allowed (slow), not refused."""
    options = ["--device", "cpu", "--dtype", "float16", "--max-new-tokens", "2", "--json"]
    assert main(["run", "--model", "tiny-qwen2-vl", *options]) == 0
    assert '"answer"' in capsys.readouterr().out


def test_ort_provider_needs_the_ort_backend() -> None:
    with pytest.raises(ConfigError, match="--ort-provider cuda is for --vision-backend ort"):
        VLMPipeline.create("tiny-qwen2-vl", ort_provider="cuda")


# --- tables as buffers -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-qwen2.5-vl"])
def test_row_form_rope_tables_are_buffers_that_follow_to(name: str) -> None:
    encoder = RowEncoder(load_model(name), None)
    buffers = dict(encoder.named_buffers())
    assert {"context.cos", "context.sin"} <= set(buffers)
    assert not any(k.startswith("context.") for k in encoder.state_dict())  # never saved
    encoder.to("meta")
    assert {b.device.type for k, b in encoder.named_buffers() if k.startswith("context.")} == {
        "meta"
    }


# --- ONNX Runtime providers ------------------------------------------------------------------
def test_execution_providers() -> None:
    assert execution_providers("cpu") == [("CPUExecutionProvider", {})]
    assert [p for p, _ in execution_providers("cuda")] == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    lib = Path("build/plugins/libipcv_trt_plugins.so")
    trt = execution_providers("tensorrt", lib, device_id=1)
    assert [p for p, _ in trt] == [ORT_PROVIDERS[k] for k in ("tensorrt", "cuda", "cpu")]
    assert trt[0][1] == {"device_id": "1", "trt_extra_plugin_lib_paths": str(lib)}
    with pytest.raises(ConfigError, match="--plugin-lib"):
        execution_providers("tensorrt")
    with pytest.raises(ConfigError, match="unknown ONNX Runtime provider 'rocm'"):
        execution_providers("rocm")


@pytest.fixture(scope="module")
def qwen_export(exports):
    return exports("tiny-qwen2-vl", return_indices=True)


def test_ort_cpu_provider_is_the_default(qwen_export) -> None:
    backend = OrtBackend(qwen_export)
    assert backend.session.get_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_a_gpu_provider_missing_from_onnxruntime_is_refused(qwen_export, provider: str) -> None:
    import onnxruntime

    if ORT_PROVIDERS[provider] in onnxruntime.get_available_providers():
        pytest.skip(f"this onnxruntime has {ORT_PROVIDERS[provider]}")
    with pytest.raises(BackendUnavailableError, match=rf"'{provider}'.*onnxruntime-gpu"):
        OrtBackend(qwen_export, provider=provider, plugin_lib=Path("libipcv_trt_plugins.so"))


def test_trt_plugin_model_hands_ipcv_nodes_to_the_tensorrt_provider(qwen_export) -> None:
    import onnx

    model = onnx.load_from_string(trt_plugin_model(qwen_export))
    domains = {n.domain for n in model.graph.node}
    assert TRT_PLUGIN_DOMAIN in domains and DOMAIN not in domains
    assert {o.domain for o in model.opset_import} >= {"", TRT_PLUGIN_DOMAIN}
    plugin = next(n for n in model.graph.node if n.domain == TRT_PLUGIN_DOMAIN)
    assert {a.name for a in plugin.attribute} >= {"plugin_version", "plugin_namespace"}


# --- on a GPU: CUDA fp32 equals CPU fp32 ----------------------------------------------------
@pytest.fixture
def strict_fp32():
    """fp32 means fp32 on CUDA too (no TF32 in convolutions / matmuls)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_cuda
@pytest.mark.parametrize("name", TOWERS)
def test_encoder_on_cuda_keeps_the_cpu_tokens(name: str, strict_fp32) -> None:
    outputs = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(name, seed=0, device=device)
        encoder = RowEncoder(loaded, loaded.adapter.reference_ipcv(), return_indices=True)
        out = TorchBackend(encoder)(*encoder.inputs(2, seed=1))
        assert out["image_embeds"].device.type == device
        outputs[device] = {k: v.cpu() for k, v in out.items()}
    assert torch.equal(outputs["cpu"]["keep_idx"], outputs["cuda"]["keep_idx"])
    torch.testing.assert_close(
        outputs["cuda"]["image_embeds"], outputs["cpu"]["image_embeds"], rtol=1e-4, atol=1e-4
    )


@needs_cuda
@pytest.mark.parametrize("name", RUNTIME_PRESETS)
@pytest.mark.parametrize("pruning", [None, *LLM_PRUNING_METHODS])
def test_tokens_on_cuda_equal_tokens_on_cpu(name: str, pruning: str | None, strict_fp32) -> None:
    """Greedy answers of the pipeline with IPCV (and each LLM-side pruning), fp32."""
    tokens = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(name, seed=0)
        pipeline = VLMPipeline.create(
            loaded,
            ipcv=loaded.adapter.reference_ipcv(),
            llm_pruning=None if pruning is None else LLMPruningConfig(pruning, 0.35),
            device=device,
        )
        assert pipeline.device.type == device
        h, w = pipeline.vision.image_size
        images = [make_test_card().resize((w, h)), make_test_card(120, 90).resize((w, h))]
        prompts = ["What is this?", "Count the colour bars from left to right, please."]
        result = pipeline.run(images, prompts, SamplingConfig(6))
        assert result.tokens.device.type == device
        tokens[device] = result.tokens.cpu()
    assert torch.equal(tokens["cuda"], tokens["cpu"])


@needs_cuda
def test_sampling_runs_on_cuda() -> None:
    """temperature / top-p sampling draws from a generator on the logits' device."""
    pipeline = VLMPipeline.create("tiny-qwen2-vl", device="cuda")
    h, w = pipeline.vision.image_size
    sampling = SamplingConfig(4, temperature=0.8, top_p=0.9, seed=3)
    image = make_test_card().resize((w, h))
    first = pipeline.run([image], ["Hi?"], sampling).tokens
    assert torch.equal(first, pipeline.run([image], ["Hi?"], sampling).tokens)  # seeded
