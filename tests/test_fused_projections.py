"""`quantize.fuse_projections`: q/k/v and gate/up stacked into one linear layer each."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torchao.quantization import Int8Tensor

from llm_lightning.measure.compiling import maybe_compile
from llm_lightning.measure.padding_free import PaddingFree, padding_free
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.centering import CENTERED
from llm_lightning.quantization.fused_projections import GATE_UP, QKV, fuse_projections
from llm_lightning.quantization.saved import META_FILE, save_quantized
from llm_lightning.quantization.torchao_path import calibration_inputs, quantize_model
from tests.test_quantize import logits

SPLIT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def int8(model, tokenizer, fuse: bool, **kwargs):
    calibration = calibration_inputs(tokenizer, ["what a film", "boring", "I laughed, I cried"], 3, 64)
    return quantize_model(
        copy.deepcopy(model),
        "int8_dynamic",
        smoothquant_alpha=0.5,
        calibration=calibration,
        activations="asymmetric",
        fuse_projections=fuse,
        **kwargs,
    )


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_fused_float_model_gives_the_same_logits(tiny, attention):
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    model.set_attn_implementation(attention)
    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == 2 * len(model.model.layers)
    layer = fused.model.layers[0]
    assert isinstance(getattr(layer.self_attn, QKV), nn.Linear) and isinstance(
        getattr(layer.mlp, GATE_UP), nn.Linear
    )
    assert not any(hasattr(layer.self_attn, p) or hasattr(layer.mlp, p) for p in SPLIT)
    q = model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(layer.self_attn.qkv_proj.weight[: q.shape[0]], q)  # rows: q first
    torch.testing.assert_close(logits(fused, tokenizer), logits(model, tokenizer), atol=1e-5, rtol=0)
    assert fuse_projections(fused) == 0  # idempotent


def test_fused_int8_model_is_quantized_and_as_close_to_float(tiny):
    model, tokenizer = tiny
    reference = logits(model, tokenizer)
    fused, split = int8(model, tokenizer, True), int8(model, tokenizer, False)
    linears = {n: m for n, m in fused.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 4 * len(model.model.layers) + 1  # qkv, o, gate_up, down; score
    assert all(isinstance(m.weight, Int8Tensor) and getattr(m, CENTERED) for m in linears.values())
    fused_error = (logits(fused, tokenizer) - reference).abs().max()
    split_error = (logits(split, tokenizer) - reference).abs().max()
    assert 0 < fused_error <= 0.10 * reference.abs().max()
    assert fused_error <= 2 * split_error  # one SmoothQuant divisor per input costs little


def test_fused_int8_model_round_trips_through_save_and_load(tiny, tmp_path):
    model, tokenizer = tiny
    fused = int8(model, tokenizer, True)
    target = save_quantized(fused, tokenizer, tmp_path / "q", "int8_dynamic", activations="asymmetric")
    meta = json.loads((target / META_FILE).read_text())
    assert meta["format"] == 3 and meta["fused_projections"] is True
    loaded, _, _ = load_saved(target)
    assert hasattr(loaded.model.layers[1].mlp, GATE_UP)
    assert isinstance(loaded.model.layers[1].mlp.gate_up_proj.weight, Int8Tensor)
    torch.testing.assert_close(logits(loaded, tokenizer), logits(fused, tokenizer), atol=1e-6, rtol=0)


def test_fused_int8_model_compiles_and_packs(tiny):
    """Each decoder layer compiled (the decoder as one graph: tests/test_bench_harness.py)."""
    model, tokenizer = tiny
    fused = int8(model, tokenizer, True)
    reference = logits(model, tokenizer)
    error = (logits(fused, tokenizer) - reference).abs().max()
    compiled = maybe_compile(copy.deepcopy(fused), True)
    decoder = compiled.model
    assert decoder._compiled_call_impl is None
    assert all(layer._compiled_call_impl is not None for layer in decoder.layers)
    fast = padding_free(compiled, tokenizer.pad_token_id)
    assert isinstance(fast, PaddingFree)
    # compiled kernels round differently, and packed rows meet other attention kernels: 3x, as
    # tests/test_bench_harness.py (on an Ice Lake Xeon with VNNI, 1.5x was exceeded)
    assert (logits(fast, tokenizer) - reference).abs().max() <= 3 * error + 1e-4


def test_a_group_with_a_skipped_layer_stays_unfused(tiny):
    model, tokenizer = tiny
    fused = int8(model, tokenizer, True, skip=["model.layers.0.self_attn.v_proj"])
    attention, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert not hasattr(attention, QKV) and type(attention.v_proj.weight) is nn.Parameter
    assert isinstance(attention.q_proj.weight, Int8Tensor)
    assert isinstance(mlp.gate_up_proj.weight, Int8Tensor)
    assert hasattr(fused.model.layers[1].self_attn, QKV)


def test_other_attention_classes_are_left_alone(tiny):
    model, _ = tiny
    model = copy.deepcopy(model)
    attention = model.model.layers[0].self_attn

    class OwnForward(type(attention)):
        def forward(self, *args, **kwargs):  # a subclass computing attention its own way
            return super().forward(*args, **kwargs)

    attention.__class__ = OwnForward
    assert fuse_projections(model) == 2 * len(model.model.layers) - 1
    assert hasattr(attention, "q_proj") and not hasattr(attention, QKV)
