"""quantize=bf16 on the tiny random Llama: the cast, its folder (plain transformers), the command, bad settings."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModelForSequenceClassification

from llm_lightning.errors import UserError
from llm_lightning.models.export import export_model
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.saved import META_FILE, save_quantized
from llm_lightning.quantization.settings import check_settings
from llm_lightning.quantization.torchao_path import quantize_model
from tests.conftest import CONF, run_module

TEXTS = ["a gorgeous, moving film", "dull and far too long", "fine", "an utter mess of a plot, but the cast"]
# bf16 keeps 8 bits of mantissa: the tiny model's logits move by ~0.4% of their size; a wrong cast
# (a layer left out, a bad scale) moves them by far more, or not at all
RELATIVE_TOLERANCE = 0.03


def logits(model: nn.Module, tokenizer) -> torch.Tensor:
    with torch.inference_mode():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.float()


def test_bf16_casts_every_weight_and_keeps_logits_close(tiny):
    model, tokenizer = tiny
    reference = logits(model, tokenizer)
    cast = quantize_model(copy.deepcopy(model), "bf16")
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    diff = (logits(cast, tokenizer) - reference).abs().max()
    assert 0 < diff <= RELATIVE_TOLERANCE * reference.abs().max(), (float(diff), float(reference.abs().max()))


def test_a_bf16_folder_loads_with_transformers_alone_and_through_load_saved(tiny, tmp_path):
    model, tokenizer = tiny
    cast = quantize_model(copy.deepcopy(model), "bf16")
    target = save_quantized(cast, tokenizer, tmp_path / "quantized", "bf16", compile=True)
    meta = json.loads((target / META_FILE).read_text())
    assert meta["method"] == "bf16" and meta["weights"] == "model.safetensors" and meta["torchao"] is None
    assert not (target / "quantized_weights.pt").exists()
    # what a user deploys with: transformers only, no llm_lightning, no torchao
    plain = AutoModelForSequenceClassification.from_pretrained(target, dtype=torch.bfloat16).eval()
    loaded, _, names = load_saved(target)
    assert names == ["negative", "positive"]
    assert loaded.config._attn_implementation == "eager"
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(logits(loaded, tokenizer), logits(cast, tokenizer), atol=0, rtol=0)
    torch.testing.assert_close(logits(plain, tokenizer), logits(cast, tokenizer), atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("skip", ["score"], "quantize.skip=['score']: bf16 casts the whole model"),
        ("smoothquant_alpha", 0.5, "quantize.smoothquant_alpha=0.5 needs quantize=int8_dynamic"),
        ("fuse_projections", True, "quantize.fuse_projections=true is for the torchao int8 methods"),
        ("attention", "flash", "quantize.attention='flash' is not one of"),
    ],
)
def test_bf16_refuses_the_int8_settings_naming_the_key(key, value, words):
    qcfg = OmegaConf.load(CONF / "quantize" / "bf16.yaml")
    check_settings(qcfg)  # as shipped: fine
    qcfg[key] = value
    with pytest.raises(UserError) as err:
        check_settings(qcfg)
    assert words in str(err.value)


def test_quantize_command_writes_a_bf16_folder_and_reports_it(tiny, tmp_path):
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "run" / "model")
    out = tmp_path / "q"
    done = run_module(
        "llm_lightning.quantize",
        f"model_path={tmp_path / 'run' / 'model'}",
        "quantize=bf16",
        "quantize.compile=false",  # compiling takes minutes on two cores; compile is tested elsewhere
        "bench=quick",
        "task.limit=16",
        f"hydra.run.dir={out}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "bf16"]
    # bf16 weights take half the bytes of fp32 on disk
    assert report["stages"][1]["size_mb"] < 0.6 * report["stages"][0]["size_mb"]
    assert report["stages"][1]["vs_first_agreement"] >= 0.9  # near lossless on the same texts
