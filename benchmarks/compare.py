"""Saved models side by side: test (or validation) accuracy, and batch-16 throughput timed in turns.

    flock /tmp/heavy.lock python benchmarks/compare.py \\
        teacher=outputs/sentiment/run-full-5e-5/model \\
        student=outputs/distill/kd-depth15-transfer30k-then30k/model \\
        student_int8=outputs/quantize/student-30k30k/quantized

Each NAME=PATH is anything `llm_lightning.models.saved.load_saved` loads (a `model/` folder, a
checkpoint, a `quantized/` folder). A quantized folder saved with `compile: true` is compiled as
its report measured it; everything else runs eagerly. This is how the whole chain's speed-up is
measured: the fp32 teacher and the chain's last model in one process, in turns batch by batch
(llm_lightning.measure.bench.rates_in_turns), on the test texts in split order and sorted by
length; ratios are to the first model, taken round by round (each round's models ran together),
printed as the median with the slowest and fastest round's ratio. Accuracy is compared with the first
model text by text (llm_lightning.measure.paired): the difference in points with its 95% paired
bootstrap interval, the exact McNemar p-value and the share of identical predictions.
`--split validation` scores the validation texts instead: the split to choose between models on
(docs/BENCHMARKS.md, "The rule"); the test split reports the model chosen. `--padding-free` adds
each model again with its batches packed into unpadded rows (llm_lightning.measure.padding_free),
as `NAME+padding_free`.
`NAME=PATH@eager` (or `@sdpa`) runs that model with that attention kernel instead of the one it
loads with (an exported `model/` folder loads with SDPA; a quantized folder with the one it was saved
with), e.g. to time the fp32 teacher with both kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from llm_lightning.data import load_task
from llm_lightning.data.provenance import check_split
from llm_lightning.measure.bench import cpu_name, evaluate, parameter_count, rates_in_turns, token_counts
from llm_lightning.measure.compiling import maybe_compile
from llm_lightning.measure.padding_free import padding_free
from llm_lightning.measure.paired import compare
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.saved import META_FILE
from llm_lightning.quantization.settings import ATTENTIONS
from llm_lightning.quantization.torchao_path import set_attention
from llm_lightning.runtime import conf_dir, user_errors

ORDERS = ("split order", "sorted by length")
SPLITS = {"test": "test", "validation": "val"}  # --split -> TaskData's field


def load(path: Path, attention: str | None = None):
    model, tokenizer, _ = load_saved(path)
    set_attention(model, attention)
    meta = path / META_FILE
    compiled = meta.exists() and bool(json.loads(meta.read_text()).get("compile"))
    return maybe_compile(model.eval(), compiled), tokenizer, compiled


def spread(values: list[float], fmt: str) -> str:
    """Median with the range over rounds: "1.52x (1.48–1.57x)"."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def paired_cells(labels: list[int], first: list[int], preds: list[int]) -> str:
    """Δacc in points [95% paired bootstrap CI] | McNemar p | agreement, against the first model."""
    got = compare(labels, first, preds)
    diff, low, high = (100 * got[k] for k in ("acc_diff", "acc_diff_low", "acc_diff_high"))
    return f"{diff:+.2f} [{low:+.2f}, {high:+.2f}] | {got['mcnemar_p']:.3g} | {got['agreement']:.2%}"


