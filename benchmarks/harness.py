"""What only the benchmarks choose, kept out of the package: the decoder compiled as one graph, and
probes (the CPU's matmul rates: `matmul_rate`, `int8_rates`, `layer_matmul_rate`) timed in turns with the models.

Imported as a sibling module (`from harness import ...`): `python benchmarks/X.py` puts
benchmarks/ first on the module path.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from llm_lightning.measure.bench import check_turn_names, round_rates, spread, turn_batches, turns
from llm_lightning.measure.compiling import constant_cpu_probes, maybe_compile
from llm_lightning.quantization.onednn_int8 import (
    SIGNED_8,
    activation_codes,
    encode,
    int8_linear_packed,
    pack_int8_weight,
)


def compile_decoder(model: nn.Module, compile: bool, options: dict | None = None) -> nn.Module:
    """`maybe_compile`, but the decoder (`model.model`) compiled in place as one graph: no
    per-layer guards and calls, but every layer is traced and compiled (the 30-layer SmolLM2 int8
    model: 1.06-1.12x faster, for 162 s of cold compiling instead of 25 s per batch-shape family;
    docs/BENCHMARKS.md, "Where the int8 model's time goes"). A model without `.model` is compiled
    as `maybe_compile` compiles it."""
    decoder = getattr(model, "model", None)
    if not compile or not isinstance(decoder, nn.Module):
        return maybe_compile(model, compile, options)
    constant_cpu_probes()
    decoder.compile(dynamic=True, options=options)
    return model


def interleaved_with_probes(
    models: dict[str, nn.Module],
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    rounds: int,
    max_length: int,
    by_length: bool,
    probes: dict[str, Callable[[], float]],
) -> dict[str, float]:
    """`llm_lightning.measure.bench.interleaved_throughput`, with `probes` (name -> a function
    returning a rate, e.g. the CPU's int8 matmul rate) run after every batch's models, so a
    ceiling they measure drifts with the models; each probe's median reading under its name."""
    check_turn_names(models, probes)
    batches = turn_batches(tokenizer, texts, batch_size, max_length, by_length)
    readings: dict[str, list[float]] = {name: [] for name in probes}

    def probed(steps: Iterable[tuple[int, dict[str, float]]]) -> Iterator[tuple[int, dict[str, float]]]:
        for step in steps:
            yield step
            for name, probe in probes.items():  # between this batch and the next
                readings[name].append(probe())

    rates = round_rates(probed(turns(models, batches, rounds)), batches, models)
    return spread(rates) | {name: statistics.median(values) for name, values in readings.items()}


def matmul_rate(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Operations per second of one n x n x n float matrix multiply (`ops_per_second`); int8:
    `int8_rates`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return ops_per_second(lambda: torch.mm(a, b), 2 * n**3, repeats)


def ops_per_second(run: Callable[[], object], ops: int, repeats: int) -> float:
    """`ops` over the median time of `repeats` calls of `run` after a warm-up call; a warm-up over
    a second (`torch._int_mm`'s scalar loop on AVX2: 11 s at 2048^3) is the one reading."""
    started = time.perf_counter()
    run()
    times = [time.perf_counter() - started]
    if times[0] < 1.0:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
    return ops / statistics.median(times)


def int8_rates(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Operations per second of one n x n x n int8 multiply by each int8 kernel this CPU offers:
    `torch._int_mm`, and oneDNN's packed linear fed the activation codes the centred forward uses
    here. On AVX2 `_int_mm` is a scalar loop (2 GOP/s against 250 for oneDNN with 7-bit codes,
    2026-12-07), so the faster of the two is the CPU's int8 ceiling (`ops_per_second`)."""
    gen = torch.Generator().manual_seed(0)
    codes = activation_codes()
    a = torch.randint(codes.low if codes else -128, (codes.high if codes else 127) + 1, (n, n), generator=gen)
    a = a.to(torch.int8)
    b = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=gen)
    kernels = {"torch._int_mm": lambda: torch._int_mm(a, b)}
    if codes is not None and (packed := pack_int8_weight(b.T.contiguous())) is not None:
        coded, scales = encode(a, codes), torch.ones(n)
        kernels[f"oneDNN, {codes.name}"] = lambda: int8_linear_packed(coded, packed, scales, codes.zero_point)
    return {name: ops_per_second(mm, 2 * n**3, repeats) for name, mm in kernels.items()}


def int8_ceiling(repeats: int = 5) -> float:
    """The fastest 2048^3 int8 rate of this CPU's kernels (`int8_rates`)."""
    return max(int8_rates(repeats=repeats).values())


def layer_matmul_rate(model: nn.Module, rows: int, repeats: int = 3) -> Callable[[], float]:
    """A probe: operations per second of one decoder layer's int8 matmuls alone, on `rows` tokens
    (a batch's), with oneDNN-packed weights as the centred forward runs them (torch._int_mm where
    oneDNN is missing): the rate these small shapes allow, against the 2048^3 one."""
    classifier = getattr(model, "classifier", model)  # under llm_lightning.measure.padding_free's wrapper too
    first = classifier.model.layers[0]
    shapes = [(m.in_features, m.out_features) for m in first.modules() if isinstance(m, nn.Linear)]
    inputs = {k: torch.randint(-128, 127, (rows, k), dtype=torch.int8) for k, _ in shapes}
    weights = [(k, torch.randint(-128, 127, (n, k), dtype=torch.int8), torch.rand(n)) for k, n in shapes]
    packed = [(k, pack_int8_weight(w), w.t(), scales) for k, w, scales in weights]
    codes = activation_codes() or SIGNED_8  # the codes the centred forward feeds oneDNN on this CPU
    coded = {k: encode(q.clamp(codes.low, codes.high), codes) for k, q in inputs.items()}
    ops = sum(2 * rows * k * n for k, n in shapes)

    def once() -> float:
        started = time.perf_counter()
        for k, pw, wt, scales in packed:
            if pw is None:
                torch._int_mm(inputs[k], wt)
            else:
                int8_linear_packed(coded[k], pw, scales, codes.zero_point)
        return time.perf_counter() - started

    def probe() -> float:
        once()
        return ops / statistics.median(once() for _ in range(repeats))

    return probe
