"""`quantize.activations`: symmetric or asymmetric per-token int8 activations.

Asymmetric is done by centring each token (llm_lightning.quantization.centering) around torchao's symmetric
kernel. torchao's own zero point, which the package no longer offers, is built here from
`torchao_config(..., activations="asymmetric")` to compare with (as benchmarks/quantize.py does).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torchao.quantization import MappingType

from llm_lightning.measure.compiling import maybe_compile
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization import centering
from llm_lightning.quantization.centering import CENTERED
from llm_lightning.quantization.onednn_int8 import (
    SIGNED_8,
    UNSIGNED_7,
    UNSIGNED_8,
    activation_codes,
    packed_matmul_is_exact,
    packed_matmul_is_usable,
)
from llm_lightning.quantization.saved import META_FILE, save_quantized
from llm_lightning.quantization.settings import torchao_config
from llm_lightning.quantization.torchao_path import quantize_linears, quantize_model
from tests.test_quantize import logits


@pytest.fixture
def eight_bit_codes(monkeypatch):
    """Centring at torchao's 8 bits on every CPU: where oneDNN takes only 7-bit codes (no VNNI),
    the centred layers here skip it for torchao's `_int_mm`, which takes signed 8-bit ones."""
    if activation_codes() not in (SIGNED_8, UNSIGNED_8):
        monkeypatch.setattr(centering, "pack_int8_weight", lambda qdata: None)


def int8(model, activations: str, **kwargs):
    return quantize_model(copy.deepcopy(model), "int8_dynamic", activations=activations, **kwargs)


def torchao_zero_point(model, smoothquant_alpha: float | None = None, calibration=()):
    """A copy of `model` in int8_dynamic with torchao's own zero point for the activations."""
    base = torchao_config("int8_dynamic", activations="asymmetric")
    return quantize_linears(copy.deepcopy(model).eval(), base, (), smoothquant_alpha, calibration)


def quantized_linears(model) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_activations_choose_how_every_quantized_layer_quantizes(tiny):
    model, _ = tiny
    for name, quantized, mapping, centred in (
        ("symmetric", int8(model, "symmetric"), MappingType.SYMMETRIC, False),
        # centred, then torchao's symmetric kernel
        ("asymmetric", int8(model, "asymmetric"), MappingType.SYMMETRIC, True),
        ("torchao's zero point", torchao_zero_point(model), MappingType.ASYMMETRIC, False),
    ):
        linears = quantized_linears(quantized)
        assert linears and all(m.weight.act_quant_kwargs.mapping_type == mapping for m in linears)
        assert all(getattr(m, CENTERED, False) is centred for m in linears), name


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
    # SmoothQuant puts an act_pre_scale into each weight, which centring must see through
    calibration = [x[:1]] if smoothquant else []
    alpha = 0.5 if smoothquant else None
    if kind == "torchao":
        model = torchao_zero_point(model, alpha, calibration)
    else:
        activations = "symmetric" if kind == "symmetric" else "asymmetric"
        quantize_model(
            model, "int8_dynamic", activations=activations, smoothquant_alpha=alpha, calibration=calibration
        )
    if smoothquant:
        assert model.proj.weight.act_pre_scale is not None
    with torch.inference_mode():
        return float((model(x) - reference).norm() / reference.norm())


@pytest.mark.parametrize("smoothquant", [False, True], ids=["plain", "smoothquant"])
def test_centring_is_as_precise_as_a_zero_point(smoothquant, eight_bit_codes):
    """Centring spends the int8 range on [min, max] like torchao's zero point: the same error
    (within 15%), and well below the symmetric error on offset activations."""
    symmetric = offset_layer_error("symmetric", smoothquant)
    torchao = offset_layer_error("torchao", smoothquant)
    centred = offset_layer_error("centred", smoothquant)
    assert centred < 0.75 * symmetric, (centred, symmetric)
    assert abs(centred - torchao) <= 0.15 * torchao, (centred, torchao)


