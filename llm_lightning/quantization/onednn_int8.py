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
"""

from __future__ import annotations

import functools
import time

import torch


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
    """oneDNN's packed int8 linear is used where it is exact and not slower than `torch._int_mm`."""
    return packed_matmul_is_exact() and packed_matmul_is_fast()


@functools.cache
def packed_matmul_is_fast() -> bool:
    """Whether oneDNN runs the packed int8 linear in a real kernel on this CPU, not its reference one.

    On an AMD EPYC with AVX-512 VNNI but no AMX (2026-12-02), oneDNN ran this signed-int8 linear in
    `ref_matmul_int8_t`, its scalar reference code: exact, but SmoothQuant's first validation batch
    had not finished after 5 minutes (py-spy). On AMX Xeons the same op was 7-23% faster than
    `torch._int_mm` (docs/BENCHMARKS.md, "oneDNN-packed int8 weights"). One multiply of SmolLM2's
    up-projection shape, timed once per process against `torch._int_mm` (best of 3 after a warm-up),
    tells the kinds apart: a reference kernel is tens of times slower, so a 2x margin is no coin toss.
    """
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (32, 576), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (1536, 576), dtype=torch.int8, generator=gen)
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    scales, plain = torch.ones(1536), w.T.contiguous()
    with torch.inference_mode():
        return best_of_three(lambda: int8_linear_packed(q, packed, scales)) <= 2 * best_of_three(
            lambda: torch._int_mm(q, plain)
        )


def best_of_three(run) -> float:
    """The fastest of three timed calls of `run`, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


@functools.cache
def packed_matmul_is_exact() -> bool:
    """Whether oneDNN's packed int8 linear gives the exact integer product on this CPU.

    On x86 CPUs without VNNI or AMX (AVX2 only, e.g. this project's AMD EPYC machines) oneDNN's
    signed int8 GEMM came out wrong, most likely through `vpmaddubsw`, whose int16 pair sums
    saturate: on such a CPU (2026-12-01) one layer's output was off by 0.4-0.8 against 0.015 for `torch._int_mm`, and the
    tiny model's logits by 0.055 against 0.0027. One small multiply at the full int8
    range, checked once per process against the float product (exact here: the sums stay below
    2^24), tells the two kinds of CPU apart without a list of ISAs."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (32, 64), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (48, 64), dtype=torch.int8, generator=gen)
    try:
        got = int8_linear_packed(q, torch.ops.onednn.qlinear_prepack(w, None), torch.ones(48))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return torch.equal(got, q.float() @ w.float().T)


@torch.library.custom_op("llm_lightning::int8_linear_packed", mutates_args=())
def int8_linear_packed(q: torch.Tensor, packed: torch.Tensor, weight_scales: torch.Tensor) -> torch.Tensor:
    """(q @ W^T) * weight_scales in float32, for int8 rows q [M, in] and a packed int8 W."""
    return torch.ops.onednn.qlinear_pointwise(
        q, 1.0, 0, packed, weight_scales, None, None, 1.0, 0, torch.float32, "none", [], ""
    )


@int8_linear_packed.register_fake
def _(q: torch.Tensor, packed: torch.Tensor, weight_scales: torch.Tensor) -> torch.Tensor:
    return q.new_empty((q.shape[0], weight_scales.shape[0]), dtype=torch.float32)
