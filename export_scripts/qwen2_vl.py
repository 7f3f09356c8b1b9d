"""Qwen2-VL end to end: compress the vision tower of a full model with IPCV and compare.

    python export_scripts/qwen2_vl.py                      # built-in tiny model
    python export_scripts/qwen2_vl.py --model /path/to/Qwen2-VL-7B-Instruct --dtype bfloat16

Prints dense vs IPCV agreement of the merger output and the answer of ``generate`` with each,
then exports the IPCV encoder to ONNX at native resolution (``--out``: ``pixel_values`` +
``image_grid_thw``, any grid) and compares ONNX Runtime with PyTorch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ipcv_deploy import apply_ipcv, remove_ipcv
from ipcv_deploy.backends.onnxruntime_backend import OrtBackend
from ipcv_deploy.export import ExportOptions, PixelRange, export_encoder
from ipcv_deploy.models import load_model, parse_dtype
from ipcv_deploy.parity import compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen2-vl")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("engines/example-qwen2-vl-ipcv"))
    args = parser.parse_args()
    loaded = load_model(args.model, parse_dtype(args.dtype))
    adapter = loaded.adapter(loaded.vision)
    (pixels,), kwargs = adapter.example_inputs((448, 448), 1, torch.Generator().manual_seed(0))
    grid = kwargs["grid_thw"]
    config = loaded.model.config
    image_tokens = int(grid.prod()) // loaded.vision.spatial_merge_size**2
    ids = [
        config.vision_start_token_id,
        *[config.image_token_id] * image_tokens,
        config.vision_end_token_id,
    ]
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": pixels, "image_grid_thw": grid}
    with torch.inference_mode():
        dense = loaded.model.model.get_image_features(pixels, grid).pooler_output[0]
        dense_ids = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        apply_ipcv(loaded.model)  # K=3, keep 35%, AS=7
        ipcv = loaded.model.model.get_image_features(pixels, grid).pooler_output[0]
        ipcv_ids = loaded.model.generate(**inputs, max_new_tokens=8, do_sample=False)
        remove_ipcv(loaded.model)
    print(f"merger output {tuple(dense.shape)}: {compare(dense, ipcv)}")
    print(f"dense generate: {dense_ids[0, len(ids) :].tolist()}")
    print(f"IPCV  generate: {ipcv_ids[0, len(ids) :].tolist()}")
    # Native resolution: the graph takes the tower's own call (pixel_values + image_grid_thw)
    # for any grid inside the processor's default pixel range.
    native = PixelRange(*loaded.adapter.native_pixels)
    options = ExportOptions((448, 448), loaded.adapter.reference_ipcv(), force=True, native=native)
    artifact = export_encoder(loaded, options, args.out)
    onnx = OrtBackend(artifact)(pixels, grid)["image_embeds"]
    print(f"ONNX Runtime ({args.out}) vs PyTorch IPCV: {compare(ipcv, onnx)}")


if __name__ == "__main__":
    main()