@pytest.mark.parametrize("smoothquant", [False, True], ids=["plain", "smoothquant"])
def test_centred_forward_computes_what_torchaos_symmetric_linear_does_on_centred_tokens(
    smoothquant, eight_bit_codes
):
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
    for name, quantized in (
        ("symmetric", int8(model, "symmetric")),
        ("asymmetric", int8(model, "asymmetric")),
        ("torchao's zero point", torchao_zero_point(model)),
    ):
        error = (logits(quantized, tokenizer) - reference).abs().max()
        assert 0 < error <= 0.10 * scale, name


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
    quantized = torchao_zero_point(model)
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


def exact_centred_linear(layer: torch.nn.Linear, x: torch.Tensor, codes) -> torch.Tensor:
    """A centred layer's output computed in float64 from the same integer levels as `codes` give:
    what an exact int8 kernel must return, up to float32 rounding."""
    scaled = x if layer.act_pre_scale is None else x * layer.act_pre_scale
    high, low = scaled.amax(-1, keepdim=True), scaled.amin(-1, keepdim=True)
    center = (high + low) / 2
    scale = ((high - low) / 2 / codes.half_range).clamp(min=centering.EPS)
    levels = torch.clamp(torch.round((scaled - center) * (1.0 / scale)), codes.low, codes.high)
    products = levels.double() @ layer.int8_weight_t.double()
    y = products * scale.double() * layer.weight_scales.double()
    return (y + center.double() * layer.weight_row_sums.double()).float()


@pytest.mark.parametrize("shape", [(64, 48), (576, 1536), (1536, 576)], ids=["tiny", "up", "down"])
def test_packed_onednn_weights_give_the_exact_products_of_their_codes(shape):
    """On x86 CPUs the centred forward multiplies by oneDNN's packed copy of each int8 weight
    (llm_lightning.quantization.onednn_int8), fed the activation codes this CPU multiplies exactly:
    8-bit where it has VNNI or AMX, 7-bit without (AVX2, where 8-bit ones came out a quarter of the
    output's range wrong). Eager and compiled, one layer gives the exact integer products of those
    codes to float rounding, and on an 8-bit CPU what torch._int_mm gives."""
    if not (torch.backends.mkldnn.is_available() and packed_matmul_is_usable()):
        pytest.skip("no exact and fast oneDNN int8 linear here: the centred forward uses _int_mm")
    torch.manual_seed(0)
    features, out_features = shape
    x = torch.randn(3, 5, features) + 4 * torch.rand(3, 5, 1)
    layer = torch.nn.Linear(features, out_features, bias=False)
    model, compiled = OneLayer(layer), OneLayer(copy.deepcopy(layer))
    for each in (model, compiled):
        quantize_model(each, "int8_dynamic", activations="asymmetric")
    codes = activation_codes()
    assert model.proj.packed_int8_weight is not None and model.proj.activation_codes == codes
    with torch.inference_mode():
        packed, compiled = model(x), maybe_compile(compiled, True)(x)
        exact = exact_centred_linear(model.proj, x, codes)
        model.proj.packed_int8_weight = None  # centering falls back to torchao's _int_mm
        int_mm = model(x)
    scale = exact.abs().max()
    torch.testing.assert_close(packed, exact, atol=1e-6 * scale, rtol=0)
    torch.testing.assert_close(compiled, exact, atol=1e-5 * scale, rtol=0)
    if codes != UNSIGNED_7:
        torch.testing.assert_close(packed, int_mm, atol=1e-6 * scale, rtol=0)