def print_table(
    models: dict, turns: dict, labels: list[int], rounds: int, texts: int, split: str = "test"
) -> None:
    first = next(iter(models))
    print(
        f"\nIn turns, batch by batch ({rounds} rounds, batch 16, {texts} {split} texts): tok/s and the ratio "
        "to the first model, each round's ratio taken within the round; median (slowest–fastest round). "
        f"Accuracy vs the first model text by text on all {len(labels)} {split} texts."
    )
    print(
        f"| model | compiled | params | {split} acc | Δacc pts vs first [95% CI] | McNemar p | agree | "
        "split order tok/s | vs first | sorted by length tok/s | vs first |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base_preds = models[first][3]["predictions"]
    for name, (_, _, compiled, metrics, params) in models.items():
        cells = []
        for order in ORDERS:
            rates = turns[order]
            ratios = [mine / base for mine, base in zip(rates[name], rates[first], strict=True)]
            cells += [spread(rates[name], "{:,.0f}"), spread(ratios, "{:.2f}x")]
        paired = paired_cells(labels, base_preds, metrics["predictions"]) if name != first else "— | — | —"
        print(
            f"| {name} | {'yes' if compiled else 'no'} | {params / 1e6:.1f} M | {metrics['acc']:.4f} | "
            f"{paired} | " + " | ".join(cells) + " |"
        )


def parse_args() -> tuple[argparse.Namespace, dict[str, tuple[Path, str | None]]]:
    """The arguments, and per model NAME its (PATH, attention kernel or None)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="NAME=PATH, the first is the baseline")
    parser.add_argument("--texts", type=int, default=128, help="texts per throughput pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--padding-free", action="store_true", help="each model also padding-free")
    parser.add_argument("--seed", type=int, default=42, help="the training run's seed: the same test split")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="validation: to choose between models; test: to report the one chosen (docs/BENCHMARKS.md, the rule)",
    )
    parser.add_argument(
        "--allow-split-mismatch",
        action="store_true",
        help="score models on splits other than their training.json's",
    )
    args = parser.parse_args()
    paths = {}
    for spec in args.models:
        name, sep, path = spec.partition("=")
        where, at, kernel = path.rpartition("@")
        path, attention = (where, kernel) if at and kernel in ATTENTIONS else (path, None)
        if not sep or not Path(path).exists():
            parser.error(
                f"{spec!r}: expected NAME=PATH[@eager|@sdpa] to an existing model folder or checkpoint"
            )
        paths[name] = (Path(path), attention)
    return args, paths


def main() -> None:
    args, paths = parse_args()
    torch.set_num_threads(args.threads)
    # every compiled model's decoder layers share one code object, and each model (its attention
    # kernel, its shapes) needs its own graphs: 8, torch's default, is too few for several models
    torch._dynamo.config.recompile_limit = 64
    task = OmegaConf.load(conf_dir() / "task" / "sentiment.yaml")
    data = load_task(task, args.seed)
    for path, _ in paths.values():  # every model scored on the texts it was trained against
        check_split(path, task, args.seed, data, allow=args.allow_split_mismatch)
    scored = getattr(data, SPLITS[args.split])
    print(
        f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; {len(scored)} {args.split} texts",
        flush=True,
    )
    models = load_all(paths, scored, task.max_length, args)
    texts = list(scored.texts[: args.texts])
    turns = in_turns(models, texts, args.rounds, task.max_length)
    print_table(models, turns, list(scored.labels), args.rounds, len(texts), args.split)


def load_all(paths: dict, scored, max_length: int, args: argparse.Namespace) -> dict:
    """Per name: (model, tokenizer, compiled, metrics on `scored`'s texts, parameters), each model loaded and
    scored (which compiles its batch shapes); with `--padding-free` also `NAME+padding_free`."""
    models = {}
    for name, (path, attention) in paths.items():
        started = time.perf_counter()
        model, tokenizer, compiled = load(path, attention)
        rows = tokenizer(list(scored.texts), truncation=True, max_length=max_length)["input_ids"]
        with torch.inference_mode():  # the accuracy pass also compiles every batch shape
            metrics = evaluate(
                model, rows, scored.labels, model.config.num_labels, 32, tokenizer.pad_token_id
            )
        params = parameter_count(model)
        models[name] = (model, tokenizer, compiled, metrics, params)
        print(
            f"  {name}: acc {metrics['acc']:.4f}, {model.config._attn_implementation} attention "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        # True: every model; a collection: the named (torch) ones, e.g. beside runtime models
        if args.padding_free is True or (args.padding_free and name in args.padding_free):
            packed = padding_free(model, tokenizer.pad_token_id)
            with torch.inference_mode():  # compiles the packed shapes too
                metrics = evaluate(
                    packed, rows, scored.labels, model.config.num_labels, 32, tokenizer.pad_token_id
                )
                evaluate(
                    packed,
                    rows[: args.texts],
                    scored.labels[: args.texts],
                    model.config.num_labels,
                    16,
                    tokenizer.pad_token_id,
                )
            print(f"  {name}+padding_free: acc {metrics['acc']:.4f}", flush=True)
            models[f"{name}+padding_free"] = (packed, tokenizer, compiled, metrics, params)
    return models


def in_turns(
    models: dict, texts: list[str], rounds: int, max_length: int
) -> dict[str, dict[str, list[float]]]:
    """Per order (ORDERS): each model's tok/s in each round, timed in turns; prints each order's padding."""
    tokenizer = next(iter(models.values()))[1]
    turns = {  # per model: its tok/s in each round
        order: rates_in_turns(
            {name: m for name, (m, *_) in models.items()},
            tokenizer,
            texts,
            16,
            rounds,
            max_length,
            by_length=order == ORDERS[1],
        )
        for order in ORDERS
    }
    rows = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    for order, ordered in zip(ORDERS, (rows, sorted(rows, key=len)), strict=True):
        real, padded = token_counts(ordered, 16)
        print(f"{order}: {real:,} real tokens, {padded:,} once padded per batch ({real / padded:.0%} real)")
    return turns


if __name__ == "__main__":
    user_errors(main)()  # a split mismatch or a bad path: one line and exit 2
