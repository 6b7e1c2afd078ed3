"""`quantize.activations`: symmetric or asymmetric (zero-point) per-token int8 activations."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torchao.quantization import MappingType

from llm_lightning.compiling import maybe_compile
from llm_lightning.models.saved import load_saved
from llm_lightning.quantize import META_FILE, quantize_model, save_quantized
from tests.test_quantize import logits


def int8(model, activations: str):
    return quantize_model(copy.deepcopy(model), "int8_dynamic", activations=activations)


def test_activations_choose_the_mapping_of_every_quantized_layer(tiny):
    model, _ = tiny
    for activations, mapping in (
        ("symmetric", MappingType.SYMMETRIC),
        ("asymmetric", MappingType.ASYMMETRIC),
    ):
        quantized = int8(model, activations)
        linears = [m for m in quantized.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.weight.act_quant_kwargs.mapping_type == mapping for m in linears)


def test_both_activation_mappings_stay_close_to_fp32(tiny):
    """After SiLU or a norm the activations are not centred on 0; a zero point spends the int8
    range on [min, max] instead of [-max|x|, max|x|]. Which is closer is a matter for the real
    model (docs/BENCHMARKS.md); here both must quantize (differ) and stay close."""
    model, tokenizer = tiny
    reference = logits(model, tokenizer)
    sym = (logits(int8(model, "symmetric"), tokenizer) - reference).abs().max()
    asym = (logits(int8(model, "asymmetric"), tokenizer) - reference).abs().max()
    scale = reference.abs().max()
    assert 0 < asym <= 0.10 * scale and 0 < sym <= 0.10 * scale


def test_asymmetric_model_round_trips_through_save_and_load(tiny, tmp_path):
    model, tokenizer = tiny
    quantized = int8(model, "asymmetric")
    target = save_quantized(quantized, tokenizer, tmp_path / "q", "int8_dynamic", activations="asymmetric")
    assert json.loads((target / META_FILE).read_text())["activations"] == "asymmetric"
    loaded, _, _ = load_saved(target)
    weight = loaded.model.layers[1].self_attn.v_proj.weight
    assert weight.act_quant_kwargs.mapping_type == MappingType.ASYMMETRIC
    torch.testing.assert_close(logits(loaded, tokenizer), logits(quantized, tokenizer), atol=1e-6, rtol=0)


def test_bad_activations_name_the_choices(tiny):
    with pytest.raises(
        ValueError, match=r"quantize.activations='unsigned' is not one of \('symmetric', 'asymmetric'\)"
    ):
        int8(tiny[0], "unsigned")


def test_asymmetric_needs_int8_dynamic(tiny):
    with pytest.raises(ValueError, match=r"asymmetric' needs quantize=int8_dynamic.*'int8_weight_only'"):
        quantize_model(copy.deepcopy(tiny[0]), "int8_weight_only", activations="asymmetric")


def test_compiled_int8_layers_trace_in_one_graph_each(tiny):
    """torchao's CPU int8 matmul probes the CPU (AMX, VNNI) in a C call dynamo cannot trace;
    maybe_compile answers those once, so a quantized decoder layer compiles without graph breaks
    and stays within torch.compile's recompile limit."""
    from torch._dynamo.utils import counters

    model, tokenizer = tiny
    activations = "asymmetric"  # the chain's choice; symmetric takes the same matmul path
    torch._dynamo.reset()
    counters.clear()
    quantized = maybe_compile(
        quantize_model(copy.deepcopy(model), "int8_dynamic", activations=activations), True
    )
    eager = quantize_model(copy.deepcopy(model), "int8_dynamic", activations=activations)
    ids = tokenizer(["a fine film", "dull and long, far too long"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        got, expected = quantized(**ids).logits, eager(**ids).logits
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)
