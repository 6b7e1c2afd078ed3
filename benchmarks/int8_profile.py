"""Where a compiled int8 model's time goes, and what that leaves of the int8 ceiling.

    flock /tmp/heavy.lock python benchmarks/int8_profile.py --model outputs/sentiment/<run>/model

Each variant (benchmarks/quantize.py's names and builds) runs batch-16 passes over the first
`--texts` test texts: first one that compiles (timed: the start-up a user waits for), then
`--passes` timed ones (the median is the throughput), then one under torch.profiler with
inductor's kernel profiling on. The profiled pass's wall time is split into

  int8 matmuls      oneDNN's qlinear (or torch._int_mm where oneDNN is missing)
  fused kernels     inductor's generated C++ kernels: norms, activation quantization, rescaling,
                    SiLU, rotary embeddings, softmax
  attention bmm     the two small matmuls of eager attention
  the rest          Python, dynamo's guards, the dispatcher, allocations: the wall time less the above

and the int8 ceiling (the 2048^3 int8 rate of the fastest kernel over 2 x linear parameters, as benchmarks/quantize.py
prints it) is set beside two bounds: the throughput if everything but the int8 matmuls took no
time, and the measured one. The profiler adds its own cost, so the split is read as shares.
With inductor's C++ wrapper (`+cpp_wrapper`) the wrapper calls ATen ops without the dispatcher's
profiling, so attention's matmuls land in "the rest" there.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from harness import int8_ceiling  # (benchmarks/harness.py)
from omegaconf import OmegaConf
from quantize import VARIANTS, build  # (benchmarks/quantize.py)
from torch.profiler import ProfilerActivity, profile

from llm_lightning.data import load_task
from llm_lightning.measure.bench import cpu_name, padded_batches, timed_pass
from llm_lightning.runtime import conf_dir

DEFAULT = (
    "int8_dynamic+compile+config+padding_free",
    "int8_dynamic+compile+config+decoder_graph+padding_free",
)
PARTS = ("int8 matmuls", "fused kernels", "attention bmm", "the rest")


def part(name: str) -> str | None:
    if name in ("onednn::qlinear_pointwise", "aten::_int_mm"):
        return PARTS[0]
    if "cpp_fused" in name:  # inductor's kernels, named graph_<n>_cpp_fused_<ops>_<i> when profiled
        return PARTS[1]
    if name == "aten::bmm":
        return PARTS[2]
    return None


def split(prof, wall_s: float) -> dict[str, float]:
    """Seconds per part of one profiled pass; `the rest` is what the named parts leave of the wall time."""
    seconds = dict.fromkeys(PARTS, 0.0)
    for event in prof.key_averages():
        where = part(event.key)
        if where:
            seconds[where] += event.cpu_time_total / 1e6
    seconds[PARTS[3]] = max(wall_s - sum(seconds[p] for p in PARTS[:3]), 0.0)
    return seconds


def measure(model, rows: list[list[int]], pad_id: int, passes: int) -> dict:
    """Time the first pass (compiling), the median of `passes`, probe the int8 ceiling right after (not
    minutes apart), then profile one pass and split it."""
    batches = padded_batches(rows, 16, pad_id)
    tokens = sum(len(r) for r in rows)
    with torch.inference_mode():
        first = timed_pass(model, batches)
        wall = statistics.median(timed_pass(model, batches) for _ in range(passes))
        rate = int8_ceiling(repeats=3)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled = timed_pass(model, batches)
    return {
        "first_s": first,
        "tok_s": tokens / wall,
        "tokens": tokens,
        "rate": rate,
        "profiled_s": profiled,
        "seconds": split(prof, profiled),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="an exported model/ folder")
    parser.add_argument(
        "--variants", default=",".join(DEFAULT), help="comma-separated int8 names from benchmarks/quantize.py"
    )
    parser.add_argument("--texts", type=int, default=128)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--smoothquant-alpha", type=float, default=0.5, help="fixed: speed does not depend on it"
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    variants = args.variants.split(",")
    wrong = [v for v in variants if v not in VARIANTS or not v.startswith("int8_dynamic+compile")]
    if wrong:
        parser.error(f"--variants {wrong}: choose compiled int8 variants from {VARIANTS}")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # each variant's layers need their own graphs (quantize.py)
    torch._inductor.config.cpp.enable_kernel_profile = True  # each generated kernel shows in the profile
    task = OmegaConf.load(conf_dir() / "task" / "sentiment.yaml")
    data = load_task(task, args.seed)
    qcfg = OmegaConf.load(conf_dir() / "quantize" / "int8_dynamic.yaml")
    qcfg.smoothquant_alpha = args.smoothquant_alpha
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            model, _, tokenizer, n_linear = build(variant, args.model, Path(tmp), qcfg, data, task.max_length)
            rows = tokenizer(list(data.test.texts[: args.texts]), truncation=True, max_length=task.max_length)
            result = measure(model, rows["input_ids"], tokenizer.pad_token_id, args.passes)
            result.update(variant=variant, ceiling=result["rate"] / (2 * n_linear))
            results.append(result)
            print(
                f"  {variant}: first pass {result['first_s']:.0f} s, {result['tok_s']:,.0f} tok/s", flush=True
            )
            del model
    print(f"\n{args.texts} test texts at batch 16; shares of one profiled pass")
    print(
        "| variant | first pass | tok/s | of ceiling | "
        + " | ".join(PARTS)
        + " | int8 matmuls alone: of ceiling |"
    )
    print("|---|---|---|---|" + "---|" * len(PARTS) + "---|")
    for r in results:
        seconds, wall = r["seconds"], r["profiled_s"]
        shares = " | ".join(f"{seconds[p] / wall:.0%}" for p in PARTS)
        alone = r["tokens"] / seconds[PARTS[0]] / r["ceiling"] if seconds[PARTS[0]] else float("nan")
        print(
            f"| {r['variant']} | {r['first_s']:.0f} s | {r['tok_s']:,.0f} | {r['tok_s'] / r['ceiling']:.0%} "
            f"| {shares} | {alone:.0%} |"
        )
    probes = ", ".join(f"{r['rate'] / 1e9:,.0f} GOP/s ({r['ceiling']:,.0f} tok/s)" for r in results)
    print(f"\nceiling: the 2048^3 int8 rate (fastest kernel) probed after each variant's passes: {probes}")


if __name__ == "__main__":
    main()
