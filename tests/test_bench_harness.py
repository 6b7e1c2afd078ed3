"""benchmarks/harness.py: the benchmark-only choices (the decoder compiled as one graph, probes timed
in turns with the models) behave as they did inside the package."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import compile_decoder, int8_rates, interleaved_with_probes  # noqa: E402  (benchmarks/harness.py)

from llm_lightning.measure.padding_free import PaddingFree, padding_free  # noqa: E402
from llm_lightning.quantization.onednn_int8 import activation_codes  # noqa: E402
from tests.test_bench_turns import TEXTS, Recorder  # noqa: E402
from tests.test_fused_projections import int8  # noqa: E402
from tests.test_quantize import logits  # noqa: E402


def test_probes_take_their_turn_after_each_batch_and_report_their_median(tiny):
    model, tokenizer = tiny
    log: list[str] = []
    readings = iter([5.0, 1.0, 3.0, 4.0, 2.0, 6.0])

    def probe() -> float:
        log.append("probe")
        return next(readings)

    got = interleaved_with_probes(
        {"a": Recorder(model, "a", log)}, tokenizer, TEXTS[:12], 6, 3, 128, False, {"rate": probe}
    )
    assert log == ["a", "probe"] * 6  # after every batch: 2 batches, 3 rounds
    assert got["rate"] == 3.5 and got["a"] > 0
    assert set(got) == {"a", "a_min", "a_max", "rate"}
    assert got["a_min"] <= got["a"] <= got["a_max"]


@pytest.mark.parametrize("probe_name", ["a", "a_min"])
def test_a_probe_named_like_a_model_or_its_spread_is_refused(tiny, probe_name):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="collide"):
        interleaved_with_probes(
            {"a": model}, tokenizer, TEXTS[:4], 4, 1, 128, False, {probe_name: lambda: 1.0}
        )


def test_the_decoder_compiles_as_one_graph_and_still_packs(tiny):
    model, tokenizer = tiny
    fused = int8(model, tokenizer, True)
    reference = logits(model, tokenizer)
    error = (logits(fused, tokenizer) - reference).abs().max()
    compiled = compile_decoder(copy.deepcopy(fused), True)
    decoder = compiled.model
    assert decoder._compiled_call_impl is not None and decoder.layers[0]._compiled_call_impl is None
    fast = padding_free(compiled, tokenizer.pad_token_id)
    assert isinstance(fast, PaddingFree)
    # compiled kernels round differently, and packed rows meet other attention kernels: on an
    # Ice Lake Xeon (VNNI) 0.0036 against eager int8's 0.0019. 3x leaves room for another int8
    # kernel's rounding and stays far under the logits themselves (~0.1)
    assert (logits(fast, tokenizer) - reference).abs().max() <= 3 * error + 1e-4


def test_not_compiling_leaves_the_model_alone(tiny):
    model, _ = tiny
    assert compile_decoder(model, False) is model and model.model._compiled_call_impl is None


def test_the_int8_ceiling_reads_every_int8_kernel_the_centred_forward_can_use():
    """The int8 matmul share's ceiling is the fastest int8 kernel of this CPU: `torch._int_mm`,
    and oneDNN's packed linear with this CPU's activation codes where it is exact (on AVX2 the
    only fast one: `_int_mm` is a scalar loop there)."""
    rates = int8_rates(n=128, repeats=2)
    codes = activation_codes()
    expected = {"torch._int_mm"} | ({f"oneDNN, {codes.name}"} if codes is not None else set())
    assert set(rates) == expected and all(rate > 0 for rate in rates.values())


def test_the_eight_bit_emulation_of_activation_bits_gives_what_torch_int_mm_gives(tiny):
    """benchmarks/activation_bits.py prices 7-bit codes against 8-bit ones whose integer products
    it computes in float64: on the tiny model that must be what torchao's `_int_mm` path gives."""
    from activation_bits import with_eight_bit_codes

    from llm_lightning.quantization import centering

    model, tokenizer = tiny
    plain = int8(model, tokenizer, fuse=True)
    for module in plain.modules():
        if getattr(module, centering.CENTERED, False):
            module.packed_int8_weight = None  # torchao's _int_mm, signed 8-bit codes
    expected = logits(plain, tokenizer)
    emulated = int8(model, tokenizer, fuse=True)
    real_matmul = centering._int_scaled_matmul
    try:
        assert with_eight_bit_codes(emulated) > 0
        got = logits(emulated, tokenizer)
    finally:
        centering._int_scaled_matmul = real_matmul
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
