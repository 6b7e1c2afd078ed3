"""`quantize.skip`: linear layers matched by fnmatch patterns stay float; the rest are quantized."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchao.quantization import Int8Tensor

from llm_lightning.models.export import export_model
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.saved import META_FILE, save_quantized
from llm_lightning.quantization.torchao_path import linear_names, quantize_model, skipped_linears
from llm_lightning.quantize import quantize_run
from tests.conftest import CONF, make_cfg
from tests.test_quantize import linear_weights, logits


@pytest.mark.parametrize("method", ["int8_dynamic", "int8_weight_only"])
def test_skipped_layers_stay_float_and_the_rest_are_quantized(tiny, method):
    model, tokenizer = tiny
    skip = ["*.down_proj", "score", "model.layers.0.self_attn.*"]
    quantized = quantize_model(copy.deepcopy(model), method, skip=skip)
    kept = {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)} | {"score"}
    kept |= {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
    original = linear_weights(model)
    for name, weight in linear_weights(quantized).items():
        if name in kept:
            assert type(weight) is nn.Parameter and weight.dtype == torch.float32, name
            torch.testing.assert_close(weight, original[name], rtol=0, atol=0)  # untouched
        else:
            assert isinstance(weight, Int8Tensor) and weight.qdata.dtype == torch.int8, name
    assert len(kept) == 7 and len(linear_weights(quantized)) - len(kept) == 8
    # Fewer layers rounded: the logits stay at least as close to fp32 as with everything quantized.
    reference = logits(model, tokenizer)
    everything = quantize_model(copy.deepcopy(model), method)
    diff_skip = (logits(quantized, tokenizer) - reference).abs().max()
    diff_all = (logits(everything, tokenizer) - reference).abs().max()
    assert 0 < diff_skip <= diff_all


def test_a_pattern_that_matches_nothing_names_it_and_lists_the_layers(tiny):
    model = copy.deepcopy(tiny[0])
    with pytest.raises(ValueError) as err:
        quantize_model(model, "int8_dynamic", skip=["score", "*.down_prj", "model.layers.7.*"])
    message = str(err.value)
    assert "quantize.skip" in message and "'*.down_prj'" in message and "'model.layers.7.*'" in message
    assert "'score'" not in message.split("match no")[0]  # only the bad patterns are blamed
    assert "15 linear layers" in message and "model.layers.0.self_attn.q_proj" in message
    # It failed before quantizing anything.
    assert all(type(w) is nn.Parameter for w in linear_weights(model).values())


def test_patterns_match_whole_qualified_names(tiny):
    model = tiny[0]
    assert skipped_linears(model, []) == set()
    assert skipped_linears(model, ["score"]) == {"score"}
    # `down_proj` alone is not a layer name: a glob must cover the whole qualified name.
    with pytest.raises(ValueError, match="'down_proj'"):
        skipped_linears(model, ["down_proj"])
    assert skipped_linears(model, ["model.layers.1.*"]) == {
        n for n in linear_names(model) if ".layers.1." in n
    }


def test_saved_model_keeps_the_skipped_layers_float(tiny, tmp_path):
    model, tokenizer = tiny
    skip = ["*.down_proj", "score"]
    quantized = quantize_model(copy.deepcopy(model), "int8_dynamic", skip=skip)
    target = save_quantized(quantized, tokenizer, tmp_path / "quantized", "int8_dynamic", skip=skip)
    assert json.loads((target / META_FILE).read_text())["skip"] == skip
    loaded, _, _ = load_saved(target)
    for name, weight in linear_weights(loaded).items():
        float_kept = name == "score" or name.endswith("down_proj")
        assert (type(weight) is nn.Parameter) == float_kept, name
        assert isinstance(weight, Int8Tensor) != float_kept, name
    torch.testing.assert_close(logits(loaded, tokenizer), logits(quantized, tokenizer), atol=1e-6, rtol=0)


def test_default_int8_dynamic_skip_fits_any_depth(tiny):
    """The shipped patterns must not name a layer index: the chain quantizes a 15-layer student."""
    skip = list(OmegaConf.load(CONF / "quantize" / "int8_dynamic.yaml").skip)
    for pattern in skip:
        assert ".layers." not in pattern or "*" in pattern.split(".layers.")[1].split(".")[0], pattern
    skipped_linears(tiny[0], skip)  # every pattern matches the 2-layer tiny model too


def test_quantize_run_reads_quantize_skip_from_the_config(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "model")
    overrides = ["quantize=int8_dynamic", "quantize.compile=false", "bench=quick", "task.limit=16"]
    quantize_run(make_cfg(tmp_path, [*overrides, "quantize.skip=[score]"]), tmp_path)
    assert json.loads((tmp_path / "quantized" / META_FILE).read_text())["skip"] == ["score"]
    loaded, _, _ = load_saved(tmp_path / "quantized")
    assert type(loaded.score.weight) is nn.Parameter
    assert isinstance(loaded.model.layers[0].mlp.down_proj.weight, Int8Tensor)
    # A typo fails before the fp32 model is measured (minutes on a real model), not after.
    measured = []
    monkeypatch.setattr(
        "llm_lightning.measure.stage_report.measure_stage", lambda *a, **k: measured.append(a[0])
    )
    with pytest.raises(ValueError, match=r"\['scores'\] match no linear layer"):
        quantize_run(
            make_cfg(tmp_path, [*overrides, "quantize.skip=[scores]"]), tmp_path / "bad", tmp_path / "model"
        )
    assert measured == [] and not (tmp_path / "bad").exists()
