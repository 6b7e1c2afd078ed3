"""Post-training quantization on the tiny random Llama: weight types, logits, save/load, bad input."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torchao.quantization import Int8Tensor

from llm_lightning.measure.compiling import maybe_compile
from llm_lightning.models.export import export_model
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.saved import FORMAT_VERSION, META_FILE, save_quantized
from llm_lightning.quantization.settings import METHODS, QuantizationUnsupportedError, check_settings
from llm_lightning.quantization.torchao_path import quantize_model
from llm_lightning.quantize import quantize_run
from tests.conftest import CONF, make_cfg, run_module

CPU_METHODS = ("int8_dynamic", "int8_weight_only")
# Largest |quantized - fp32| logit, relative to the largest |fp32| logit. Measured on the tiny
# model: 1.6% (int8 dynamic), 3.6% (int8 weight-only); a wrong scale or layout is far above 10%.
RELATIVE_TOLERANCE = 0.10
TEXTS = ["a gorgeous, moving film", "dull and far too long", "fine", "an utter mess of a plot, but the cast"]


def logits(model: nn.Module, tokenizer) -> torch.Tensor:
    with torch.inference_mode():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.float()


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", CPU_METHODS)
def test_quantize_turns_linear_weights_int8_and_keeps_logits_close(tiny, method):
    model, tokenizer = tiny
    reference = logits(model, tokenizer)
    quantized = quantize_model(copy.deepcopy(model), method)
    weights = linear_weights(quantized)
    assert len(weights) == 2 * 7 + 1  # 2 layers x (q, k, v, o, gate, up, down) + the score head
    for name, weight in weights.items():
        assert isinstance(weight, Int8Tensor), (name, type(weight))
        assert weight.qdata.dtype == torch.int8, name
    # Embeddings are a lookup, not a matmul: they stay fp32.
    assert type(quantized.model.embed_tokens.weight) is nn.Parameter
    assert quantized.model.embed_tokens.weight.dtype == torch.float32
    diff = (logits(quantized, tokenizer) - reference).abs().max()
    assert diff <= RELATIVE_TOLERANCE * reference.abs().max(), (float(diff), float(reference.abs().max()))
    assert diff > 0  # int8 rounding shows: the weights really changed


def test_none_leaves_the_model_as_it_was(tiny):
    model, tokenizer = tiny
    same = quantize_model(copy.deepcopy(model), "none")
    assert all(type(w) is nn.Parameter for w in linear_weights(same).values())
    torch.testing.assert_close(logits(same, tokenizer), logits(model, tokenizer))


def test_unknown_method_lists_the_choices(tiny):
    with pytest.raises(ValueError, match=r"quantize.method='int3'.*int8_dynamic.*config group `quantize=`"):
        quantize_model(copy.deepcopy(tiny[0]), "int3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="int4 weight-only runs where CUDA is present")
def test_int4_on_cpu_fails_early_saying_what_to_use_instead(tiny):
    model = copy.deepcopy(tiny[0])
    with pytest.raises(QuantizationUnsupportedError) as err:
        quantize_model(model, "int4_weight_only")
    message = str(err.value)
    for words in ("int4_weight_only", "cannot run on this platform", "cpu", "quantize=int8_dynamic"):
        assert words in message, message
    # It failed before touching the model.
    assert all(type(w) is nn.Parameter for w in linear_weights(model).values())
    with pytest.raises(QuantizationUnsupportedError):
        check_settings(OmegaConf.load(CONF / "quantize" / "int4_weight_only.yaml"))


def test_compile_flag_compiles_each_decoder_layer(tiny):
    model = copy.deepcopy(tiny[0])
    assert maybe_compile(model, False) is model and model.model.layers[0]._compiled_call_impl is None
    assert maybe_compile(model, True) is model  # in place: saving and loading see the same module tree
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.score._compiled_call_impl is None
    whole = maybe_compile(nn.Sequential(nn.Linear(4, 4)), True)
    assert isinstance(whole, torch._dynamo.eval_frame.OptimizedModule)


def test_every_choice_has_a_config_with_the_same_keys():
    for method in METHODS:
        cfg = OmegaConf.load(CONF / "quantize" / f"{method}.yaml")
        assert cfg.method == method
        assert {"method", "compile", "require_speedup"} <= set(cfg), method


@pytest.mark.parametrize("method", CPU_METHODS)
def test_save_and_load_round_trip(tiny, tmp_path, method):
    model, tokenizer = tiny
    quantized = quantize_model(copy.deepcopy(model), method)
    target = save_quantized(quantized, tokenizer, tmp_path / "quantized", method, compile=True)
    meta = json.loads((target / META_FILE).read_text())
    assert meta["method"] == method and meta["compile"] is True and meta["format"] == FORMAT_VERSION
    assert (target / meta["weights"]).exists() and (target / "config.json").exists()
    loaded, loaded_tokenizer, names = load_saved(target)  # what evaluate and predict call
    assert names == ["negative", "positive"]
    assert all(isinstance(w, Int8Tensor) for w in linear_weights(loaded).values())
    assert loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(logits(loaded, tokenizer), logits(quantized, tokenizer), atol=1e-6, rtol=0)


def test_quantize_run_refuses_none(tmp_path):
    with pytest.raises(ValueError, match="leaves nothing to quantize.*int8_dynamic"):
        quantize_run(make_cfg(tmp_path, ["quantize=none"]), tmp_path)


def test_quantize_run_without_an_exported_model_says_how_to_get_one(tmp_path):
    cfg = make_cfg(tmp_path, ["quantize=int8_dynamic"])
    with pytest.raises(FileNotFoundError, match="export=true"):
        quantize_run(cfg, tmp_path)


def test_quantize_command_saves_evaluates_and_reports(tiny, tmp_path):
    """`python -m llm_lightning.quantize` on an exported folder: quantized/, the report, threads recorded."""
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "run" / "model")
    out = tmp_path / "q"
    done = run_module(
        "llm_lightning.quantize",
        f"model_path={tmp_path / 'run' / 'model'}",
        "quantize=int8_weight_only",
        "bench=quick",
        "task.limit=16",
        "runtime.threads=1",
        f"hydra.run.dir={out}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads(done.stdout[done.stdout.index("{") :])
    assert 0.0 <= metrics["quantize/acc"] <= 1.0 and metrics["quantize/tokens_per_s_b16"] > 0
    assert metrics["quantize/threads"] == 1.0
    for name in ("report.json", "report.md", "pareto.png", "quantized/quantization.json"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "int8_weight_only"]
    assert report["stages"][1]["input"] == "fp32"
    assert report["runtime"] == {"threads": 1} and report["environment"]["threads"] == 1
    # int8 linear weights take a quarter of fp32 on disk; the fp32 embeddings keep it above that.
    assert report["stages"][1]["size_mb"] < 0.7 * report["stages"][0]["size_mb"]
    loaded, _, _ = load_saved(out / "quantized")
    assert all(isinstance(w, Int8Tensor) for w in linear_weights(loaded).values())


def test_a_quantized_folder_from_another_torchao_minor_version_is_refused_naming_both(tiny, tmp_path):
    import torchao

    from llm_lightning.errors import UserError

    model, tokenizer = tiny
    quantized = quantize_model(copy.deepcopy(model), "int8_weight_only")
    save_quantized(quantized, tokenizer, tmp_path / "q", "int8_weight_only")
    meta_file = tmp_path / "q" / "quantization.json"
    meta = json.loads(meta_file.read_text())
    assert meta["torchao"] == torchao.__version__
    meta["torchao"] = "0.11.0"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"torchao 0\.11\.0, and torchao {re.escape(torchao.__version__)}"):
        load_saved(tmp_path / "q")
