"""Measure a classifier the same way at every stage (fp32, pruned, distilled, quantized).

`measure(model, tokenizer, texts, labels)` returns one flat dict:

- `acc`, `f1_macro`: on all the given texts (the task's test split), batches sorted by length;
  this pass is also the warm-up that compiles every shape when the model is `torch.compile`d.
- `predictions`: the predicted label of every text, in text order (a list of ints), so two models
  measured on the same texts can be compared text by text (llm_lightning.measure.paired).
- `latency_p50_ms`, `latency_p95_ms`: batch 1, each of the first `latency_texts` texts timed
  alone; per text the median of `repeats` runs, then the 50th/95th percentile over texts.
- `tokens_per_s_b{n}`, `texts_per_s_b{n}` for n in `batch_sizes`: the first `throughput_texts`
  texts in split order (real length mix, padded per batch unless padding-free); the median of `repeats` timed passes
  after `warmup` untimed ones. Tokens are real (non-pad) tokens.
- `peak_rss_mb`: the process's peak resident memory during the measurement (the kernel's
  high-water mark is reset first), so it includes the Python and torch runtime (~0.4 GB).
- `size_mb`: weight files in the model's folder; `params`: parameter count (logical elements).
- `padding_free`: True when batches ran packed into unpadded rows (`settings.padding_free`, on
  models llm_lightning.measure.padding_free can pack for, and runtime folders whose graph takes packed
  rows, which pack every batch themselves); accuracy and speed are then of packed batches.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from llm_lightning.data.batching import pad, run_by_length
from llm_lightning.errors import UserError
from llm_lightning.measure.padding_free import PaddingFree, padding_free

# An untimed pause before each model's turn. Runtimes keep their worker threads spinning for a
# while after a call (ONNX Runtime's allow_spinning, on by default; OpenMP's and TBB's spin-waits),
# which on 2 cores takes CPU from the next model timed: two ONNX Runtime sessions in turns ran
# 20-80% slower than each alone until a 50 ms pause came between them (docs/BENCHMARKS.md,
# "Runtimes", 2026-12-07 EPYC-512).
SETTLE_S = 0.05
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf", ".onnx")  # .bin: OpenVINO's weights too


@dataclass
class BenchSettings:
    batch_sizes: Sequence[int] = field(default_factory=lambda: (16, 32))
    throughput_texts: int = 256  # texts per timed throughput pass
    latency_texts: int = 32  # texts timed one at a time for the batch-1 latency
    warmup: int = 1  # untimed passes before timing (compiles, warms caches)
    repeats: int = 3  # timed passes; medians are reported
    eval_batch_size: int = 32  # accuracy pass
    max_length: int = 128
    padding_free: bool = True  # texts packed into unpadded rows (llm_lightning.measure.padding_free)

    def __post_init__(self) -> None:
        problems = [
            f"bench.{k}={v} must be >= 1"
            for k, v in asdict(self).items()
            if k not in ("batch_sizes", "padding_free") and int(v) < 1
        ]
        if not self.batch_sizes or min(int(b) for b in self.batch_sizes) < 1:
            problems.append(f"bench.batch_sizes={list(self.batch_sizes)} must be positive integers")
        if problems:
            raise UserError("; ".join(problems) + " (config group `bench=`).")


def reset_peak_rss() -> None:
    """Reset the kernel's resident-memory high-water mark (Linux >= 4.0); elsewhere a no-op."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def size_on_disk_mb(path: str | Path | None) -> float | None:
    if path is None or not Path(path).exists():
        return None
    files = [Path(path)] if Path(path).is_file() else Path(path).rglob("*")
    return sum(f.stat().st_size for f in files if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)) / 1e6


def token_counts(rows: list[list[int]], batch_size: int) -> tuple[int, int]:
    """(real tokens, tokens computed) when `rows` go in batches of `batch_size`, each padded to its
    longest row."""
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    return sum(map(len, rows)), sum(len(b) * max(map(len, b)) for b in batches)


