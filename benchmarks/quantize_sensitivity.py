"""Which linear layers lose accuracy under int8 dynamic quantization, and what fixes it.

    flock /tmp/heavy.lock python benchmarks/quantize_sensitivity.py --model outputs/sentiment/run-full-5e-5/model \\
        --per-layer --texts 256 --variants 'all;skip=*.down_proj;skip=score;smooth=0.5'

Every variant is compared with the fp32 model on the same texts (the validation split by default,
so the choice is not fitted to the test split): accuracy, predictions that flip, and the change
in the logit margin (logit[1] - logit[0]). `--per-layer` first prints each linear layer's own
error: the fp32 model runs once, and every linear's input is also fed to its int8 counterpart,
giving ||y_int8 - y_fp32|| / ||y_fp32|| over real (non-pad) tokens.

Variant grammar: `;` separates variants; within one, `+` joins options:
`all` (every linear int8), `skip=PAT,PAT` (keep those in float; fnmatch on module names),
`smooth=ALPHA` (torchao SmoothQuant, calibrated on `--calib` training texts), `asym`
(asymmetric per-token activations, by centring: llm_lightning.quantization.centering), `zp` (with asym: by
torchao's own zero point instead), `fuse` (q/k/v and gate/up stacked into one layer each:
llm_lightning.quantization.fused_projections).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from llm_lightning.data import load_task
from llm_lightning.data.agreement import agreement, logits
from llm_lightning.data.batching import length_batches, pad
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.fused_projections import fuse_projections
from llm_lightning.quantization.settings import torchao_config
from llm_lightning.quantization.torchao_path import (
    linear_names,
    quantize_linears,
    quantize_model,
    skipped_linears,
)
from llm_lightning.runtime import conf_dir


def parse_variant(spec: str) -> dict:
    variant = {"name": spec, "skip": [], "smooth": None, "asym": False, "zp": False, "fuse": False}
    for part in spec.split("+"):
        key, _, value = part.partition("=")
        if key == "all":
            continue
        if key == "skip":
            variant["skip"] = [p for p in value.split(",") if p]
        elif key == "smooth":
            variant["smooth"] = float(value)
        elif key in ("asym", "zp", "fuse"):
            variant[key] = True
        else:
            raise SystemExit(
                f"unknown variant option {part!r} in {spec!r}; use all, skip=, smooth=, asym, zp, fuse"
            )
    return variant


def quantize(model: nn.Module, variant: dict, calib_rows: list[list[int]]) -> nn.Module:
    """The variant, through the package's own `quantize_model`; `zp`: torchao's own zero point for
    asymmetric tokens (re-summing the weights on every call), built from the package's parts."""
    calibration = [torch.tensor([row]) for row in calib_rows] if variant["smooth"] is not None else []
    if variant["zp"]:
        keep = skipped_linears(model, variant["skip"])
        if variant["fuse"]:
            fuse_projections(model, keep)
        base = torchao_config("int8_dynamic", activations="asymmetric")
        return quantize_linears(model.eval(), base, keep, variant["smooth"], calibration)
    return quantize_model(
        model,
        "int8_dynamic",
        skip=variant["skip"],
        smoothquant_alpha=variant["smooth"],
        calibration=calibration,
        activations="asymmetric" if variant["asym"] else "symmetric",
        fuse_projections=variant["fuse"],
    )


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, seconds: float) -> dict:
    pred, ref_pred = got.argmax(-1), ref.argmax(-1)
    return {
        "variant": name,
        "acc": float((pred == labels).float().mean()),
        **agreement(got, ref),  # flips, margin_mae, margin_max: what `smoothquant_alpha: auto` ranks by
        "fixed": int(((pred == labels) & (ref_pred != labels)).sum()),
        "broken": int(((pred != labels) & (ref_pred == labels)).sum()),
        "seconds": seconds,
    }


def per_layer_errors(model: nn.Module, rows: list[list[int]], pad_id: int) -> dict[str, float]:
    """||y_int8 - y_fp32|| / ||y_fp32|| per linear layer, on each layer's real fp32 inputs."""
    from torchao.quantization import quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, torchao_config("int8_dynamic"))
    twins = dict(quantized.named_modules())
    err: dict[str, float] = defaultdict(float)
    norm: dict[str, float] = defaultdict(float)
    real = {"mask": None}

    def hook(name):
        def record(module, inputs, output):
            keep = real["mask"]
            x = inputs[0].reshape(-1, inputs[0].shape[-1])[keep]
            y = output.reshape(-1, output.shape[-1])[keep]
            err[name] += float(((twins[name](x) - y) ** 2).sum())
            norm[name] += float((y**2).sum())

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.inference_mode():
        for idx in length_batches([len(r) for r in rows], 32):
            ids, mask = pad([rows[i] for i in idx], pad_id)
            real["mask"] = mask.reshape(-1).bool()
            model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return {n: (err[n] / norm[n]) ** 0.5 for n in err}


