"""SmoothQuant folded into the weights (llm_lightning.runtimes.folded_smoothing): the same float
function, with the activation ranges moved into the weights by the scales the paper gives."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from llm_lightning.runtimes.folded_smoothing import decoder_layers, fold_smoothquant, input_ranges
from tests.test_llama3_shapes import ROPE

ROWS = [[5, 9, 3, 17, 2], [8, 1, 44, 6], [12, 30, 7, 7, 9, 21, 4]]


def llama3_shaped() -> LlamaForSequenceClassification:
    """Grouped-query attention, an explicit head_dim (heads * head_dim != hidden), llama3 rope
    scaling, no pad token: what Llama-3 checkpoints bring and the tiny model has not."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        rope_scaling=ROPE,
        num_labels=2,
    )
    torch.manual_seed(0)
    return LlamaForSequenceClassification(config).eval()


def with_outliers(model):
    """A few channels 30x wider at every norm, as trained Llamas have: the ranges to smooth."""
    with torch.no_grad():
        for layer in decoder_layers(model):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:3] *= 30
    return model


def logits(model, rows=ROWS):
    with torch.inference_mode():
        return torch.cat([model(input_ids=torch.tensor([row])).logits for row in rows])


@pytest.fixture(params=["tiny", "llama3-shaped"])
def model(request, tiny):
    return with_outliers(copy.deepcopy(tiny[0]) if request.param == "tiny" else llama3_shaped())


@pytest.mark.parametrize("alpha", [0.5, 0.85])
def test_folding_keeps_the_float_function(model, alpha):
    before = logits(model)
    folded = fold_smoothquant(copy.deepcopy(model), ROWS, alpha)
    layer, folded_layer = decoder_layers(model)[0], decoder_layers(folded)[0]
    # the weights did move (a no-op fold would pass the logits check too)
    assert not torch.allclose(layer.input_layernorm.weight, folded_layer.input_layernorm.weight)
    assert not torch.allclose(layer.mlp.up_proj.weight, folded_layer.mlp.up_proj.weight)
    torch.testing.assert_close(logits(folded), before, rtol=1e-4, atol=1e-4)


def test_alpha_one_moves_every_range_into_the_weights(model):
    """At alpha 1 the scale is the channel's own max|x|, so every smoothed input channel's range on
    the calibration texts becomes 1: each of the three folds divides the right side."""
    fold_smoothquant(model, ROWS, 1.0)
    for got in input_ranges(model, ROWS).values():
        torch.testing.assert_close(got, torch.ones_like(got), rtol=1e-4, atol=1e-4)


def test_smoothing_narrows_the_outlier_channels(model):
    """At alpha 0.5 the widest input channel of the q/k/v projections comes closer to the median one."""

    def spread(m):
        q = input_ranges(m, ROWS)[0, "self_attn.q_proj"]
        return (q.max() / q.median()).item()

    before = spread(model)
    assert spread(fold_smoothquant(model, ROWS, 0.5)) < before / 3


def test_ranges_measured_once_fold_a_copy_as_measuring_again_does(model):
    """`auto` measures the calibration ranges once and folds each candidate's copy with them."""
    ranges = input_ranges(model, ROWS)
    once = fold_smoothquant(copy.deepcopy(model), ROWS, 0.6, ranges)
    again = fold_smoothquant(copy.deepcopy(model), ROWS, 0.6)
    for a, b in zip(once.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # and the ranges given are the ones folded with: other ranges, other weights
    wider = fold_smoothquant(copy.deepcopy(model), ROWS, 0.6, {k: 4 * v for k, v in ranges.items()})
    norm = decoder_layers(wider)[0].input_layernorm.weight
    assert not torch.allclose(norm, decoder_layers(once)[0].input_layernorm.weight)
