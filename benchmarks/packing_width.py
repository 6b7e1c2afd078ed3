"""How wide a packed row should be: each model's time fitted on its slots and attention pairs,
then rows as wide as the longest text against rows of the cheapest width, timed in turns.

    flock /tmp/heavy.lock python benchmarks/packing_width.py \\
        ov_int8=outputs/runtimes/<run>/ov_int8_packed torch_fp32=outputs/sentiment/<run>/model

Each NAME=PATH is a runtime folder with a packed graph (`quantize.inputs=packed`) or a torch
`model/` folder (run padding-free, llm_lightning.measure.padding_free). Part 1 times each model on
packed rows of several shapes (rows x width, two texts a row) and fits
`seconds = fixed + per_slot x rows x width + per_pair x rows x width^2`: a row's attention reads
every pair of its tokens, whichever text they belong to. Its `per_pair / per_slot` against the
multiply-add count of `llm_lightning.data.packing.pair_cost` is the slowdown that module takes.
Part 2 packs the first `--texts` test texts at batch 16, in split order and sorted by length,
both ways, and prints the slots, the share of real tokens, the pairs, and tokens/s in turns, with
the largest logit difference between the two (the same texts, so rounding only).
Current figures: docs/BENCHMARKS.md, "Packed row width".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from compare import ORDERS, load
from omegaconf import OmegaConf

from llm_lightning.data import load_task
from llm_lightning.data.packing import ATTENTION_SLOWDOWN, cheapest_rows, pair_cost
from llm_lightning.measure.bench import cpu_name, rates_in_turns, turn_batches
from llm_lightning.measure.padding_free import PaddingFree
from llm_lightning.runtime import conf_dir

SHAPES = [(32, 16), (16, 32), (8, 64), (4, 128), (2, 256), (1, 512), (4, 32), (24, 32), (2, 64), (12, 64)]


def load_packed(path: Path) -> tuple[torch.nn.Module, object]:
    """A packed runtime folder's classifier, or a torch model wrapped to run padding-free."""
    model, tokenizer, _ = load(path)  # compiled where its folder says so (benchmarks/compare.py)
    if getattr(model, "packs_batches", False):
        return model, tokenizer
    if getattr(model, "inputs", None) == "padded":
        raise SystemExit(f"{path}: a padded graph; this benchmark is for packed ones")
    return PaddingFree(model.eval(), tokenizer.pad_token_id), tokenizer


def run_rows(model, ids: np.ndarray, positions: np.ndarray, last: np.ndarray) -> None:
    if isinstance(model, PaddingFree):
        with torch.inference_mode():
            model.classifier.model(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(positions))
    else:
        model.run({"input_ids": ids, "position_ids": positions, "last": last})


def fit_shapes(name: str, model, repeats: int) -> None:
    rng = np.random.default_rng(0)
    print(
        f"\n{name}: packed rows of two texts each\n| rows | width | slots | pairs | ms |\n|---|---|---|---|---|"
    )
    measured = []
    for rows, width in SHAPES:
        half = width // 2
        positions = np.broadcast_to(np.concatenate([np.arange(half), np.arange(width - half)]), (rows, width))
        fed = (rng.integers(100, 40000, (rows, width)), positions.copy(), np.arange(rows) * width + width - 1)
        run_rows(model, *fed)  # warm-up: a first call of a shape pays for planning
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            run_rows(model, *fed)
            seconds.append(time.perf_counter() - started)
        measured.append((rows * width, rows * width * width, statistics.median(seconds)))
        print(
            f"| {rows} | {width} | {rows * width:,} | {rows * width * width:,} | {measured[-1][2] * 1e3:.1f} |"
        )
    design = np.array([[1.0, slots, pairs] for slots, pairs, _ in measured])
    (fixed, per_slot, per_pair), *_ = np.linalg.lstsq(design, np.array([s for *_, s in measured]), rcond=None)
    ratio = per_pair / per_slot
    counted = pair_cost(model.config) / ATTENTION_SLOWDOWN
    print(
        f"fit: {fixed * 1e3:.2f} ms + {per_slot * 1e6:.1f} us a slot + {per_pair * 1e9:.2f} ns a pair; "
        f"a pair costs {ratio:.2e} slots, {ratio / counted:.1f}x its multiply-add count "
        f"(llm_lightning.data.packing takes {ATTENTION_SLOWDOWN}x)"
    )


def packing_counts(
    tokenizer, texts, max_length: int, by_length: bool, cost: float | None
) -> tuple[int, int, int]:
    """(real tokens, slots, pairs) of the batches packed with `cost`."""
    real = slots = pairs = 0
    for _, mask in turn_batches(tokenizer, texts, 16, max_length, by_length):
        lengths = mask.sum(1).tolist()
        width, rows = cheapest_rows(lengths, cost)
        real, slots, pairs = real + sum(lengths), slots + len(rows) * width, pairs + len(rows) * width * width
    return real, slots, pairs


def widths_in_turns(models: dict, tokenizer, texts, max_length: int, rounds: int) -> None:
    print(
        "\n| model | order | rows as wide as | slots | real | pairs | tok/s (median, range) | median vs longest's | max logit diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        longest = copy.copy(model)
        longest.pair_cost = None  # rows as wide as the longest text
        both = {"longest": longest, "cheapest": model}
        for order in ORDERS:
            by_length = order == ORDERS[1]
            batches = turn_batches(tokenizer, texts, 16, max_length, by_length)
            with torch.inference_mode():
                diff = max(
                    float((longest(ids, mask).logits - model(ids, mask).logits).abs().max())
                    for ids, mask in batches
                )
            rates = rates_in_turns(both, tokenizer, texts, 16, rounds, max_length, by_length)
            base = statistics.median(rates["longest"])
            for width, m in both.items():
                real, slots, pairs = packing_counts(tokenizer, texts, max_length, by_length, m.pair_cost)
                got = rates[width]
                print(
                    f"| {name} | {order} | {width} | {slots:,} | {real / slots:.0%} | {pairs:,} | "
                    f"{statistics.median(got):,.0f} ({min(got):,.0f}-{max(got):,.0f}) | "
                    f"{statistics.median(got) / base:.2f}x | {diff:.1e} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "models", nargs="+", help="NAME=PATH: a packed runtime folder or a torch model/ folder"
    )
    parser.add_argument("--texts", type=int, default=128, help="test texts per pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7, help="timings per shape (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-fit", action="store_true", help="part 2 only: the widths in turns")
    parser.add_argument("--seed", type=int, default=42, help="the training run's seed: the same test split")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = OmegaConf.load(conf_dir() / "task" / "sentiment.yaml")
    texts = list(load_task(task, args.seed).test.texts[: args.texts])
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}")
    models, tokenizer = {}, None
    for name, _, path in (spec.partition("=") for spec in args.models):
        models[name], tokenizer = load_packed(Path(path))
        if not args.no_fit:
            fit_shapes(name, models[name], args.repeats)
    widths_in_turns(models, tokenizer, texts, task.max_length, args.rounds)


if __name__ == "__main__":
    main()
