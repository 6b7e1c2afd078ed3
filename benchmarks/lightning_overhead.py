"""What Lightning costs per optimizer step, as `make train` runs it, against a plain PyTorch loop.

    python benchmarks/lightning_overhead.py --steps 45 --warmup 5 --rounds 6  # SmolLM2: ~12 min, 2 cores
    python benchmarks/lightning_overhead.py --ablate      # + Lightning without each callback, the logger
    python benchmarks/lightning_overhead.py --profile     # + cProfile of one Lightning run, per package
    python benchmarks/lightning_overhead.py --model tiny  # wiring check in seconds
    python benchmarks/lightning_overhead.py finetune=lora # any Hydra override of conf/train.yaml

Lightning side: conf/train.yaml composed with Hydra's compose API, `llm_lightning.train.build`, then
the loggers and the trainer instantiated as `llm_lightning.train.train` does: the default callbacks
(checkpointing, early stopping, LR monitor, throughput, progress), the TensorBoard logger every
`trainer.log_every_n_steps`. Progress is the log-line style (`callbacks.progress_bar.style=log`) that
`make train` prints when its output is not a terminal. Plain side: the same initial weights (every
run starts from a fresh copy), the same batches in the same order from a copy of the same
datamodule's train loader (fetched and collated inside the window, as Lightning does), forward and
loss under the same autocast, backward, `clip_grad_norm_` at `trainer.gradient_clip_val`, the
optimizer and LR scheduler of the module's own `configure_optimizers`, `zero_grad`, and
`loss.item()` written to a TensorBoard `SummaryWriter` every step.

Timed window (wall clock): the same N optimizer steps after W warm-up steps. A callback, first in
the list, marks `on_train_batch_start` of batch W and of batch W + N; the trainer runs W + N + 1
steps. Batch start to batch start is N whole turns of the fit loop: each step and everything
Lightning does between steps (fetching the next batch, every callback's batch hooks, the LR
scheduler step, the metric logging and logger writes that follow `on_train_batch_end`, progress).
Ending at `on_train_batch_end` of the last step would miss that step's scheduler step and logging.
The plain loop marks the same points, before the work of batch W and of batch W + N; each window
fetches N batches.

Validation stays outside the window on both sides: the trainer validates as configured
(`val_check_interval: 0.5`: first after step 213 of 427 on Rotten Tomatoes at batch 16), a window of
W + N steps ends before that, and a run whose window holds a validation stops with a message.
Validation and the checkpoints written after it are costs per validation (twice an epoch), not per
step; the checkpoint callbacks still run their batch hooks inside the window. (A max_steps run that
never validated saves a checkpoint at the epoch's end: after the window.)

Runs alternate plain, Lightning, Lightning, plain, ... (ABBA over rounds) so that machine drift hits
both alike; a round's ratio is Lightning's wall time over the plain loop's in that round; the summary
is the median and the min-max of those ratios. The goal (issue 19): Lightning costs at most 3%.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.callbacks.progress import ProgressBar
from omegaconf import DictConfig, open_dict
from profile_tables import print_profile  # (benchmarks/profile_tables.py)
from torch.utils.tensorboard import SummaryWriter

from llm_lightning.callbacks import TokenThroughput
from llm_lightning.runtime import apply_runtime, conf_dir, resolved_precision
from llm_lightning.train import build

MODELS = {"smollm2": [], "tiny": ["model=tiny", "task.limit=2000"]}  # tiny: 125 batches, validation at 62
GOAL = 1.03
PLAIN = "plain PyTorch loop"
LIGHTNING = "Lightning Trainer.fit (make train)"


@dataclass(frozen=True)
class Variant:
    """A Lightning run: `make train`'s callbacks less those of the types in `drop`, and its logger or none."""

    name: str
    drop: tuple[type, ...] = ()
    logger: bool = True


