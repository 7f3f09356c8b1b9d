"""InternVL3 end to end: compress the InternViT of a full model with IPCV and compare.

    python export_scripts/internvl.py                      # built-in tiny model
    python export_scripts/internvl.py --model /path/to/InternVL3-8B-hf --dtype bfloat16

Prints dense vs IPCV agreement of the projector output (what replaces the image tokens) and
the answer of ``generate`` with each, then exports the IPCV encoder with its projector to ONNX
(``--out``) and compares ONNX Runtime with PyTorch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ipcv_deploy import apply_ipcv, remove_ipcv
from ipcv_deploy.backends.onnxruntime_backend import OrtBackend
from ipcv_deploy.export import ExportOptions, export_encoder
from ipcv_deploy.models import load_model, parse_dtype
from ipcv_deploy.parity import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-internvl")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("engines/example-internvl-ipcv"))
    args = parser.parse_args()
    loaded = load_model(args.model, parse_dtype(args.dtype))
    adapter = loaded.adapter(loaded.vision)
    (pixels,), _ = adapter.example_inputs(
        loaded.image_size, args.tiles, torch.Generator().manual_seed(0)
    )
    config = loaded.model.config
    ids = [config.image_token_id] * (config.image_seq_length * args.tiles)
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": pixels}
    model = loaded.model.model
    features = {}
    with torch.inference_mode():
        features["dense"] = model.get_image_features(pixel_values=pixels).pooler_output
        dense_ids = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        apply_ipcv(loaded.model)  # K=7, keep 35%, AS=3, CLS always kept
        features["ipcv"] = model.get_image_features(pixel_values=pixels).pooler_output
        ipcv_ids = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        remove_ipcv(loaded.model)
    print(
        f"projector output {tuple(features['dense'].shape)}: "
        f"{compare(features['dense'], features['ipcv'])}"
    )
    print(f"dense generate: {dense_ids[0, len(ids) :].tolist()}")
    print(f"IPCV  generate: {ipcv_ids[0, len(ids) :].tolist()}")
    options = ExportOptions(loaded.image_size, loaded.adapter.reference_ipcv(), force=True)
    artifact = export_encoder(loaded, options, args.out)
    onnx = OrtBackend(artifact)(pixels)["image_embeds"]  # one tile per row
    print(f"ONNX Runtime ({args.out}) vs PyTorch IPCV: {compare(features['ipcv'], onnx)}")


if __name__ == "__main__":
    main()
