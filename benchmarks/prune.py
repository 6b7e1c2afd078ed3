"""Prune a fine-tuned classifier four ways and compare with it: parameters, size on disk,
throughput (tokens/s, fp32, batch 16 and batch 1) and test accuracy.

    # 1. prune the fine-tuned model and measure (before recovery); writes <out>/<variant>/
    flock /tmp/heavy.lock python benchmarks/prune.py make --model outputs/sentiment/run-full-5e-5/model \
        --out outputs/prune-bench
    # 2. recover each pruned model by fine-tuning it (see docs/BENCHMARKS.md for the exact runs), then
    flock /tmp/heavy.lock python benchmarks/prune.py measure mlp50=<run>/model depth50=<run>/model ...

Variants: 50% unstructured (global L1; zeros in dense matrices, so no speedup), 50% of MLP width,
heads (one query head per KV group: 3 of 9 on SmolLM2, the nearest GQA-valid count to 25%), and
50% of depth (block influence). Results are appended to <out>/results.jsonl and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from llm_lightning.data import load_task
from llm_lightning.models import load_exported
from llm_lightning.pruning import (
    block_influence,
    compute_masks,
    drop_layers,
    plan_width,
    prunable_weights,
    shrink_width,
    width_importance,
)
from llm_lightning.pruning.depth import layers_to_keep
from llm_lightning.pruning.magnitude import apply_masks
from llm_lightning.runtime import conf_dir

VARIANTS = ("unstructured50", "mlp50", "heads", "depth50")


def load_base(path: str):
    """An exported model/ folder, or `smollm2` for the pretrained model with a new (random) head:
    enough for parameters, size and speed, which depend on shapes, not on the weights."""
    if path == "smollm2":
        from omegaconf import OmegaConf

        from llm_lightning.models import load_classifier

        return load_classifier(
            OmegaConf.create({"source": "smollm2", "attn_implementation": "eager"}), ["negative", "positive"]
        )
    model, tok = load_exported(path)
    model.set_attn_implementation("eager")  # faster than SDPA for short texts on CPU, as in training
    return model, tok


def task_data(seed: int = 42):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["task=sentiment"])
    return load_task(cfg.task, cfg.seed if seed is None else seed)


def batches(tok, texts, labels, size: int) -> list[dict]:
    out = []
    for i in range(0, len(texts), size):
        enc = tok(texts[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        out.append(
            {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(labels[i : i + size]),
            }
        )
    return out


def prune(model, name: str, calibration: list[dict]):
    """Apply one variant in place (same code the callbacks run)."""
    cfg = model.config
    if name == "unstructured50":
        weights = prunable_weights(model)
        apply_masks(weights, compute_masks(weights, 0.5, "l1", "global"))
    elif name in ("mlp50", "heads"):
        mlp, heads = width_importance(model, calibration, "activation")
        remove = cfg.num_key_value_heads if name == "heads" else 0  # one query head per KV group
        shrink_width(model, plan_width(mlp, heads, cfg, 0.5 if name == "mlp50" else 0.0, remove, "query"))
    elif name == "depth50":
        with torch.no_grad():
            influence = block_influence(model, calibration)
        drop_layers(model, layers_to_keep(influence, cfg.num_hidden_layers // 2))
    else:
        raise ValueError(f"Unknown variant {name!r}; choose from {VARIANTS}.")
    return model


@torch.inference_mode()
def tokens_per_s(model, tok, texts, batch_size: int, repeats: int = 1) -> float:
    data = batches(tok, texts, [0] * len(texts), batch_size)
    model(input_ids=data[0]["input_ids"], attention_mask=data[0]["attention_mask"])  # warm-up
    tokens, started = 0, time.perf_counter()
    for _ in range(repeats):
        for b in data:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - started)


@torch.inference_mode()
def accuracy(model, tok, texts, labels) -> float:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding, same result
    data = batches(tok, [texts[i] for i in order], [labels[i] for i in order], 32)
    right = 0
    for b in data:
        pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
        right += int((pred == b["labels"]).sum())
    return right / len(texts)


def disk_mb(model) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        return sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 1e6


def measure(models: dict, data, stage: str, rounds: int = 3, with_accuracy: bool = True) -> list[dict]:
    """Throughput is taken in interleaved rounds (median per model), so load from other processes
    on a shared machine hits every model alike and the ratios stay comparable."""
    test = data.test
    speed: dict[str, dict[str, list[float]]] = {name: {"b16": [], "b1": []} for name in models}
    for _ in range(rounds):
        for name, (model, tok) in models.items():
            model.eval()
            speed[name]["b16"].append(tokens_per_s(model, tok, test.texts[:160], 16))
            speed[name]["b1"].append(tokens_per_s(model, tok, test.texts[:24], 1))
    rows = []
    for name, (model, tok) in models.items():
        row = {
            "variant": name,
            "stage": stage if name != "unpruned" else "fine-tuned",
            "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "nonzero_params_M": sum(int((p != 0).sum()) for p in model.parameters()) / 1e6,
            "disk_MB": disk_mb(model),
            "tok_s_b16": statistics.median(speed[name]["b16"]),
            "tok_s_b1": statistics.median(speed[name]["b1"]),
            "test_acc": accuracy(model, tok, test.texts, test.labels) if with_accuracy else None,
            "layers": model.config.num_hidden_layers,
            "intermediate": model.config.intermediate_size,
            "heads": f"{model.config.num_attention_heads}/{model.config.num_key_value_heads}",
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | stage | params (M) | non-zero (M) | disk (MB) | tok/s b16 | tok/s b1 | test acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = "—" if r["test_acc"] is None else f"{100 * r['test_acc']:.1f}%"
        lines.append(
            f"| {r['variant']} | {r['stage']} | {r['params_M']:.1f} | {r['nonzero_params_M']:.1f} | "
            f"{r['disk_MB']:.0f} | {r['tok_s_b16']:.0f} | {r['tok_s_b1']:.0f} | {acc} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    make = sub.add_parser("make", help="prune the model each way, save and measure")
    make.add_argument("--model", required=True, help="exported fine-tuned model/ folder")
    make.add_argument("--out", default="outputs/prune-bench")
    make.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    make.add_argument("--calibration-batches", type=int, default=8)
    make.add_argument("--no-save", action="store_true", help="do not write the pruned models")
    meas = sub.add_parser("measure", help="measure saved models, e.g. after recovery: name=dir ...")
    meas.add_argument("models", nargs="+")
    meas.add_argument("--out", default="outputs/prune-bench")
    meas.add_argument("--stage", default="recovered")
    for p in (make, meas):
        p.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds (median)")
        p.add_argument("--skip-accuracy", action="store_true", help="shapes and speed only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = task_data()
    models = {}
    if args.cmd == "make":
        model, tok = load_base(args.model)
        models["unpruned"] = (model, tok)
        n = 16 * args.calibration_batches
        calibration = batches(tok, data.train.texts[:n], data.train.labels[:n], 16)
        for name in args.variants:
            model, tok = load_base(args.model)
            started = time.perf_counter()
            prune(model, name, calibration)
            print(f"{name}: pruned in {time.perf_counter() - started:.1f} s", flush=True)
            if not args.no_save:
                model.save_pretrained(out / name)
                tok.save_pretrained(out / name)
            models[name] = (model, tok)
        stage = "pruned, no recovery"
    else:
        for spec in args.models:
            name, _, path = spec.partition("=")
            models[name] = load_base(path)
        stage = args.stage
    rows = measure(models, data, stage, args.rounds, not args.skip_accuracy)
    with open(out / "results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
