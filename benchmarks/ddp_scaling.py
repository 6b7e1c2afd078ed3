"""DDP scaling on this CPU: 2 gloo processes x 1 thread against 1 process x 1 and x 2 threads, same global batch.

    python benchmarks/ddp_scaling.py                       # tiny and small random Llamas, 2 rounds
    python benchmarks/ddp_scaling.py --rounds 3 --steps 30

Each run trains `--steps` optimizer steps of a global batch of `--global-batch` on Rotten Tomatoes
with no validation, test or export, and reports the steady-state `train/tokens_per_s` (the
TokenThroughput callback: forward + backward + all-reduce + optimizer step, first 2 batches left
out). The two set-ups run alternately, so drift in the machine's load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llm_lightning.runtime import conf_dir

MODELS = {
    "tiny": ["model=tiny"],  # 2 layers, hidden 64: ~0.1M params
    "small": [
        "model=tiny",
        "model.hidden_size=256",
        "model.intermediate_size=768",
        "model.num_layers=4",
        "model.num_heads=8",
        "model.num_kv_heads=4",
    ],  # ~3.3M params
}


def run(model: str, processes: int, threads: int, steps: int, global_batch: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = [
            *MODELS[model],
            f"trainer.max_steps={steps}",
            "+trainer.limit_val_batches=0",
            "test=false",
            "export=false",
            "task.limit=2000",
            "callbacks.progress_bar=null",
            "callbacks.model_checkpoint=null",
            "callbacks.early_stopping=null",
            "~logger",
            "callbacks.lr_monitor=null",
            "precision='32'",
            "trainer.accelerator=cpu",
            f"hydra.run.dir={out}",
        ]
        args += [f"runtime.threads={threads}", f"batch_size={global_batch // processes}"]
        if processes > 1:
            args += ["trainer=ddp", f"trainer.devices={processes}"]
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "llm_lightning.train", *args],
            cwd=conf_dir().parent,  # the repository, where `make train` runs
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        metrics = json.loads((Path(out) / "metrics.json").read_text())
        return {
            "tokens_per_s": metrics["train/tokens_per_s"],
            "fit_s": metrics["train/seconds"],
            "wall_s": time.perf_counter() - started,
            "load": os.getloadavg()[0],
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=16)
    args = parser.parse_args()
    print(
        f"| model | processes x threads | tokens/s (median of {args.rounds}) | runs | "
        f"fit s (incl. start-up) | 1-min load avg | speed-up vs 1 x 1 | DDP efficiency |"
    )
    print("|---|---|---|---|---|---|---|---|")
    setups = ((1, 1), (1, 2), (2, 1))  # (processes, threads per process)
    for model in args.models:
        results: dict[tuple[int, int], list[dict]] = {s: [] for s in setups}
        for _ in range(args.rounds):
            for processes, threads in setups:
                results[processes, threads].append(
                    run(model, processes, threads, args.steps, args.global_batch)
                )
        base = statistics.median(r["tokens_per_s"] for r in results[1, 1])
        for processes, threads in setups:
            rs = results[processes, threads]
            tps = statistics.median(r["tokens_per_s"] for r in rs)
            speedup = tps / base
            # DDP efficiency: the speed-up over one single-thread process, per process
            efficiency = speedup / processes
            each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)
            loads = ", ".join(f"{r['load']:.1f}" for r in rs)
            fit = statistics.median(r["fit_s"] for r in rs)
            eff = "" if processes == 1 else f"{efficiency:.0%}"
            print(
                f"| {model} | {processes} x {threads} | {tps:.0f} | {each} | {fit:.1f} | {loads} | "
                f"{speedup:.2f} | {eff} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
