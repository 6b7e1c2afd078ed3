"""`quantize.smoothquant_alpha`: torchao SmoothQuant in front of int8 dynamic, on the tiny Llama."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torchao.quantization import Int8Tensor

from llm_lightning.models.export import export_model
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.saved import META_FILE, save_quantized
from llm_lightning.quantization.torchao_path import calibration_inputs, quantize_model
from llm_lightning.quantize import quantize_run
from tests.conftest import make_cfg
from tests.test_quantize import logits


def smoothquant(model: nn.Module, tokenizer, alpha: float = 0.5, skip=("score",)) -> nn.Module:
    calibration = calibration_inputs(tokenizer, ["what a film", "boring", "I laughed, I cried"], 3, 64)
    return quantize_model(
        copy.deepcopy(model),
        "int8_dynamic",
        skip=list(skip),
        smoothquant_alpha=alpha,
        calibration=calibration,
    )


def test_smoothing_moves_into_the_weights_and_out_of_the_activations(tiny):
    model, tokenizer = tiny
    quantized = smoothquant(model, tokenizer)
    original = dict(model.named_modules())
    checked = 0
    for name, module in quantized.named_modules():
        if not isinstance(module, nn.Linear) or name == "score":
            continue
        weight, fp32 = module.weight, original[name].weight
        assert isinstance(weight, Int8Tensor), name
        scale = weight.act_pre_scale  # 1 / s, applied to the activation at run time
        assert scale.shape == (fp32.shape[1],) and bool((scale > 0).all()), name
        assert not torch.allclose(scale, torch.ones_like(scale)), name  # a real per-channel factor
        # W * s was quantized: undoing s recovers W up to int8 rounding.
        restored = weight.dequantize() * scale
        assert (restored - fp32).abs().max() <= 0.02 * fp32.abs().max(), name
        checked += 1
    assert checked == 14
    assert type(quantized.score.weight) is nn.Parameter  # skip still applies
    diff = (logits(quantized, tokenizer) - logits(model, tokenizer)).abs().max()
    assert 0 < diff <= 0.10 * logits(model, tokenizer).abs().max()


def test_alpha_zero_smooths_by_the_weights_alone(tiny):
    """alpha=0: s_j = 1 / max|W_:,j|, independent of the calibration activations."""
    model, tokenizer = tiny
    quantized = smoothquant(model, tokenizer, alpha=0.0, skip=[])
    w = model.model.layers[0].self_attn.q_proj.weight
    expected = w.abs().amax(dim=0) + torch.finfo(torch.float32).eps  # 1/s
    got = quantized.model.layers[0].self_attn.q_proj.weight.act_pre_scale
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_saved_smoothquant_model_loads_with_its_scales(tiny, tmp_path):
    model, tokenizer = tiny
    quantized = smoothquant(model, tokenizer)
    target = save_quantized(
        quantized, tokenizer, tmp_path / "q", "int8_dynamic", skip=["score"], smoothquant_alpha=0.5
    )
    meta = json.loads((target / META_FILE).read_text())
    assert meta["smoothquant_alpha"] == 0.5 and meta["skip"] == ["score"]
    loaded, _, _ = load_saved(target)
    assert loaded.model.layers[1].mlp.down_proj.weight.act_pre_scale is not None
    torch.testing.assert_close(logits(loaded, tokenizer), logits(quantized, tokenizer), atol=1e-6, rtol=0)


def test_bad_smoothquant_settings_are_reported_together(tiny):
    model = tiny[0]
    with pytest.raises(ValueError) as err:
        quantize_model(copy.deepcopy(model), "int8_weight_only", smoothquant_alpha=1.5)
    message = str(err.value)
    for words in ("needs quantize=int8_dynamic", "must be in [0, 1]", "needs calibration texts"):
        assert words in message, message
    assert all(type(m.weight) is nn.Parameter for m in model.modules() if isinstance(m, nn.Linear))


def test_quantize_run_calibrates_on_the_training_split(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "model")
    seen = []
    real = calibration_inputs

    def spy(tok, texts, n, max_length):
        seen.append((list(texts[:n]), n))
        return real(tok, texts, n, max_length)

    monkeypatch.setattr("llm_lightning.quantization.torchao_path.calibration_inputs", spy)
    cfg = make_cfg(
        tmp_path,
        [
            "quantize=int8_dynamic",
            "quantize.compile=false",
            "quantize.smoothquant_alpha=0.5",
            "quantize.calibration_texts=5",
            "bench=quick",
            "task.limit=16",
        ],
    )
    quantize_run(cfg, tmp_path)
    from llm_lightning.data import load_task

    data = load_task(cfg.task, cfg.seed)
    assert seen == [(data.train.texts[:5], 5)]
    assert not set(seen[0][0]) & set(data.test.texts)
    meta = json.loads((tmp_path / "quantized" / META_FILE).read_text())
    assert meta["smoothquant_alpha"] == 0.5
