"""Saved models side by side: test accuracy, and batch-16 throughput timed in turns.

    flock /tmp/heavy.lock python benchmarks/compare.py \\
        teacher=outputs/sentiment/run-full-5e-5/model \\
        student=outputs/distill/kd-depth15-transfer30k-then30k/model \\
        student_int8=outputs/quantize/student-30k30k/quantized

Each NAME=PATH is anything `llm_lightning.models.saved.load_saved` loads (a `model/` folder, a
checkpoint, a `quantized/` folder). A quantized folder saved with `compile: true` is compiled as
its report measured it; everything else runs eagerly. This is how the whole chain's speed-up is
measured: the fp32 teacher and the chain's last model in one process, in turns batch by batch
(llm_lightning.bench.interleaved_throughput), on the test texts in split order and sorted by
length; ratios are to the first model. `--padding-free` adds each model again with its batches
packed into unpadded rows (llm_lightning.padding_free), as `NAME+padding_free`.
`NAME=PATH@eager` (or `@sdpa`) runs that model with that attention kernel instead of the one it
loads with (an exported `model/` folder loads with SDPA; a quantized folder with the one it was saved
with), e.g. to time the fp32 teacher with both kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llm_lightning.bench import cpu_name, evaluate, interleaved_throughput, token_counts  # noqa: E402
from llm_lightning.compiling import maybe_compile  # noqa: E402
from llm_lightning.data import load_task  # noqa: E402
from llm_lightning.models.saved import load_saved  # noqa: E402
from llm_lightning.padding_free import padding_free  # noqa: E402
from llm_lightning.quantize import ATTENTIONS, set_attention  # noqa: E402
from llm_lightning.quantized_dir import META_FILE  # noqa: E402

ORDERS = ("split order", "sorted by length")


def load(path: Path, attention: str | None = None):
    model, tokenizer, _ = load_saved(path)
    set_attention(model, attention)
    meta = path / META_FILE
    compiled = meta.exists() and bool(json.loads(meta.read_text()).get("compile"))
    return maybe_compile(model.eval(), compiled), tokenizer, compiled


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="NAME=PATH, the first is the baseline")
    parser.add_argument("--texts", type=int, default=128, help="test texts per throughput pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--padding-free", action="store_true", help="each model also padding-free")
    parser.add_argument("--seed", type=int, default=42, help="the training run's seed: the same test split")
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
    torch.set_num_threads(args.threads)
    # every compiled model's decoder layers share one code object, and each model (its attention
    # kernel, its shapes) needs its own graphs: 8, torch's default, is too few for several models
    torch._dynamo.config.recompile_limit = 64
    task = OmegaConf.load(ROOT / "conf" / "task" / "sentiment.yaml")
    test = load_task(task, args.seed).test
    print(
        f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; {len(test)} test texts", flush=True
    )
    models = {}
    for name, (path, attention) in paths.items():
        started = time.perf_counter()
        model, tokenizer, compiled = load(path, attention)
        rows = tokenizer(list(test.texts), truncation=True, max_length=task.max_length)["input_ids"]
        with torch.inference_mode():  # the accuracy pass also compiles every batch shape
            metrics = evaluate(model, rows, test.labels, model.config.num_labels, 32, tokenizer.pad_token_id)
        params = sum(p.numel() for p in model.parameters())
        models[name] = (model, tokenizer, compiled, metrics, params)
        print(
            f"  {name}: acc {metrics['acc']:.4f}, {model.config._attn_implementation} attention "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        if args.padding_free:
            packed = padding_free(model, tokenizer.pad_token_id)
            with torch.inference_mode():  # compiles the packed shapes too
                metrics = evaluate(
                    packed, rows, test.labels, model.config.num_labels, 32, tokenizer.pad_token_id
                )
                evaluate(
                    packed,
                    rows[: args.texts],
                    test.labels[: args.texts],
                    model.config.num_labels,
                    16,
                    tokenizer.pad_token_id,
                )
            print(f"  {name}+padding_free: acc {metrics['acc']:.4f}", flush=True)
            models[f"{name}+padding_free"] = (packed, tokenizer, compiled, metrics, params)
    texts = list(test.texts[: args.texts])
    tokenizer = next(iter(models.values()))[1]
    turns = {
        order: interleaved_throughput(
            {name: m for name, (m, *_) in models.items()},
            tokenizer,
            texts,
            16,
            args.rounds,
            task.max_length,
            by_length=order == ORDERS[1],
        )
        for order in ORDERS
    }
    first = next(iter(models))
    rows = tokenizer(texts, truncation=True, max_length=task.max_length)["input_ids"]
    for order, ordered in zip(ORDERS, (rows, sorted(rows, key=len)), strict=True):
        real, padded = token_counts(ordered, 16)
        print(f"{order}: {real:,} real tokens, {padded:,} once padded per batch ({real / padded:.0%} real)")
    base_acc = models[first][3]["acc"]
    print(
        f"\nIn turns, batch by batch ({args.rounds} rounds, batch 16, {len(texts)} test texts; tok/s median):"
    )
    print(
        "| model | compiled | params | test acc | vs first | split order | vs first | sorted by length | vs first |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (_, _, compiled, metrics, params) in models.items():
        cells = [f"{turns[o][name]:,.0f} | {turns[o][name] / turns[o][first]:.2f}x" for o in ORDERS]
        print(
            f"| {name} | {'yes' if compiled else 'no'} | {params / 1e6:.1f} M | {metrics['acc']:.4f} | "
            f"{100 * (metrics['acc'] - base_acc):+.2f} | " + " | ".join(cells) + " |"
        )


if __name__ == "__main__":
    main()
