"""Prefill + decoding with LLM-side pruning against exact references on the tiny models.

The references use only the transformers model: ``generate`` for the dense case, and for the
pruned case one full-sequence forward with explicit attention masks (dropped image tokens
hidden from layer ``K_llm`` on, and from the decoded tokens in every layer) at the original
positions; equal logits prove the kept tokens kept their positions and the cache is right.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import DynamicCache

from ipcv_deploy.compression.llm_pruning import LLMPruningConfig, tokencarve_select
from ipcv_deploy.errors import CompatibilityError
from ipcv_deploy.models import load_model
from ipcv_deploy.runtime.answers import SamplingConfig
from ipcv_deploy.runtime.generate import LLMInputs, generate, language_model
from ipcv_deploy.runtime.prefill import PrefillPruner, PruningOutcome

IMAGE_SIDE = 8  # tiny Qwen2-VL: 224 px -> 16x16 patches -> 8x8 merged tokens


@dataclass
class Case:
    model: torch.nn.Module
    inputs: LLMInputs
    hf_kwargs: dict


def _qwen_case(batch_texts: list[list[int]]) -> Case:
    """Left-padded prompts ``text_i + <vision_start> image <vision_end> + tail``."""
    model = load_model("tiny-qwen2-vl").model
    cfg = model.config
    n = IMAGE_SIDE * IMAGE_SIDE
    rows = [
        [
            1,
            *text,
            cfg.vision_start_token_id,
            *([cfg.image_token_id] * n),
            cfg.vision_end_token_id,
            *list(range(40, 52)),
        ]
        for text in batch_texts
    ]
    length = max(map(len, rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :] = torch.tensor(row)
        mask[b, length - len(row) :] = 1
    patch = 3 * 2 * 14 * 14
    pixels = torch.cat(
        [
            torch.randn(4 * n, patch, generator=torch.Generator().manual_seed(t[0]))
            for t in batch_texts
        ]
    )
    grid = torch.tensor([[1, 2 * IMAGE_SIDE, 2 * IMAGE_SIDE]] * len(rows))
    mm = (ids == cfg.image_token_id).int()
    with torch.no_grad():
        features = torch.cat(model.model.get_image_features(pixels, grid).pooler_output)
        embeds = model.get_input_embeddings()(ids).masked_scatter(
            (ids == cfg.image_token_id)[..., None], features
        )
    kwargs = {"attention_mask": mask, "mm_token_type_ids": mm, "image_grid_thw": grid}
    positions = model._prepare_position_ids_for_generation(ids, {"input_ids": ids, **kwargs})
    inputs = LLMInputs(ids, mask, embeds, positions, ids == cfg.image_token_id)
    return Case(model, inputs, {"input_ids": ids, "pixel_values": pixels, **kwargs})


@pytest.fixture(scope="module")
def qwen_batch() -> Case:
    return _qwen_case([list(range(20, 31)), list(range(60, 64)), list(range(70, 77))])


def test_dense_generation_equals_hf_generate(qwen_batch: Case) -> None:
    case = qwen_batch
    ref = case.model.generate(**case.hf_kwargs, max_new_tokens=6, do_sample=False)
    ours = generate(case.model, case.inputs, SamplingConfig(max_new_tokens=6))
    assert torch.equal(ours.tokens, ref[:, case.inputs.input_ids.shape[1] :])
    with torch.no_grad():
        logits = case.model(**case.hf_kwargs).logits[:, -1]
    got = generate(case.model, case.inputs, SamplingConfig(1), return_scores=True).scores[:, 0]
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dart", "fastv", "tokencarve"])
def test_keep_all_equals_dense(qwen_batch: Case, method: str) -> None:
    dense = generate(qwen_batch.model, qwen_batch.inputs, SamplingConfig(5), return_scores=True)
    full = generate(
        qwen_batch.model,
        qwen_batch.inputs,
        SamplingConfig(5),
        LLMPruningConfig(method, keep=1.0),
        2,
        return_scores=True,
    )
    assert full.pruning.image_kept.shape[1] == IMAGE_SIDE**2
    torch.testing.assert_close(full.scores, dense.scores, rtol=1e-5, atol=1e-5)


def _masked_reference(
    case: Case, tokens: torch.Tensor, kept: torch.Tensor, layer: int, budget: int | None = None
):
    """Logits of the prompt's last token and every decoded token, from one forward.

    With ``budget`` (TokenCarve), the reference also merges: at the input of ``layer`` it runs
    TokenCarve on the attention row of layer ``layer - 1`` (taken from eager attention, not
    from the runtime's recording) and writes the merged states into the kept positions.
    """
    model, inputs = case.model, case.inputs
    batch, length = inputs.input_ids.shape
    steps = tokens.shape[1]
    decoder = language_model(model)
    with torch.no_grad():
        embeds = torch.cat(
            [inputs.inputs_embeds, model.get_input_embeddings()(tokens[:, :-1])], dim=1
        )
    last = inputs.position_ids[..., -1:]
    positions = torch.cat([inputs.position_ids, *[last + s for s in range(1, steps)]], dim=-1)
    total = length + steps - 1
    valid = torch.cat(
        [inputs.attention_mask.bool(), torch.ones(batch, steps - 1, dtype=torch.bool)], 1
    )
    dropped = torch.zeros(batch, total, dtype=torch.bool)
    dropped[:, :length] = inputs.image_mask
    for b in range(batch):
        dropped[b, kept[b]] = False
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    decoded_query = torch.arange(total) >= length
    early = causal & valid[:, None, :] & ~(decoded_query[None, :, None] & dropped[:, None, :])
    late = causal & valid[:, None, :] & ~dropped[:, None, :]
    eye = torch.eye(total, dtype=torch.bool)

    def additive(mask: torch.Tensor) -> torch.Tensor:  # padding rows see themselves
        return torch.zeros(mask.shape).masked_fill(~(mask | eye), float("-inf"))[:, None]

    early, late = additive(early), additive(late)
    rows: list[torch.Tensor] = []

    def record_row(module, args, output):
        rows.append(output[1][:, :, length - 1].mean(1))  # eager weights [B, H, L, L]

    def swap(module, args, kwargs):
        kwargs["attention_mask"] = late
        return args, kwargs

    def carve(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        for b in range(batch):
            image = inputs.image_mask[b].nonzero().squeeze(1)
            result = tokencarve_select(rows[0][b, image], hidden[b, image], budget)
            assert torch.equal(image[result.kept], kept[b]), "a different kept set"
            hidden[b, image[result.kept]] = result.states
        kwargs["attention_mask"] = late
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handles = [
        layer_.register_forward_pre_hook(swap, with_kwargs=True)
        for layer_ in decoder.layers[layer + (budget is not None) :]
    ]
    if budget is not None:
        model.set_attn_implementation("eager")
        handles.append(decoder.layers[layer - 1].self_attn.register_forward_hook(record_row))
        handles.append(decoder.layers[layer].register_forward_pre_hook(carve, with_kwargs=True))
    try:
        with torch.no_grad():
            hidden = decoder(
                inputs_embeds=embeds, attention_mask=early, position_ids=positions
            ).last_hidden_state
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation("sdpa")
    return model.get_output_embeddings()(hidden[:, length - 1 :])


@pytest.mark.parametrize("method", ["dart", "fastv", "tokencarve"])
def test_pruned_generation_equals_masked_dense_reference(qwen_batch: Case, method: str) -> None:
    """Kept tokens at their original mRoPE positions, KV of every layer cut (and, for
    TokenCarve, the merged states in place): the same logits as a full forward that hides the
    dropped tokens."""
    layer = 2
    config = LLMPruningConfig(method, keep=0.35)
    gen = generate(
        qwen_batch.model, qwen_batch.inputs, SamplingConfig(5), config, layer, return_scores=True
    )
    kept = gen.pruning.image_kept
    budget = config.budget(IMAGE_SIDE**2) if method == "tokencarve" else None
    reference = _masked_reference(qwen_batch, gen.tokens, kept, layer, budget)
    torch.testing.assert_close(gen.scores, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["dart", "fastv", "tokencarve"])
def test_kv_cache_is_cut_in_every_layer(qwen_batch: Case, method: str) -> None:
    config = LLMPruningConfig(method, keep=0.35)
    gen = generate(qwen_batch.model, qwen_batch.inputs, SamplingConfig(2), config, 2)
    n = IMAGE_SIDE**2
    kept = gen.pruning.image_kept.shape[1]
    expected = {
        "dart": 4 + 8 * int(n * 0.35 / 8),
        "fastv": int(n * 0.35),
        "tokencarve": int(n * 0.35),
    }
    assert kept == expected[method]
    assert gen.kv_tokens == qwen_batch.inputs.input_ids.shape[1] - (n - kept)
    assert gen.pruning.positions.shape == (3, gen.kv_tokens)
    dense = generate(qwen_batch.model, qwen_batch.inputs, SamplingConfig(2))
    assert gen.kv_bytes * dense.kv_tokens == dense.kv_bytes * gen.kv_tokens


@pytest.mark.parametrize("method", ["dart", "fastv", "tokencarve"])
def test_batch_equals_single_samples(method: str) -> None:
    texts = [list(range(20, 31)), list(range(60, 64)), list(range(70, 77))]
    config = LLMPruningConfig(method, keep=0.35)
    batch = _qwen_case(texts)
    together = generate(batch.model, batch.inputs, SamplingConfig(5), config, 2, return_scores=True)
    for b, text in enumerate(texts):
        single = _qwen_case([text])
        alone = generate(
            single.model, single.inputs, SamplingConfig(5), config, 2, return_scores=True
        )
        pad = batch.inputs.input_ids.shape[1] - single.inputs.input_ids.shape[1]
        assert torch.equal(together.pruning.image_kept[b] - pad, alone.pruning.image_kept[0])
        assert torch.equal(together.tokens[b], alone.tokens[0])
        torch.testing.assert_close(together.scores[b], alone.scores[0], rtol=1e-4, atol=1e-5)


def _pruner_after_selection(case: Case, cache) -> PrefillPruner:
    """A pruner for ``case`` as it stands after selecting at layer 2 (every 2nd image token)."""
    inputs = case.inputs
    decoder = language_model(case.model)
    pruner = PrefillPruner(
        decoder.layers,
        decoder.config,
        LLMPruningConfig("fastv", keep=0.5),
        2,
        inputs.image_mask,
        inputs.attention_mask,
        cache,
    )
    length = inputs.input_ids.shape[1]
    drop = inputs.image_mask.clone()
    drop[:, ::2] = False
    positions = torch.stack([(~row).nonzero().squeeze(1) for row in drop])
    pruner.outcome = PruningOutcome(positions, positions, IMAGE_SIDE**2)
    assert positions.shape[1] < length
    return pruner


def test_unknown_prefill_layouts_are_refused_not_passed_through(qwen_batch: Case) -> None:
    pruner = _pruner_after_selection(qwen_batch, DynamicCache())
    batch, length = qwen_batch.inputs.input_ids.shape
    kept = pruner.outcome.positions.shape[1]
    good = {
        "attention_mask": torch.zeros(batch, 1, length, length),
        "position_ids": torch.arange(length).expand(batch, -1),
        "position_embeddings": (torch.ones(batch, length, 8), torch.ones(batch, length, 8)),
        "cache_position": torch.arange(length),
        "use_cache": True,
    }
    out = pruner._shrink(good)
    assert out["attention_mask"].shape == (batch, 1, kept, kept)
    assert out["position_ids"].shape == (batch, kept)
    assert out["position_embeddings"][0].shape == (batch, kept, 8)
    assert torch.equal(out["cache_position"], torch.arange(kept))  # the cache slots written
    bad = {
        "attention_mask": torch.zeros(batch, length, length),  # 3-D
        "position_ids": torch.arange(length + 1).expand(batch, -1),
        "position_embeddings": torch.ones(batch, length, 8),  # not a (cos, sin) pair
        "cache_position": torch.arange(length)[None],
        "text_positions": torch.arange(length).expand(batch, -1),  # a name the pruner does not know
    }
    for name, value in bad.items():
        with pytest.raises(CompatibilityError, match=rf"decoder-layer input {name} of layout"):
            pruner._shrink({name: value})


def test_a_cache_left_uncut_is_an_error_not_a_wrong_size(qwen_batch: Case) -> None:
    cache = DynamicCache()
    pruner = _pruner_after_selection(qwen_batch, cache)
    batch, length = qwen_batch.inputs.input_ids.shape
    kept = pruner.outcome.positions.shape[1]
    for layer, n in enumerate([kept, kept, length, kept]):  # layer 2 was never cut
        cache.update(torch.zeros(batch, 2, n, 24), torch.zeros(batch, 2, n, 24), layer)
    with pytest.raises(CompatibilityError, match=rf"holds \[{kept}, {kept}, {length}, {kept}\]"):
        pruner.check_cache()
    layer_2 = cache.layers[2]
    layer_2.keys, layer_2.values = layer_2.keys[:, :, :kept], layer_2.values[:, :, :kept]
    pruner.check_cache()  # every layer at the kept length
