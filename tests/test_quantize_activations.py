"""`quantize.activations`: symmetric or asymmetric per-token int8 activations.

Asymmetric is done by centring each token (llm_lightning.centering) around torchao's symmetric
kernel; torchao's own zero-point path (`zero_point="torchao"`) stays for comparison.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import MappingType

from llm_lightning.centering import CENTERED
from llm_lightning.compiling import maybe_compile
from llm_lightning.models.saved import load_saved
from llm_lightning.quantize import quantize_model
from llm_lightning.quantized_dir import META_FILE, save_quantized
from tests.test_quantize import logits


def int8(model, activations: str, **kwargs):
    return quantize_model(copy.deepcopy(model), "int8_dynamic", activations=activations, **kwargs)


def quantized_linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_activations_choose_how_every_quantized_layer_quantizes(tiny):
    model, _ = tiny
    for activations, zero_point, mapping, centred in (
        ("symmetric", "centering", MappingType.SYMMETRIC, False),
        ("asymmetric", "centering", MappingType.SYMMETRIC, True),  # centred, then torchao's symmetric kernel
        ("asymmetric", "torchao", MappingType.ASYMMETRIC, False),
    ):
        linears = quantized_linears(int8(model, activations, zero_point=zero_point))
        assert linears and all(m.weight.act_quant_kwargs.mapping_type == mapping for m in linears)
        assert all(getattr(m, CENTERED, False) is centred for m in linears), (activations, zero_point)


class OneLayer(torch.nn.Module):
    """A linear layer called like a model (`quantize_model` calibrates with `input_ids=`)."""

    def __init__(self, layer: torch.nn.Linear):
        super().__init__()
        self.proj = layer

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(input_ids)


def offset_layer_error(kind: str, smoothquant: bool) -> float:
    """Relative error of one int8 linear layer on tokens with an offset and an outlier channel,
    the activations after SiLU or a norm that symmetric scales waste half their range on."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64) + 4 * torch.rand(3, 5, 1)
    x[..., 7] += 15
    with torch.inference_mode():
        reference = layer(x)
    model = OneLayer(layer)
    activations = "symmetric" if kind == "symmetric" else "asymmetric"
    zero_point = "torchao" if kind == "torchao" else "centering"
    # SmoothQuant puts an act_pre_scale into each weight, which centring must see through
    calibration = [x[:1]] if smoothquant else []
    quantize_model(
        model,
        "int8_dynamic",
        activations=activations,
        zero_point=zero_point,
        smoothquant_alpha=0.5 if smoothquant else None,
        calibration=calibration,
    )
    if smoothquant:
        assert model.proj.weight.act_pre_scale is not None
    with torch.inference_mode():
        return float((model(x) - reference).norm() / reference.norm())


@pytest.mark.parametrize("smoothquant", [False, True], ids=["plain", "smoothquant"])
def test_centring_is_as_precise_as_a_zero_point(smoothquant):
    """Centring spends the int8 range on [min, max] like torchao's zero point: the same error
    (within 15%), and well below the symmetric error on offset activations."""
    symmetric = offset_layer_error("symmetric", smoothquant)
    torchao = offset_layer_error("torchao", smoothquant)
    centred = offset_layer_error("centred", smoothquant)
    assert centred < 0.75 * symmetric, (centred, symmetric)
    assert abs(centred - torchao) <= 0.15 * torchao, (centred, torchao)


