"""oneDNN's int8 linear with the weight packed once, for the centred forward on x86 CPUs.

`torch._int_mm` takes the int8 weight as a plain matrix, so oneDNN reorders it into its AMX/VNNI
blocked layout on every call. `onednn.qlinear_prepack` does that once; `onednn.qlinear_pointwise`
then multiplies and applies the per-channel weight scales in one kernel. These are the ops
inductor's own freezing pass substitutes for torchao's `_int_mm` pattern (torch/_inductor/fx_passes/
quantization.py, `_register_smooth_quant_int_mm_pattern`), but freezing needs the weights baked
into each compiled graph: one graph per decoder layer instead of one shared by all thirty.
The packed weight is a buffer here instead, and the matmul a custom op, so inductor calls it as
one opaque kernel and still fuses the quantization around it. Measured in docs/BENCHMARKS.md,
"oneDNN-packed int8 weights".

Which activation codes the kernel takes depends on the CPU (`activation_codes`): signed int8 where
oneDNN multiplies them exactly (AMX), the same 256 levels shifted to unsigned where only that is
exact and fast, and 7-bit unsigned codes on CPUs without VNNI (AVX2), where the int16 pair sums
of `vpmaddubsw` saturate at full range. That last one is what FBGEMM's `reduce_range` does on such
CPUs; `torch._int_mm` there runs a scalar loop 40-90x slower than fp32 (docs/QUANTIZATION.md,
"int8 on CPUs without VNNI").
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ActivationCodes:
    """How a centred token's int8 levels reach oneDNN: `round(x / scale)` clamped to
    [low, high], plus `zero_point`, stored as `dtype` (the kernel subtracts the zero point)."""

    name: str
    dtype: torch.dtype
    low: int
    high: int
    zero_point: int

    @property
    def half_range(self) -> float:
        """The scale divisor: a centred token's half-range maps to this many levels (127.5 for
        8 bits, torchao's; 63.5 for 7)."""
        return (self.high - self.low) / 2


# in order of preference: the first that is exact and fast on this CPU is used
SIGNED_8 = ActivationCodes("signed 8-bit", torch.int8, -128, 127, 0)
UNSIGNED_8 = ActivationCodes("unsigned 8-bit", torch.uint8, -128, 127, 128)
UNSIGNED_7 = ActivationCodes("unsigned 7-bit", torch.uint8, -64, 63, 64)
CHOICES = (SIGNED_8, UNSIGNED_8, UNSIGNED_7)


