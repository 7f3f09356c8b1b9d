"""An ONNX Runtime GenAI package: the IPCV vision encoder stitched to an exported LLM.

``export --format ort-genai`` writes one folder ``onnxruntime_genai.Model`` loads as it is:

- ``vision/``: the native-resolution vision artifact (``vision.onnx`` with ``ipcv`` nodes and
  their function bodies, its manifest), ``pixel_values`` + ``image_grid_thw`` -> features;
- ``embedding.onnx``: ``input_ids`` + ``image_features`` -> ``inputs_embeds`` (the LLM's
  token embedding, image rows taken from the features in order);
- ``model.onnx``: the text decoder, exported from the model's own weights by
  ``onnxruntime_genai.models.builder`` (``exclude_embeds=true``; run offline from a folder
  written here);
- ``genai_config.json``, the tokenizer and chat template, ``processor_config.json`` (the
  image processor in ONNX Runtime Extensions' form) and ``package.json`` (what it is, every
  file's size and hash).

The family facts (how the builder is told about the LLM, the image processor) are in
``models/ort_genai.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

import ipcv_deploy
from ipcv_deploy.artifact import (
    PACKAGE_FORMAT,
    PACKAGE_NAME,
    PACKAGE_VERSION,
    Artifact,
    GenaiPackage,
    file_entry,
    load_artifact,
    load_genai_package,
)
from ipcv_deploy.errors import ArtifactError, BackendUnavailableError, ConfigError
from ipcv_deploy.export.onnx_export import ExportOptions, export_encoder
from ipcv_deploy.fileio import FILE_MODE, staged_directory, write_json
from ipcv_deploy.models import LoadedModel
from ipcv_deploy.models.ort_genai import (
    GENAI_MODEL_TYPES,
    builder_config,
    genai_families,
    genai_sections,
    llm_state_dict,
    processor_config,
)
from ipcv_deploy.models.processors import load_processor

__all__ = ["embedding_model", "export_ort_genai"]

VISION_DIR = "vision"
EMBEDDING_FILE = "embedding.onnx"
#: The builder's log, kept in the package for when ONNX Runtime GenAI refuses it.
BUILDER_LOG = "builder.log"


def embedding_model(weight: np.ndarray, image_token_id: int) -> onnx.ModelProto:
    """``input_ids`` [batch, seq] + ``image_features`` [n, hidden] -> ``inputs_embeds``.

    Token embeddings, with the rows at ``image_token_id`` replaced by the feature rows in
    order (row-major over the batch, as transformers' ``masked_scatter``); ``n`` may be 0
    (decode steps).
    """
    hidden = weight.shape[1]
    constants = {
        "weight": weight.astype(np.float32),
        "image_token": np.array([image_token_id], np.int64),
        "flat": np.array([-1], np.int64),
        "rows": np.array([-1, hidden], np.int64),
        "zero": np.array([0], np.int64),
        "one": np.array([1], np.int64),
        "axis0": np.array(0, np.int64),
        "pad_row": np.zeros((1, hidden), np.float32),
    }
    node = helper.make_node
    nodes = [
        node("Gather", ["weight", "input_ids"], ["text"], axis=0),
        node("Shape", ["text"], ["out_shape"]),
        node("Reshape", ["input_ids", "flat"], ["ids"]),
        node("Equal", ["ids", "image_token"], ["is_image"]),
        node("Cast", ["is_image"], ["is_image_int"], to=TensorProto.INT64),
        node("CumSum", ["is_image_int", "axis0"], ["running"]),
        node("Sub", ["running", "one"], ["index_raw"]),
        # Clamp into [0, n]: row n is the zero pad (text positions, or features missing).
        node("Shape", ["image_features"], ["features_shape"]),
        node("Gather", ["features_shape", "zero"], ["count"], axis=0),
        node("Max", ["index_raw", "zero"], ["index_low"]),
        node("Min", ["index_low", "count"], ["index"]),
        node("Concat", ["image_features", "pad_row"], ["padded"], axis=0),
        node("Gather", ["padded", "index"], ["image_rows"], axis=0),
        node("Reshape", ["text", "rows"], ["text_rows"]),
        node("Unsqueeze", ["is_image", "one"], ["is_image_rows"]),
        node("Where", ["is_image_rows", "image_rows", "text_rows"], ["merged"]),
        node("Reshape", ["merged", "out_shape"], ["inputs_embeds"]),
    ]
    graph = helper.make_graph(
        nodes,
        "embedding",
        [
            helper.make_tensor_value_info(
                "input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]
            ),
            helper.make_tensor_value_info(
                "image_features", TensorProto.FLOAT, ["num_image_tokens", hidden]
            ),
        ],
        [
            helper.make_tensor_value_info(
                "inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", hidden]
            )
        ],
        [numpy_helper.from_array(v, k) for k, v in constants.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _builder_version() -> str:
    # Looked up, not imported: the builder runs in its own process (importing it here would
    # also reconfigure this process's logging).
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise BackendUnavailableError(
            "--format ort-genai needs onnxruntime-genai; pip install 'ipcv-deploy[genai]'"
        )
    return metadata.version("onnxruntime-genai")


def _export_decoder(loaded: LoadedModel, processor, stage: Path, work: Path) -> None:
    """The LLM, presented as the builder expects, exported by the builder into ``stage``."""
    from safetensors.torch import save_file

    source = work / "llm"
    source.mkdir()
    config = loaded.model.config.to_dict()
    (source / "config.json").write_text(json.dumps(builder_config(config), indent=2))
    save_file(llm_state_dict(loaded.model), source / "model.safetensors", {"format": "pt"})
    # Without a tokenizer in its input the builder writes an empty one, silently.
    processor.tokenizer.save_pretrained(source)
    if getattr(processor, "chat_template", None):
        (source / "chat_template.jinja").write_text(processor.chat_template)
    command = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        *("-i", str(source), "-o", str(stage), "-p", "fp32", "-e", "cpu"),
        *("-c", str(work / "cache"), "--extra_options", "exclude_embeds=true"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    (stage / BUILDER_LOG).write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not (stage / "genai_config.json").is_file():
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ArtifactError(f"onnxruntime_genai.models.builder failed on the LLM: {last}")
    if not (stage / "tokenizer.json").is_file():
        raise ArtifactError("the builder wrote no tokenizer.json; the checkpoint needs one")


def _check_vision_artifact(artifact: Artifact, loaded: LoadedModel) -> None:
    """Refuse a vision artifact the package cannot use as its encoder."""
    from ipcv_deploy.runtime.vision import check_artifact_fits

    check_artifact_fits(artifact, loaded)
    m = artifact.manifest
    if m.native is None or "ort" not in m.flavours:
        raise ArtifactError(
            f"{artifact.path} is not a native-resolution export with an ONNX Runtime flavour, "
            "which ONNX Runtime GenAI feeds the processor's own grid; export one with "
            "`ipcv-export export` (no --image-size, --target ort or all)"
        )


def export_ort_genai(
    loaded: LoadedModel,
    options: ExportOptions,
    out: Path,
    progress: Callable[[str], None] = lambda message: None,
    vision_artifact: Artifact | None = None,
) -> GenaiPackage:
    """Write the ONNX Runtime GenAI package of ``loaded`` (IPCV or dense vision) to ``out``.

    ``vision_artifact``: an existing native-resolution export of ``loaded`` to package (copied
    as it is, its IPCV settings and pixel range) instead of exporting the encoder again;
    ``options`` then only set ``force``.

    Raises:
        ConfigError: a family ONNX Runtime GenAI is not set up for, a model without its
            LLM, a fixed-size export, or another dtype than float32.
        BackendUnavailableError: onnxruntime-genai is not installed.
        ArtifactError: ``out`` exists without ``force``, the builder failed, or
            ``vision_artifact`` is not a native export of this model with an ``ort`` flavour.
    """
    model_type = loaded.adapter.model_types[0]
    if model_type not in GENAI_MODEL_TYPES:
        raise ConfigError(
            f"--format ort-genai packages {genai_families()} models, not "
            f"{loaded.adapter.family}; export the vision encoder alone (leave out --format)"
        )
    if loaded.model is None:
        raise ConfigError(f"{loaded.name} has no LLM; --format ort-genai needs the full model")
    if vision_artifact is not None:
        _check_vision_artifact(vision_artifact, loaded)
    elif options.native is None:
        raise ConfigError(
            "--format ort-genai takes the native-resolution export (ONNX Runtime GenAI feeds "
            "the processor's own grid): drop --image-size"
        )
    if next(loaded.model.parameters()).dtype != torch.float32:
        raise ConfigError("--format ort-genai is written in float32 for now: pass --dtype float32")
    builder = _builder_version()
    processor = load_processor(loaded, None)
    with staged_directory(out, options.force, marker=PACKAGE_NAME) as stage:
        if vision_artifact is None:
            vision_options = dataclasses.replace(options, target="ort", force=False)
            vision = export_encoder(loaded, vision_options, stage / VISION_DIR, progress=progress)
        else:
            progress(f"copying the vision encoder from {vision_artifact.path} ...")
            shutil.copytree(vision_artifact.path, stage / VISION_DIR)
            vision = load_artifact(stage / VISION_DIR)
        progress("exporting the text decoder with onnxruntime_genai.models.builder ...")
        with tempfile.TemporaryDirectory(dir=stage.parent, prefix=f".{out.name}.llm-") as work:
            _export_decoder(loaded, processor, stage, Path(work))
        progress("writing the embedding model, genai_config.json and the processor ...")
        config = loaded.model.config
        embeddings = loaded.model.get_input_embeddings().weight.detach().float().numpy()
        onnx.save(
            embedding_model(embeddings, int(config.image_token_id)),
            str(stage / EMBEDDING_FILE),
            save_as_external_data=True,
            location=f"{EMBEDDING_FILE}.data",
            size_threshold=1024,  # shape constants stay inline (ONNX Runtime reads them)
        )
        (stage / f"{EMBEDDING_FILE}.data").chmod(FILE_MODE)
        genai_path = stage / "genai_config.json"
        genai = json.loads(genai_path.read_text())
        output = vision.manifest.outputs[0].name
        genai["model"].update(
            genai_sections(config.to_dict(), f"{VISION_DIR}/vision.onnx", output, EMBEDDING_FILE)
        )
        genai["search"].update(do_sample=False, top_k=1)  # greedy unless a request asks
        write_json(genai_path, genai)
        native = vision.manifest.native
        pixels = (native["min_pixels"], native["max_pixels"])
        write_json(
            stage / "processor_config.json", processor_config(processor.image_processor, pixels)
        )
        text = config.get_text_config()
        files = {
            str(p.relative_to(stage)): dataclasses.asdict(file_entry(p))
            for p in sorted(stage.iterdir())
            if p.is_file()
        }
        write_json(
            stage / PACKAGE_NAME,
            {
                "format": PACKAGE_FORMAT,
                "version": PACKAGE_VERSION,
                "family": loaded.adapter.family,
                "model_type": model_type,
                "source": vision.manifest.source,
                "vision": VISION_DIR,
                "image_placeholder": processor.image_token,
                "llm": {
                    "hidden_size": text.hidden_size,
                    "num_hidden_layers": text.num_hidden_layers,
                    "vocab_size": text.vocab_size,
                },
                "files": files,
                "producer": {
                    "ipcv_deploy": ipcv_deploy.__version__,
                    "onnxruntime_genai": builder,
                },
            },
        )
    return load_genai_package(out)