DEFAULT = Variant(LIGHTNING)
ABLATIONS = (
    Variant("  without the progress bar", drop=(ProgressBar,)),
    Variant("  without the LR monitor", drop=(LearningRateMonitor,)),
    # LearningRateMonitor refuses to run without a logger, so it goes too
    Variant("  without the logger (and the LR monitor)", drop=(LearningRateMonitor,), logger=False),
    Variant("  without checkpointing", drop=(ModelCheckpoint,)),
    Variant("  without the throughput callback", drop=(TokenThroughput,)),
    Variant(
        "  bare Trainer (none of the above, nor early stopping)",
        drop=(ProgressBar, LearningRateMonitor, ModelCheckpoint, TokenThroughput, EarlyStopping),
        logger=False,
    ),
)


def compose_config(model: str, warmup: int, steps: int, overrides: list[str], out: Path) -> DictConfig:
    """conf/train.yaml as `make train` composes it, for W + N + 1 steps, log-line progress."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                *MODELS[model],
                "callbacks.progress_bar.style=log",
                f"trainer.max_steps={warmup + steps + 1}",  # the last step only closes the window
                *overrides,
            ],
        )
    with open_dict(cfg):
        cfg.output_dir = str(out)  # `${hydra:runtime.output_dir}` needs a Hydra run
    return cfg


@dataclass
class Start:
    """What every run starts from (each gets a deep copy, so all start from the same weights and
    callback state), and its window: `steps` timed optimizer steps after `warmup` untimed ones."""

    module: L.LightningModule
    datamodule: L.LightningDataModule
    callbacks: list[Callback]
    warmup: int
    steps: int

    def copy(self) -> tuple[L.LightningModule, L.LightningDataModule, list[Callback]]:
        return copy.deepcopy((self.module, self.datamodule, self.callbacks))


class WallWindow(Callback):
    """perf_counter at `on_train_batch_start` of batch `warmup` and of batch `warmup + steps`; it
    must come first in the callback list, so that both marks precede the other callbacks' hooks of
    their batch. Counts validations begun inside the window. `profiler` runs inside the window."""

    def __init__(self, warmup: int, steps: int, profiler: cProfile.Profile | None = None):
        self.warmup, self.steps, self.profiler = warmup, steps, profiler
        self.start: float | None = None
        self.end: float | None = None
        self.validations = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = _now(pl_module.device)
            if self.profiler:
                self.profiler.enable()
        elif batch_idx == self.warmup + self.steps:
            if self.profiler:
                self.profiler.disable()
            self.end = _now(pl_module.device)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.start is not None and self.end is None:
            self.validations += 1

    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise SystemExit(
                f"the run stopped before step {self.warmup + self.steps}: the window never closed"
            )
        if self.validations:
            raise SystemExit(
                f"{self.validations} validation(s) ran inside the timed window (steps {self.warmup}.."
                f"{self.warmup + self.steps - 1}); use fewer --steps/--warmup, or a later "
                "trainer.val_check_interval (an override)"
            )
        return self.end - self.start


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def lightning_run(
    start: Start, cfg: DictConfig, variant: Variant, run_dir: Path, profiler: cProfile.Profile | None = None
) -> float:
    """Wall seconds of the window through `Trainer.fit`, trainer and loggers built as `train()` does."""
    module, datamodule, callbacks = start.copy()
    window = WallWindow(start.warmup, start.steps, profiler)
    callbacks = [window] + [c for c in callbacks if not isinstance(c, variant.drop)]
    for c in callbacks:  # resolved at build time; each run writes its own (a max_steps run without a
        if isinstance(c, ModelCheckpoint):  # validation saves one at the epoch's end, after the window)
            c.dirpath = str(run_dir / "checkpoints")
    with open_dict(cfg):
        cfg.output_dir = str(run_dir)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    extra = {}
    if ProgressBar in variant.drop:  # else Lightning adds its own bar
        extra["enable_progress_bar"] = False
    if ModelCheckpoint in variant.drop:  # else Lightning adds its own ModelCheckpoint
        extra["enable_checkpointing"] = False
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers if loggers and variant.logger else False,
        precision=resolved_precision(cfg.trainer.precision),
        **extra,
    )
    L.seed_everything(cfg.seed, workers=True)
    trainer.fit(module, datamodule=datamodule)
    return window.seconds()


def _autocast(precision: str, device: torch.device):
    """The autocast Lightning's precision plugin puts around `training_step` (cache off, as there)."""
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    if precision in ("32", "32-true"):
        return nullcontext()
    raise SystemExit(f"precision={precision}: the plain loop does bf16-mixed and 32-true only")