def test_seven_bit_codes_are_exact_where_eight_bit_ones_saturate():
    """On AVX2 (no VNNI) oneDNN sums pairs of unsigned x signed int8 products in int16, which
    saturates for 8-bit codes; 7-bit unsigned codes keep every pair sum below 2^15. Wherever the
    8-bit codes are wrong the probe must pick the 7-bit ones (if they are fast), and the 7-bit
    ones are exact on every CPU with oneDNN."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    assert packed_matmul_is_exact(UNSIGNED_7)
    codes = activation_codes()
    if not packed_matmul_is_exact(SIGNED_8) and not packed_matmul_is_exact(UNSIGNED_8):
        assert codes in (UNSIGNED_7, None)
    if codes is not None:
        assert packed_matmul_is_exact(codes) and packed_matmul_is_usable()


def test_packed_int8_model_stays_within_the_quantization_error(tiny):
    """Through a whole model, a float-rounding difference can tip an activation across an int8
    rounding boundary in the next layer (one int8 step, as large as the quantization error
    itself), so packed and plain do not agree to rounding: the packed model must be as close to
    fp32 as the plain one (the 1.5 allows for which side of a boundary each lands on). With 7-bit
    codes (CPUs without VNNI) an activation step is twice as wide, and so may the error be."""
    model, tokenizer = tiny
    codes = activation_codes() or SIGNED_8
    reference = logits(model, tokenizer)
    packed = int8(model, "asymmetric")
    plain = int8(model, "asymmetric")
    for module in quantized_linears(plain):
        if getattr(module, CENTERED, False):
            module.packed_int8_weight = None
    plain_error = (logits(plain, tokenizer) - reference).norm()
    packed_error = (logits(packed, tokenizer) - reference).norm()
    allowed = 1.5 * (SIGNED_8.half_range / codes.half_range) * plain_error
    assert 0 < packed_error <= allowed, (packed_error, plain_error, codes.name)


def test_centred_models_deepcopy_and_move_with_their_packed_weights(tiny):
    """oneDNN's packed weights are opaque CPU tensors that copy.deepcopy cannot copy and no other
    device can hold: the centred layers pack again on a copy (the same logits), and moving the
    model off the CPU drops them (its forward then uses torchao's matmul). The meta device
    stands in for a GPU here."""
    model, tokenizer = tiny
    quantized = int8(model, "asymmetric")
    copied = copy.deepcopy(quantized)
    layers = [m for m in quantized_linears(copied) if getattr(m, CENTERED, False)]
    assert layers and all(
        (m.packed_int8_weight is not None)
        == (torch.backends.mkldnn.is_available() and packed_matmul_is_usable())
        for m in layers
    )
    torch.testing.assert_close(logits(copied, tokenizer), logits(quantized, tokenizer), atol=1e-6, rtol=0)
    copied.to("meta")
    assert all(m.packed_int8_weight is None and m.int8_weight_t.is_meta for m in layers)


def test_without_onednn_the_centred_forward_uses_torch_int_mm(tiny, monkeypatch):
    """A CPU build without oneDNN, or a CPU oneDNN cannot pack for, gets no packed weights and
    runs torchao's `_int_mm` path instead of failing."""
    model, tokenizer = tiny

    def cannot_pack(*args):
        raise RuntimeError("no int8 kernels for this ISA")

    monkeypatch.setattr(torch.ops.onednn, "qlinear_prepack", cannot_pack)
    fallback = int8(model, "asymmetric")
    centred = [m for m in quantized_linears(fallback) if getattr(m, CENTERED, False)]
    assert centred and all(m.packed_int8_weight is None for m in centred)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert all(m.packed_int8_weight is None for m in quantized_linears(int8(model, "asymmetric")))
    reference = logits(model, tokenizer)
    error = (logits(fallback, tokenizer) - reference).abs().max()
    assert 0 < error <= 0.10 * reference.abs().max()


def test_the_packed_int8_probe_agrees_with_a_layer_of_smollm2s_shape():
    """`packed_matmul_is_exact` decides from one small multiply whether oneDNN's packed int8 linear
    is used; a full-range multiply of SmolLM2's up-projection shape must get the same verdict (on
    AVX2-only CPUs it was off by a quarter of the output's range, on AMX/VNNI ones exact)."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (64, 576), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (1536, 576), dtype=torch.int8, generator=gen)
    packed = torch.ops.onednn.qlinear_pointwise(
        q,
        1.0,
        0,
        torch.ops.onednn.qlinear_prepack(w, None),
        torch.ones(1536),
        None,
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )
    assert torch.equal(packed, q.float() @ w.float().T) == packed_matmul_is_exact()
