"""Reference quantities the LLM-backend tests compare against, from the transformers model."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ipcv_deploy.hf_compat import prefill_position_ids
from ipcv_deploy.runtime import VLMPipeline


def teacher_forced_logits(
    pipeline: VLMPipeline, image: Image.Image, prompt: str, tokens: list[int]
) -> np.ndarray:
    """The transformers LLM's logits for each generated token, given the ones before."""
    inputs, _ = pipeline.prepare([image], [prompt])
    model = pipeline.model
    ids = torch.cat([inputs.input_ids, torch.tensor([tokens[:-1]])], dim=1)
    mask = torch.ones_like(ids)
    batch = pipeline.processor(
        text=[pipeline.format_prompt(prompt)], images=[image], return_tensors="pt"
    )
    extra = {"attention_mask": mask, "image_grid_thw": batch["image_grid_thw"]}
    if "mm_token_type_ids" in batch:  # text rows for the generated tokens
        extra["mm_token_type_ids"] = torch.nn.functional.pad(
            batch["mm_token_type_ids"], (0, len(tokens) - 1)
        )
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[:, : inputs.input_ids.shape[1]] = inputs.inputs_embeds
        positions = prefill_position_ids(model, ids, extra)
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
    return logits[0, inputs.input_ids.shape[1] - 1 :].numpy()