def padded_batches(rows: list[list[int]], size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [pad(rows[i : i + size], pad_id) for i in range(0, len(rows), size)]


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits.float()


def timed_pass(model: nn.Module, batches) -> float:
    started = time.perf_counter()
    for ids, mask in batches:
        _logits(model, ids, mask)
    return time.perf_counter() - started


def evaluate(
    model: nn.Module,
    rows: list[list[int]],
    labels: Sequence[int],
    num_labels: int,
    batch_size: int,
    pad_id: int,
) -> dict:
    """`acc`, `f1_macro` and `predictions` (each row's predicted label, in row order) of `model`."""
    # batches of similar lengths: less padding, the same metrics
    preds = run_by_length(rows, batch_size, pad_id, lambda ids, mask: _logits(model, ids, mask).argmax(-1))
    target = torch.tensor(list(labels))
    return {
        "acc": float(multiclass_accuracy(preds, target, num_labels, average="micro")),
        "f1_macro": float(multiclass_f1_score(preds, target, num_labels, average="macro")),
        "predictions": preds.tolist(),  # in text order, for paired comparisons
    }


def parameter_count(model: nn.Module) -> int:
    """Logical weight elements: torch parameters, or an exported graph's weights for a model that
    runs in another runtime (llm_lightning.runtimes: its weights are not torch tensors)."""
    exported = getattr(model, "parameter_count", None)
    return int(exported) if exported is not None else sum(p.numel() for p in model.parameters())


def measure(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    settings: BenchSettings | None = None,
    path: str | Path | None = None,
    num_labels: int | None = None,
) -> dict:
    """Accuracy, latency, throughput, memory and size of `model` (already compiled if it should be).

    Args:
        model: a sequence classifier; `model(input_ids, attention_mask).logits` is (batch, num_labels).
        texts, labels: the task's test split.
        path: the model's saved folder, for the size on disk.
    """
    settings = settings or BenchSettings()
    if len(texts) == 0:
        raise UserError("bench.measure needs at least one test text; the test split is empty.")
    num_labels = num_labels or int(model.config.num_labels)
    pad_id = tokenizer.pad_token_id
    rows = tokenizer(list(texts), truncation=True, max_length=settings.max_length)["input_ids"]
    reset_peak_rss()
    params = float(parameter_count(model))
    if settings.padding_free:
        model = padding_free(model, pad_id)
    result: dict = {
        "params": params,
        # a runtime folder whose graph takes packed rows packs its batches itself (llm_lightning.runtimes.inputs)
        "padding_free": isinstance(model, PaddingFree) or bool(getattr(model, "packs_batches", False)),
        "size_mb": size_on_disk_mb(path),
        "threads": float(torch.get_num_threads()),
    }
    model.eval()
    with torch.inference_mode():
        result.update(evaluate(model, rows, labels, num_labels, settings.eval_batch_size, pad_id))
        result.update(_latency(model, rows[: settings.latency_texts], settings, pad_id))
        for size in settings.batch_sizes:
            result.update(_throughput(model, rows[: settings.throughput_texts], int(size), settings, pad_id))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _latency(model: nn.Module, rows: list[list[int]], settings: BenchSettings, pad_id: int) -> dict:
    singles = padded_batches(rows, 1, pad_id)
    for _ in range(settings.warmup):
        timed_pass(model, singles)
    per_text = []
    for batch in singles:
        per_text.append(statistics.median(timed_pass(model, [batch]) for _ in range(settings.repeats)))
    ms = sorted(t * 1000 for t in per_text)
    return {"latency_p50_ms": _percentile(ms, 50), "latency_p95_ms": _percentile(ms, 95)}


def _throughput(
    model: nn.Module, rows: list[list[int]], size: int, settings: BenchSettings, pad_id: int
) -> dict:
    batches = padded_batches(rows, size, pad_id)
    tokens = sum(int(mask.sum()) for _, mask in batches)
    for _ in range(settings.warmup):
        timed_pass(model, batches)
    seconds = statistics.median(timed_pass(model, batches) for _ in range(settings.repeats))
    return {f"tokens_per_s_b{size}": tokens / seconds, f"texts_per_s_b{size}": len(rows) / seconds}


def turn_batches(
    tokenizer, texts: Sequence[str], batch_size: int, max_length: int, by_length: bool = False
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The padded batches `turns` times: the texts in their order, or sorted by length first (as a
    batch job would; less padding)."""
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    if by_length:
        rows = sorted(rows, key=len)
    return padded_batches(rows, batch_size, tokenizer.pad_token_id)


def turns(
    models: dict[str, nn.Module], batches: list[tuple[torch.Tensor, torch.Tensor]], rounds: int
) -> Iterator[tuple[int, dict[str, float]]]:
    """Several (already warmed-up) models timed in turns, batch by batch: each batch runs through
    every model before the next batch starts, and a round is one pass over all batches. Yields
    (round, {name: seconds its model took on this batch}) after every batch, so a caller can run
    work of its own between two batches (benchmarks/harness.py probes the CPU's matmul rate there).
    """
    with torch.inference_mode():
        for round_ in range(rounds):
            for batch in batches:
                seconds = {}
                for name, model in models.items():
                    time.sleep(SETTLE_S)  # the previous model's spinning threads go to sleep first
                    seconds[name] = timed_pass(model, [batch])
                yield round_, seconds


def round_rates(
    steps: Iterable[tuple[int, dict[str, float]]],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    names: Iterable[str],
) -> dict[str, list[float]]:
    """Real tokens/s of each model in each round, from `turns(models, batches, rounds)`'s steps."""
    tokens = sum(int(mask.sum()) for _, mask in batches)
    spent: dict[str, list[float]] = {name: [] for name in names}
    for round_, seconds in steps:
        for name, taken in seconds.items():
            if len(spent[name]) == round_:
                spent[name].append(0.0)
            spent[name][round_] += taken
    return {name: [tokens / total for total in per_round] for name, per_round in spent.items()}


def rates_in_turns(
    models: dict[str, nn.Module],
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    rounds: int = 5,
    max_length: int = 128,
    by_length: bool = False,
) -> dict[str, list[float]]:
    """Real tokens/s of several (already warmed-up) models timed in `turns`: per model, its rate in
    each round, in round order. The models' rates in one round were taken together, so their
    ratio in that round is the paired one (`interleaved_throughput` summarises them)."""
    batches = turn_batches(tokenizer, texts, batch_size, max_length, by_length)
    return round_rates(turns(models, batches, rounds), batches, models)


def check_turn_names(models: Iterable[str], others: Iterable[str] = ()) -> None:
    """Refuse names that collide with each other or with a model's `<name>_min`/`<name>_max` key."""
    names = [*models, *others]
    taken = set(names) & {f"{n}_{end}" for n in models for end in ("min", "max")}
    if len(set(names)) < len(names) or taken:
        raise ValueError(
            f"interleaved_throughput: names {names} collide (with each other or a `_min`/`_max` key)."
        )


def spread(rates: dict[str, list[float]]) -> dict[str, float]:
    """Each model's median rate over the rounds under its name, and its slowest and fastest round
    under `<name>_min` and `<name>_max`, so a reader sees how far the rounds spread."""
    summary: dict[str, float] = {}
    for name, per_round in rates.items():
        summary |= {
            name: statistics.median(per_round),
            f"{name}_min": min(per_round),
            f"{name}_max": max(per_round),
        }
    return summary


def interleaved_throughput(
    models: dict[str, nn.Module],
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 16,
    rounds: int = 5,
    max_length: int = 128,
    by_length: bool = False,
) -> dict[str, float]:
    """Real tokens/s of several (already warmed-up) models timed in turns (`rates_in_turns`),
    summarised by `spread`.

    On a shared or virtualised CPU the speed drifts by tens of percent within a minute (the
    2048^3 int8 matmul read 993 and 2,120 GOP/s in two passes of one run): timing the models
    one after another puts that drift into their ratio; taking turns every batch (a fraction of
    a second each) spreads it evenly. `by_length` sorts the texts by length first (as a batch
    job would; less padding).
    """
    check_turn_names(models)
    return spread(rates_in_turns(models, tokenizer, texts, batch_size, rounds, max_length, by_length))


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return os.uname().machine