def _device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def plain_optimizer(module: L.LightningModule, callbacks: list[Callback], precision: str, steps: int):
    """The fine-tuning method's freezing, then the module's own optimizer and LR scheduler."""
    for c in callbacks:  # as Lightning applies it in `setup`
        if isinstance(c, BaseFinetuning):
            c.freeze_before_training(module)
    # configure_optimizers reads two facts from its trainer: the schedule's length (`max_steps`, as
    # Lightning estimates it for this run) and the precision
    module.trainer = SimpleNamespace(estimated_stepping_batches=steps, precision=precision)
    configured = module.configure_optimizers()
    module.trainer = None
    return configured["optimizer"], configured["lr_scheduler"]["scheduler"]


def plain_run(start: Start, cfg: DictConfig, run_dir: Path) -> float:
    """Wall seconds of the same window in a plain loop doing the same work (module docstring)."""
    module, datamodule, callbacks = start.copy()
    precision, device = str(resolved_precision(cfg.trainer.precision)), _device(str(cfg.trainer.accelerator))
    module.to(device).train()
    optimizer, scheduler = plain_optimizer(module, callbacks, precision, cfg.trainer.max_steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = cfg.trainer.gradient_clip_val
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    L.seed_everything(cfg.seed, workers=True)
    began = ended = None
    for i, batch in enumerate(datamodule.train_dataloader()):
        if i == start.warmup:
            began = _now(device)
        if i == start.warmup + start.steps:
            ended = _now(device)
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(precision, device):
            loss = module.loss(module(batch["input_ids"], batch["attention_mask"]), batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        writer.add_scalar("train/loss", loss.item(), i)  # .item() syncs, as Lightning's logging does
    writer.close()
    if began is None or ended is None:
        raise SystemExit(f"the train loader has fewer than {start.warmup + start.steps + 1} batches")
    return ended - began


@dataclass
class Results:
    """Wall seconds of the window per run name, one entry per round, and the window's real tokens."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0

    def ratios(self, name: str) -> list[float]:
        return [s / p for s, p in zip(self.seconds[name], self.seconds[PLAIN], strict=True)]


def measure(start: Start, cfg: DictConfig, variants: list[Variant], rounds: int, root: Path) -> Results:
    """Every run in every round, ABBA order (reversed on odd rounds)."""
    runs: list[tuple[str, Callable[[Path], float]]] = [(PLAIN, lambda d: plain_run(start, cfg, d))]
    runs += [(v.name, lambda d, v=v: lightning_run(start, cfg, v, d)) for v in variants]
    results = Results({name: [] for name, _ in runs})
    for r in range(rounds):
        for name, run in runs if r % 2 == 0 else runs[::-1]:
            run_dir = Path(tempfile.mkdtemp(dir=root))
            seconds = run(run_dir)
            shutil.rmtree(run_dir)  # a SmolLM2 checkpoint with its optimizer state is 1.4 GB
            results.seconds[name].append(seconds)
            print(f"round {r + 1}/{rounds} {name.strip()}: {seconds:.3f} s", flush=True)
            gc.collect()
    return results


def window_tokens(start: Start) -> int:
    """Real (non-pad) tokens of the window's batches."""
    loader = copy.deepcopy(start.datamodule).train_dataloader()
    end = start.warmup + start.steps
    masks = [b["attention_mask"] for i, b in zip(range(end), loader, strict=False) if i >= start.warmup]
    return int(sum(int(m.sum()) for m in masks))


def print_tables(results: Results, steps: int) -> None:
    names = list(results.seconds)
    lightning = names[1:]
    print("\n| round | plain loop (s) | " + " | ".join(f"{n.strip()} / plain" for n in lightning) + " |")
    print("|---" * (2 + len(lightning)) + "|")
    for r, plain in enumerate(results.seconds[PLAIN]):
        ratios = " | ".join(f"{results.ratios(n)[r]:.3f}" for n in lightning)
        print(f"| {r + 1} | {plain:.3f} | {ratios} |")
    print(
        f"\n| run | wall s for {steps} steps (median) | s/step | real tokens/s "
        "| wall time / plain loop: median (min-max over rounds) |"
    )
    print("|---|---|---|---|---|")
    for name in names:
        wall = statistics.median(results.seconds[name])
        ratios = results.ratios(name)
        ratio = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
        print(f"| {name} | {wall:.3f} | {wall / steps:.4f} | {results.tokens / wall:.0f} | {ratio} |")
    overhead = statistics.median(results.ratios(LIGHTNING))
    verdict = "within" if overhead <= GOAL else "over; --ablate and --profile show where it goes"
    print(f"\nLightning overhead: {100 * (overhead - 1):+.1f}% (median), goal <= +3%: {verdict}")


def profile_breakdown(start: Start, cfg: DictConfig, root: Path, top: int = 15) -> None:
    """One Lightning run with cProfile inside the window: self time per package and per function,
    in ms per step. cProfile slows Python code more than kernels, so this says where, not how much."""
    profiler = cProfile.Profile()
    wall = lightning_run(start, cfg, DEFAULT, root / "profile", profiler)
    print_profile(profiler, wall, start.steps, "one Lightning run", top)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--steps", type=int, default=40, help="timed optimizer steps per run (N)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the window (W)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of plain + Lightning runs (R)")
    parser.add_argument("--ablate", action="store_true", help="also Lightning without each callback/logger")
    parser.add_argument("--profile", action="store_true", help="also cProfile one Lightning run's window")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml, e.g. finetune=lora")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error(
            f"need --steps >= 1, --warmup >= 0, --rounds >= 1; got {args.steps}, {args.warmup}, {args.rounds}"
        )
    return args


def main(argv: list[str] | None = None) -> Results:
    args = parse(argv)
    for name in ("lightning.pytorch", "lightning.fabric"):  # GPU/TPU notes and "Seed set", every run
        logging.getLogger(name).setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="lightning_overhead-") as tmp:
        root = Path(tmp)
        cfg = compose_config(args.model, args.warmup, args.steps, args.overrides, root / "build")
        apply_runtime(cfg.runtime)
        L.seed_everything(cfg.seed, workers=True)
        module, datamodule, _, callbacks = build(cfg)
        datamodule.setup("fit")  # tokenize once; every run copies the tokenized splits
        start = Start(module, datamodule, callbacks, args.warmup, args.steps)
        variants = [DEFAULT, *(ABLATIONS if args.ablate else ())]
        results = measure(start, cfg, variants, args.rounds, root)
        results.tokens = window_tokens(start)
        print(
            f"\nmodel={args.model} {' '.join(args.overrides)} precision={resolved_precision(cfg.trainer.precision)} "
            f"batch={cfg.batch_size} threads={torch.get_num_threads()} torch={torch.__version__} "
            f"lightning={L.__version__}; {args.steps} steps timed after {args.warmup} warm-up, "
            f"{args.rounds} rounds, {results.tokens / args.steps:.0f} real tokens/step"
        )
        print_tables(results, args.steps)
        if args.profile:
            profile_breakdown(start, cfg, root)
    return results


if __name__ == "__main__":
    main()