def print_per_layer(errors: dict[str, float]) -> None:
    kinds = sorted({n.rsplit(".", 1)[-1] for n in errors if ".layers." in n})
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in errors if ".layers." in n})
    print("\nPer-layer relative error of int8 dynamic, ||y_q - y|| / ||y|| (%):")
    print("| layer | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    by_layer_kind = {
        (int(n.split(".layers.")[1].split(".")[0]), n.rsplit(".", 1)[-1]): e
        for n, e in errors.items()
        if ".layers." in n
    }
    for i in layers:
        cells = [f"{100 * by_layer_kind.get((i, k), float('nan')):.1f}" for k in kinds]
        print(f"| {i} | " + " | ".join(cells) + " |")
    for n, e in errors.items():
        if ".layers." not in n:
            print(f"| {n} | {100 * e:.1f} |")
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:10]
    print("worst: " + ", ".join(f"{n} {100 * e:.1f}%" for n, e in worst), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="an exported fp32 model/ folder")
    parser.add_argument("--variants", default="all", help="see the grammar above")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--texts", type=int, default=256, help="first N texts of the split (0: all)")
    parser.add_argument("--calib", type=int, default=64, help="training texts for SmoothQuant calibration")
    parser.add_argument("--per-layer", action="store_true", help="also print each linear layer's own error")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="the training run's seed: the same splits")
    parser.add_argument("--task", default="sentiment", help="conf/task/<name>.yaml")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in args.variants.split(";") if v]
    task = OmegaConf.load(conf_dir() / "task" / f"{args.task}.yaml")
    data = load_task(task, args.seed)
    split = getattr(data, args.split)
    texts, labels = split.texts, split.labels
    if args.texts:
        texts, labels = texts[: args.texts], labels[: args.texts]
    fp32, tokenizer, _ = load_saved(args.model)
    fp32.eval()
    for v in variants:  # a typo fails now, not after an hour
        skipped_linears(fp32, v["skip"])
    encode = lambda t: tokenizer(list(t), truncation=True, max_length=task.max_length)["input_ids"]  # noqa: E731
    rows, calib = encode(texts), encode(data.train.texts[: args.calib])
    target = torch.tensor(list(labels))
    print(
        f"{len(linear_names(fp32))} linear layers; {len(rows)} {args.split} texts; torch {torch.__version__}, "
        f"{args.threads} threads",
        flush=True,
    )
    if args.per_layer:
        started = time.perf_counter()
        print_per_layer(per_layer_errors(fp32, rows, tokenizer.pad_token_id))
        print(f"({time.perf_counter() - started:.0f} s)", flush=True)
    started = time.perf_counter()
    ref = logits(fp32, rows, tokenizer.pad_token_id)
    results = [compare("fp32", ref, ref, target, time.perf_counter() - started)]
    print(f"  fp32: acc {results[0]['acc']:.4f} ({results[0]['seconds']:.0f} s)", flush=True)
    for v in variants:
        started = time.perf_counter()
        model = quantize(copy.deepcopy(fp32), v, calib)
        row = compare(v["name"], logits(model, rows, tokenizer.pad_token_id), ref, target, 0.0)
        row["seconds"] = time.perf_counter() - started
        results.append(row)
        print(
            f"  {v['name']}: acc {row['acc']:.4f}, flips {row['flips']} ({row['seconds']:.0f} s)", flush=True
        )
        del model
    print(
        f"\n| variant | acc ({args.split}, {len(rows)}) | vs fp32 | flips | fixed | broken | margin MAE | margin max |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['variant']} | {r['acc']:.4f} | {100 * (r['acc'] - results[0]['acc']):+.2f} | {r['flips']} | "
            f"{r['fixed']} | {r['broken']} | {r['margin_mae']:.3f} | {r['margin_max']:.3f} |"
        )


if __name__ == "__main__":
    main()
