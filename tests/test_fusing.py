"""`quantize.fuse`: q/k/v and gate/up fused into one linear layer each (llm_lightning.fusing)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llm_lightning.compiling import maybe_compile
from llm_lightning.fusing import fuse_projections, is_fused
from llm_lightning.models.saved import load_saved
from llm_lightning.quantize import quantize_model
from llm_lightning.quantized_dir import META_FILE, save_quantized
from tests.test_quantize import logits


def linear_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_fused_float_model_computes_the_same_logits(tiny, attn):
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    model.config._attn_implementation = attn
    reference = logits(model, tokenizer)
    layers = len(model.model.layers)
    assert fuse_projections(model) == 2 * layers
    names = linear_names(model)
    assert {f"model.layers.{i}.self_attn.qkv_proj" for i in range(layers)} <= names
    assert {f"model.layers.{i}.mlp.gate_up_proj" for i in range(layers)} <= names
    assert not {n.rsplit(".", 1)[-1] for n in names} & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
    torch.testing.assert_close(logits(model, tokenizer), reference, atol=1e-5, rtol=1e-5)
    assert fuse_projections(model) == 0  # idempotent


def test_a_skipped_layer_keeps_its_group_unfused(tiny):
    model, tokenizer = tiny
    reference = logits(model, tokenizer)
    quantized = quantize_model(
        copy.deepcopy(model), "int8_dynamic", skip=["model.layers.0.self_attn.v_proj"], fuse=True
    )
    names = linear_names(quantized)
    assert "model.layers.0.self_attn.v_proj" in names and "model.layers.1.self_attn.qkv_proj" in names
    assert "model.layers.0.mlp.gate_up_proj" in names
    assert type(quantized.model.layers[0].self_attn.v_proj.weight) is torch.nn.Parameter  # still float
    assert (logits(quantized, tokenizer) - reference).abs().max() < 0.05


@pytest.mark.parametrize("activations", ["symmetric", "asymmetric"])
def test_fused_int8_matches_unfused_int8(tiny, activations):
    """Fusing changes which matmul runs, not what is quantized: per-token activation scales are the
    same for q, k and v (one input), weight scales are per output row."""
    model, tokenizer = tiny
    plain = quantize_model(copy.deepcopy(model), "int8_dynamic", activations=activations)
    fused = quantize_model(copy.deepcopy(model), "int8_dynamic", activations=activations, fuse=True)
    assert is_fused(fused) and not is_fused(plain)
    torch.testing.assert_close(logits(fused, tokenizer), logits(plain, tokenizer), atol=1e-4, rtol=1e-4)
    compiled = logits(maybe_compile(fused, True), tokenizer)
    torch.testing.assert_close(compiled, logits(plain, tokenizer), atol=2e-2, rtol=0)


def test_fused_int8_saves_and_loads(tiny, tmp_path):
    model, tokenizer = tiny
    settings = {"skip": ["model.layers.1.mlp.up_proj"], "smoothquant_alpha": None, "activations": "asymmetric"}
    quantized = quantize_model(copy.deepcopy(model), "int8_dynamic", fuse=True, **settings)
    expected = logits(quantized, tokenizer)
    target = save_quantized(quantized, tokenizer, tmp_path / "q", "int8_dynamic", **settings)
    assert json.loads((target / META_FILE).read_text())["fused"] is True
    loaded, loaded_tokenizer, _ = load_saved(target)
    assert linear_names(loaded) == linear_names(quantized)
    torch.testing.assert_close(logits(loaded, loaded_tokenizer), expected)