def pack_int8_weight(qdata: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed copy of an int8 [out, in] weight, or None where there is no oneDNN int8
    linear to use (CUDA tensors, CPU builds without mkldnn, CPUs oneDNN cannot pack for, CPUs
    where its result is wrong): callers keep `torch._int_mm` then."""
    if (
        qdata.device.type != "cpu"
        or not torch.backends.mkldnn.is_available()
        or not packed_matmul_is_usable()
    ):
        return None
    try:
        return torch.ops.onednn.qlinear_prepack(qdata.contiguous(), None)
    except (AttributeError, RuntimeError, NotImplementedError):  # op missing, or not for this ISA
        return None


def packed_matmul_is_usable() -> bool:
    """oneDNN's packed int8 linear is used where it is exact and not slower than `torch._int_mm`
    for some activation codes."""
    return activation_codes() is not None


@functools.cache
def activation_codes() -> ActivationCodes | None:
    """The first of `CHOICES` that oneDNN multiplies exactly and in a real kernel on this CPU, or
    None (then the centred forward uses `torch._int_mm`). Probed once per process."""
    for codes in CHOICES:
        if packed_matmul_is_exact(codes) and packed_matmul_is_fast(codes):
            return codes
    return None


def int8_codes_name() -> str:
    """How the centred int8 layers quantize activations on this CPU, in words for reports."""
    if not torch.backends.mkldnn.is_available() or (codes := activation_codes()) is None:
        return "signed 8-bit (torch._int_mm)"
    return f"{codes.name} (oneDNN)"


@functools.cache
def packed_matmul_is_fast(codes: ActivationCodes = SIGNED_8) -> bool:
    """Whether oneDNN runs the packed int8 linear in a real kernel on this CPU, not its reference one.

    On an AMD EPYC with AVX-512 VNNI but no AMX (2026-12-02), oneDNN ran this signed-int8 linear in
    `ref_matmul_int8_t`, its scalar reference code: exact, but SmoothQuant's first validation batch
    had not finished after 5 minutes (py-spy). On AMX Xeons the same op was 7-23% faster than
    `torch._int_mm` (docs/BENCHMARKS.md, "oneDNN-packed int8 weights"). One multiply of SmolLM2's
    up-projection shape, timed once per process against `torch._int_mm` (best of 3 after a warm-up),
    tells the kinds apart: a reference kernel is tens of times slower, so a 2x margin is no coin toss.
    """
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(codes.low, codes.high + 1, (32, 576), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (1536, 576), dtype=torch.int8, generator=gen)
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    scales, plain, codes_q = torch.ones(1536), w.T.contiguous(), encode(q, codes)
    with torch.inference_mode():
        int_mm_time = best_of_three(lambda: torch._int_mm(q, plain))

        # a reference kernel's call is thousands of times slower (3.6 s against 1.1 ms at 384 rows
        # on EPYC-512): one call past 20x settles it, so each process pays two such calls, not four
        def packed_call():
            return int8_linear_packed(codes_q, packed, scales, codes.zero_point)

        return best_of_three(packed_call, give_up_after=20 * int_mm_time) <= 2 * int_mm_time


def best_of_three(run, give_up_after: float = float("inf")) -> float:
    """The fastest of three timed calls of `run`, after one untimed warm-up call; the first call's
    time alone if it took longer than `give_up_after` seconds."""
    run()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
        if times[0] > give_up_after:
            break
    return min(times)


@functools.cache
def packed_matmul_is_exact(codes: ActivationCodes = SIGNED_8) -> bool:
    """Whether oneDNN's packed int8 linear gives the exact integer product on this CPU.

    On x86 CPUs without VNNI or AMX (AVX2 only, e.g. this project's AMD EPYC machines) oneDNN's
    signed int8 GEMM came out wrong, most likely through `vpmaddubsw`, whose int16 pair sums
    saturate: on such a CPU (2026-12-01) one layer's output was off by 0.4-0.8 against 0.015 for `torch._int_mm`, and the
    tiny model's logits by 0.055 against 0.0027. One small multiply at the full int8
    range of `codes` (and the full int8 range of the weight), checked once per process against the
    float product (exact here: the sums stay below 2^24), tells the kinds of CPU apart without a
    list of ISAs."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(codes.low, codes.high + 1, (32, 64), dtype=torch.int8, generator=gen)
    w = torch.randint(-128, 128, (48, 64), dtype=torch.int8, generator=gen)
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        got = int8_linear_packed(encode(q, codes), packed, torch.ones(48), codes.zero_point)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return torch.equal(got, q.float() @ w.float().T)


def encode(levels: torch.Tensor, codes: ActivationCodes) -> torch.Tensor:
    """Integer levels in [codes.low, codes.high] as the codes oneDNN takes."""
    return (levels.to(torch.int16) + codes.zero_point).to(codes.dtype)


@torch.library.custom_op("llm_lightning::int8_linear_packed", mutates_args=())
def int8_linear_packed(
    q: torch.Tensor, packed: torch.Tensor, weight_scales: torch.Tensor, zero_point: int = 0
) -> torch.Tensor:
    """((q - zero_point) @ W^T) * weight_scales in float32, for int8 or uint8 rows q [M, in] and a
    packed int8 W [out, in]."""
    return torch.ops.onednn.qlinear_pointwise(
        q, 1.0, zero_point, packed, weight_scales, None, None, 1.0, 0, torch.float32, "none", [], ""
    )


@int8_linear_packed.register_fake
def _(
    q: torch.Tensor, packed: torch.Tensor, weight_scales: torch.Tensor, zero_point: int = 0
) -> torch.Tensor:
    return q.new_empty((q.shape[0], weight_scales.shape[0]), dtype=torch.float32)