@pytest.mark.parametrize("smoothquant", [False, True], ids=["plain", "smoothquant"])
def test_centred_forward_computes_what_torchaos_symmetric_linear_does_on_centred_tokens(smoothquant):
    """The centred forward quantizes and multiplies by itself (one range reduction instead of
    two); it must give what torchao's own symmetric int8 linear gives on the centred tokens. Its
    scale, (max - min) / 2 / 127.5, can differ from torchao's max|x - c| / 127.5 in the last bit,
    which moves an element that sits on a rounding boundary by one int8 step: so the two agree to
    a small fraction of the quantization error, not exactly."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64) + 4 * torch.rand(3, 5, 1)
    x[..., 7] += 15
    model = OneLayer(torch.nn.Linear(64, 48))
    with torch.inference_mode():
        reference = model(x)
    quantize_model(
        model,
        "int8_dynamic",
        activations="asymmetric",
        smoothquant_alpha=0.5 if smoothquant else None,
        calibration=[x[:1]] if smoothquant else [],
    )
    layer = model.proj
    scaled = x if layer.act_pre_scale is None else x * layer.act_pre_scale
    center = (scaled.amax(-1, keepdim=True) + scaled.amin(-1, keepdim=True)) / 2
    centred = scaled - center if layer.act_pre_scale is None else (scaled - center) / layer.act_pre_scale
    with torch.inference_mode():
        expected = F.linear(centred, layer.weight, layer.bias) + center * layer.weight_row_sums
        eager = model(x)
        compiled = maybe_compile(model, True)(x)
    quantization_error = (expected - reference).norm()
    assert quantization_error > 0
    assert (eager - expected).norm() <= 0.25 * quantization_error
    assert (compiled - expected).norm() <= 0.25 * quantization_error


def test_asymmetric_models_stay_close_to_fp32(tiny):
    model, tokenizer = tiny
    reference = logits(model, tokenizer)
    scale = reference.abs().max()
    for kwargs in (
        {"activations": "symmetric"},
        {"activations": "asymmetric"},
        {"activations": "asymmetric", "zero_point": "torchao"},
    ):
        error = (logits(int8(model, **kwargs), tokenizer) - reference).abs().max()
        assert 0 < error <= 0.10 * scale, kwargs


def test_centred_model_round_trips_through_save_and_load(tiny, tmp_path):
    model, tokenizer = tiny
    quantized = int8(model, "asymmetric")
    target = save_quantized(quantized, tokenizer, tmp_path / "q", "int8_dynamic", activations="asymmetric")
    meta = json.loads((target / META_FILE).read_text())
    assert meta["activations"] == "asymmetric" and meta["centered"] is True
    loaded, _, _ = load_saved(target)
    assert all(getattr(m, CENTERED, False) for m in quantized_linears(loaded))
    torch.testing.assert_close(logits(loaded, tokenizer), logits(quantized, tokenizer), atol=1e-6, rtol=0)


def test_format_1_folders_with_torchaos_zero_point_still_load(tiny, tmp_path):
    model, tokenizer = tiny
    quantized = int8(model, "asymmetric", zero_point="torchao")
    target = save_quantized(quantized, tokenizer, tmp_path / "q", "int8_dynamic", activations="asymmetric")
    meta = json.loads((target / META_FILE).read_text())
    assert meta["centered"] is False
    del meta["centered"]
    (target / META_FILE).write_text(json.dumps({**meta, "format": 1}))  # as the previous version wrote it
    loaded, _, _ = load_saved(target)
    weight = loaded.model.layers[1].self_attn.v_proj.weight
    assert weight.act_quant_kwargs.mapping_type == MappingType.ASYMMETRIC
    torch.testing.assert_close(logits(loaded, tokenizer), logits(quantized, tokenizer), atol=1e-6, rtol=0)


def test_bad_activations_name_the_choices(tiny):
    with pytest.raises(
        ValueError, match=r"quantize.activations='unsigned' is not one of \('symmetric', 'asymmetric'\)"
    ):
        int8(tiny[0], "unsigned")


def test_bad_zero_point_names_the_choices(tiny):
    with pytest.raises(ValueError, match=r"zero_point='midpoint' is not one of \('centering', 'torchao'\)"):
        int8(tiny[0], "asymmetric", zero_point="midpoint")


def test_asymmetric_needs_int8_dynamic(tiny):
    with pytest.raises(ValueError, match=r"asymmetric' needs quantize=int8_dynamic.*'int8_weight_only'"):
        quantize_model(copy.deepcopy(tiny[0]), "int8_weight_only", activations="asymmetric")


@pytest.mark.parametrize("activations", ["symmetric", "asymmetric"])
def test_compiled_int8_layers_trace_in_one_graph_each(tiny, activations):
    """torchao's CPU int8 matmul probes the CPU (AMX, VNNI) in a C call dynamo cannot trace;
    maybe_compile answers those once, so a quantized decoder layer, centred or not, compiles
    without graph breaks and stays within torch.compile's recompile limit."""
    from torch._dynamo.utils import counters

    model, tokenizer = tiny
    torch._dynamo.reset()
    counters.clear()
    quantized = maybe_compile(int8(model, activations), True)
    eager = int8(model, activations)
    ids = tokenizer(["a fine film", "dull and long, far too long"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        got, expected = quantized(**ids).logits, eager(**ids).logits
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)
