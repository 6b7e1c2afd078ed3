"""`quantize.attention`: the quantized model's attention kernel, chosen, saved and loaded back."""

from __future__ import annotations

import json

import pytest
import torch

from llm_lightning.models import load_exported
from llm_lightning.models.export import export_model
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.saved import META_FILE
from llm_lightning.quantization.settings import ATTENTIONS
from llm_lightning.quantize import quantize_run
from tests.conftest import make_cfg
from tests.test_quantize import RELATIVE_TOLERANCE, TEXTS

QUICK = [
    "quantize=int8_dynamic",
    "quantize.compile=false",
    "quantize.smoothquant_alpha=null",
    "bench=quick",
    "task.limit=24",
]


def attention_of(model) -> str:
    return model.config._attn_implementation


@pytest.mark.parametrize(("setting", "expected"), [("eager", "eager"), ("null", "sdpa")])
def test_the_quantized_model_runs_saves_and_loads_with_the_chosen_attention(
    tiny, tmp_path, setting, expected
):
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "model")
    assert attention_of(load_exported(tmp_path / "model")[0]) == "sdpa"  # what an exported folder loads with
    quantize_run(make_cfg(tmp_path, [*QUICK, f"quantize.attention={setting}"]), tmp_path)
    meta = json.loads((tmp_path / "quantized" / META_FILE).read_text())
    assert meta["attn_implementation"] == expected
    loaded, _, _ = load_saved(tmp_path / "quantized")
    assert attention_of(loaded) == expected
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quantize"]["attention"] == (None if setting == "null" else setting)


def test_eager_and_sdpa_compute_the_same_model(tiny, tmp_path):
    """The kernel is a speed choice: in fp32 both give the same logits, and the int8 model is as
    close to fp32 with either (int8 steps turn float rounding into differences of 1e-3 here)."""
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "model")
    quantize_run(make_cfg(tmp_path, [*QUICK, "quantize.attention=eager"]), tmp_path)
    int8 = {kernel: load_saved(tmp_path / "quantized")[0] for kernel in ATTENTIONS}
    fp32 = {kernel: load_exported(tmp_path / "model")[0] for kernel in ATTENTIONS}
    for models in (int8, fp32):
        models["sdpa"].set_attn_implementation("sdpa")
        models["eager"].set_attn_implementation("eager")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = {
            (kind, k): m(**batch).logits
            for kind, ms in (("int8", int8), ("fp32", fp32))
            for k, m in ms.items()
        }
    torch.testing.assert_close(logits["fp32", "eager"], logits["fp32", "sdpa"], atol=1e-5, rtol=0)
    bound = RELATIVE_TOLERANCE * logits["fp32", "eager"].abs().max()
    for kernel in ATTENTIONS:
        assert (logits["int8", kernel] - logits["fp32", kernel]).abs().max() < bound, kernel


def test_an_unknown_attention_is_refused_before_anything_is_written(tiny, tmp_path):
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "model")
    cfg = make_cfg(tmp_path, [*QUICK, "quantize.attention=flash"])
    with pytest.raises(ValueError, match=r"quantize.attention='flash' is not one of \('eager', 'sdpa'\)"):
        quantize_run(cfg, tmp_path)
    assert not (tmp_path / "quantized").exists() and not (tmp_path / "report.json").exists()
