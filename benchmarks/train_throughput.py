"""Training throughput: a plain PyTorch loop against the LightningModule through `Trainer`,
fp32 against bf16-mixed, and top-4-layer freezing against full fine-tuning.

    python benchmarks/train_throughput.py                 # SmolLM2-135M, Rotten Tomatoes batches
    python benchmarks/train_throughput.py --model tiny    # wiring check in seconds

Every variant runs the same batches (length-grouped, batch 16) with the same model, AdamW
(fused), gradient clipping at 1.0. Variants are interleaved over rounds so that machine noise
hits them alike; the table shows medians of per-step times, steady state (warm-up steps dropped).

What a step costs, not what Lightning costs: each Lightning step is timed from
`on_train_batch_start` to `on_train_batch_end` on a Trainer without logger, progress bar or
checkpointing, so the loop's work between batches (fetching, scheduler, logging, progress,
checkpoint hooks) falls outside the timer. Lightning's overhead as `make train` pays it, the wall
time of N steps with the default callbacks, logger and progress against a plain loop doing the
same work, is measured by benchmarks/lightning_overhead.py.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from llm_lightning.callbacks.finetune import LayerFreeze
from llm_lightning.data import ClassificationDataModule, load_task
from llm_lightning.models import load_classifier
from llm_lightning.module import SequenceClassifier
from llm_lightning.runtime import conf_dir

SMOLLM2 = dict(source="smollm2", attn_implementation="eager")


class StepTimer(Callback):
    def __init__(self):
        self.times: list[float] = []
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)
        self.tokens.append(int(batch["attention_mask"].sum()))


def freeze(model, trainable_layers: int | None) -> None:
    module = SequenceClassifier(model, ["n", "p"], {"lr": 1e-5, "weight_decay": 0.0}, {"name": "linear"})
    LayerFreeze(trainable_layers, freeze_embeddings=True).freeze_before_training(module)


def plain_loop(model, batches, precision: str) -> tuple[list[float], list[int]]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    times, tokens = [], []
    model.train()
    for batch in batches:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        tokens.append(int(batch["attention_mask"].sum()))
    return times, tokens


def lightning_loop(model, batches, precision: str) -> tuple[list[float], list[int]]:
    module = SequenceClassifier(
        model,
        ["n", "p"],
        {"lr": 1e-5, "weight_decay": 0.0, "fused": True},
        {"name": "constant_with_warmup", "warmup_ratio": 0.0},
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_steps=len(batches),
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return timer.times, timer.tokens


def padding_report(dm: ClassificationDataModule) -> None:
    """Tokens one training epoch computes (padding included): random batches vs length-grouped."""
    lengths = dm.splits["train"].lengths()
    real = sum(lengths)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    random_batches = [order[i : i + 16] for i in range(0, len(order), 16)]
    grouped = dm.train_dataloader().batch_sampler.batches()
    for name, batches in (("random batches", random_batches), ("length-grouped batches", grouped)):
        padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
        print(f"{name}: {padded:,} tokens computed per epoch for {real:,} real tokens ({padded / real:.2f}x)")


def rate(times: list[float], tokens: list[int], skip: int) -> tuple[float, float]:
    t, n = times[skip:], tokens[skip:]
    return statistics.median(t), sum(n) / sum(t)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--padding-only",
        action="store_true",
        help="only count the tokens one epoch computes, random vs length-grouped batches",
    )
    parser.add_argument(
        "--overhead-only",
        action="store_true",
        help="only the plain loop against Lightning's step (bf16-mixed, full); Lightning's overhead "
        "between steps, as make train pays it: benchmarks/lightning_overhead.py",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(0)
    task = OmegaConf.load(conf_dir() / "task" / "sentiment.yaml")
    data = load_task(task, seed=42)
    tiny = OmegaConf.merge(OmegaConf.load(conf_dir() / "model" / "tiny.yaml"), {"num_layers": 4})
    model_cfg = OmegaConf.create(SMOLLM2) if args.model == "smollm2" else tiny
    model, tok = load_classifier(model_cfg, data.label_names)
    dm = ClassificationDataModule(data, tok, 128, 16, 32, seed=0)
    dm.setup()
    padding_report(dm)
    if args.padding_only:
        return
    skip = 2
    batches = [b for _, b in zip(range(args.steps + skip), dm.train_dataloader(), strict=False)]
    n_layers = model.config.num_hidden_layers
    variants = {
        "plain loop, bf16-mixed, full": ("plain", "bf16-mixed", None),
        "Lightning, bf16-mixed, full": ("lightning", "bf16-mixed", None),
        "Lightning, 32, full": ("lightning", "32", None),
        f"Lightning, bf16-mixed, freeze (top 4 of {n_layers})": ("lightning", "bf16-mixed", 4),
        "Lightning, bf16-mixed, full, SDPA attention": ("lightning", "bf16-mixed", "sdpa"),
    }
    if args.overhead_only:
        variants = dict(list(variants.items())[:2])
    results = run_rounds(variants, model, batches, args.rounds, skip)
    print(
        f"\nmodel={args.model} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"batch=16 steps={args.steps}x{args.rounds} "
        f"real tokens/step={statistics.mean(int(b['attention_mask'].sum()) for b in batches[skip:]):.0f}"
    )
    print_results(results)


def run_rounds(
    variants: dict, model, batches: list, rounds: int, skip: int
) -> dict[str, list[tuple[float, float]]]:
    """Per variant: (s/step, tokens/s) in each round, the variants run in ABBA order over rounds."""
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants.items())
        if r % 2:  # ABBA order: slow drifts of the machine hit every variant alike
            order.reverse()
        for name, (loop, precision, trainable) in order:
            m = copy.deepcopy(model)
            if trainable == "sdpa":  # same weights, PyTorch's fused attention instead of eager
                m.set_attn_implementation("sdpa")
                trainable = None
            freeze(m, trainable)
            fn = plain_loop if loop == "plain" else lightning_loop
            results[name].append(rate(*fn(m, batches, precision), skip))
            print(f"round {r + 1}/{rounds} {name}: {results[name][-1][1]:.0f} tok/s", flush=True)
            del m
    return results


def print_results(results: dict[str, list[tuple[float, float]]]) -> None:
    plain = results["plain loop, bf16-mixed, full"]
    full = results["Lightning, bf16-mixed, full"]
    print(
        "| variant | s/step (median) | tokens/s (median) | vs plain loop (median of per-round ratios) "
        "| step time vs Lightning full (median of per-round ratios) |"
    )
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        # Paired per-round ratios: both variants of a round saw the same machine state.
        vs_plain = statistics.median(r[1] / p[1] for r, p in zip(runs, plain, strict=True))
        vs_full = statistics.median(r[0] / f[0] for r, f in zip(runs, full, strict=True))
        step = statistics.median(x[0] for x in runs)
        tps = statistics.median(x[1] for x in runs)
        print(f"| {name} | {step:.3f} | {tps:.0f} | {vs_plain:.3f} | {vs_full:.2f} |")


if __name__ == "__main__":
    main()
