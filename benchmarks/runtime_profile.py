"""Where each runtime's time goes on the same int8 model, and how far ahead of a peer ours could get.

    flock /tmp/heavy.lock python benchmarks/runtime_profile.py \\
        ours=outputs/compress/sentiment/quantized \\
        openvino=outputs/compress/sentiment/deploy/openvino_int8 \\
        onnxruntime=outputs/compress/sentiment/deploy/onnx_int8

Each NAME=PATH is a folder `predict` takes, run as the stage report runs it: a torch folder compiled
as saved and packed into padding-free rows, a runtime folder fed its graph's own inputs. They are
timed in turns batch by batch (batch 16, the first `--texts` test texts, split order and sorted by
length, `--rounds` rounds), as deployed. Then each runs those batches once more under its runtime's
own profiler, and that pass's wall time is split into the int8 matmul kernels (with what each runtime
fuses into them: ORT's activation quantization, OpenVINO's and oneDNN's rescaling) and the rest:

  torch        torch.profiler: oneDNN's qlinear, or torch._int_mm (benchmarks/int8_profile.py)
  OpenVINO     its PERF_COUNT counters, on a second compile of the same IR: one request on all
               threads (the deployed folder cuts a batch over two one-thread streams; the same
               kernels and rows, so its int8 matmul time stands for theirs)
  ONNX Runtime its session profiling: MatMulInteger(ToFloat), DynamicQuantizeMatMul, QLinearMatMul

The bound: the first model with everything but its int8 matmuls taking no time at all would run at
most `peer's time / the first model's int8 matmul time` times as fast as the peer, on the same
batches: the peer's time in each round of the turns, over the first model's int8 matmul seconds in
its profiled passes (the median of `--profiles`; a profiler's own cost falls outside the kernels).
The split's milliseconds come from those passes, taken after the turns, so they need not add up to
the turns' time: on the teacher and the chain's student they read 12% less to 36% more. The last column is what the first model's rest (its work besides the int8 matmuls)
may take, at most, for `--target` times the peer's median speed; compare it with its rest now.
Issue 21 asks for 1.5x OpenVINO's best: a bound under 1.5 says no graph work can reach it with
these matmul kernels. Current figures: docs/BENCHMARKS.md, "Where the runtimes' time goes".
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from compare import ORDERS, load  # (benchmarks/compare.py)
from int8_profile import PARTS, split  # (benchmarks/int8_profile.py)
from omegaconf import OmegaConf
from torch.profiler import ProfilerActivity, profile

from llm_lightning.data import load_task
from llm_lightning.data.provenance import check_split
from llm_lightning.measure.bench import cpu_name, rates_in_turns, timed_pass, turn_batches
from llm_lightning.measure.padding_free import padding_free
from llm_lightning.runtime import conf_dir, user_errors
from llm_lightning.runtimes.folder import RuntimeClassifier

ORT_INT8 = {"MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm"}


def openvino_is_int8_matmul(node_type: str, exec_type: str) -> bool:
    """OpenVINO's CPU plugin names a layer's kernel by its input precision: `brgemm_avx512_I8`."""
    return node_type.startswith(("FullyConnected", "MatMul")) and exec_type.lower().endswith(("_i8", "_u8"))


def profile_torch(model, batches) -> tuple[float, float]:
    """(int8 matmul seconds, wall seconds) of one pass under torch.profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = timed_pass(model, batches)
    return split(prof, wall)[PARTS[0]], wall


def profile_openvino(model: RuntimeClassifier, batches) -> tuple[float, float]:
    """(int8 matmul seconds, wall seconds) of one pass of the folder's IR compiled again with
    counters on, as one request on all threads. OpenVINO's CPU counters are each node's mean over
    every inference the request has run, so a pass's seconds are the difference of mean x count."""
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERF_COUNT": True}
    config["PERFORMANCE_HINT"] = "LATENCY"  # one request: its counters are the whole batch's
    if model.meta.get("inference_precision_hint"):  # as llm_lightning.runtimes.openvino.load sets it
        config["INFERENCE_PRECISION_HINT"] = model.meta["inference_precision_hint"]
    request = (
        ov.Core().compile_model(str(model.path / model.meta["model"]), "CPU", config).create_infer_request()
    )
    fed = [model.feed(ids, mask) for ids, mask in batches]
    for inputs in fed:  # compiles each shape, warms up: untimed
        request.infer(inputs)
    before = len(fed) * int8_matmul_mean(request.profiling_info)
    wall = 0.0
    for inputs in fed:
        started = time.perf_counter()
        request.infer(inputs)
        wall += time.perf_counter() - started
    return 2 * len(fed) * int8_matmul_mean(request.profiling_info) - before, wall


def int8_matmul_mean(counters) -> float:
    """Seconds per inference in OpenVINO's int8 matmul nodes, by its counters."""
    return sum(
        c.real_time.total_seconds() for c in counters if openvino_is_int8_matmul(c.node_type, c.exec_type)
    )


def profile_onnxruntime(model: RuntimeClassifier, batches) -> tuple[float, float]:
    """(int8 matmul seconds, seconds in `model_run`) of one pass, from a profiled session's trace."""
    import onnxruntime as ort

    fed = [model.feed(ids, mask) for ids, mask in batches]
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(
            str(model.path / model.meta["model"]), options, providers=["CPUExecutionProvider"]
        )
        for inputs in fed * 2:  # a warm-up pass, then the profiled one
            session.run(None, inputs)
        trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("cat") == "Session" and e["name"] == "model_run"][-len(fed) :]
    start = runs[0]["ts"]  # the profiled pass: the last len(fed) runs
    matmuls = sum(
        e["dur"]
        for e in trace
        if e.get("cat") == "Node" and e["ts"] >= start and e.get("args", {}).get("op_name") in ORT_INT8
    )
    return matmuls / 1e6, sum(e["dur"] for e in runs) / 1e6


def profile_pass(model, batches) -> tuple[float, float]:
    """(int8 matmul seconds, wall seconds) of one pass over `batches`, by the model's runtime."""
    runtime = model.meta.get("runtime") if isinstance(model, RuntimeClassifier) else "torch"
    profiler = {"torch": profile_torch, "openvino": profile_openvino, "onnxruntime": profile_onnxruntime}
    with torch.inference_mode():
        return profiler[runtime](model, batches)


def as_deployed(path: Path):
    """(model, tokenizer) run as the stage report runs the folder."""
    model, tokenizer, _ = load(path)
    if not isinstance(model, RuntimeClassifier):
        model = padding_free(model, tokenizer.pad_token_id)
    return model.eval(), tokenizer


def report(name: str, first: str, rates: dict, profiled: dict, tokens: int, target: float) -> str:
    """One table row: tok/s in turns, the profiled passes' split, the bound on `first` against `name`,
    and what the first's work besides its int8 matmuls may take for `target` times `name`'s speed."""
    matmul_s, wall_s = profiled[name]
    ms = 1e6 / tokens  # seconds of a pass -> ms per 1,000 tokens
    if name == first or not profiled[first][0]:  # a first model with no int8 matmuls is not bounded
        bound = needed = "—"
    else:  # round by round: this model's time for the batches / the first's int8 matmul time
        bounds = [tokens / rate / profiled[first][0] for rate in rates[name]]
        bound = f"{statistics.median(bounds):.2f}x ({min(bounds):.2f}-{max(bounds):.2f}x)"
        left = tokens / statistics.median(rates[name]) / target - profiled[first][0]
        needed = f"{max(left, 0.0) * ms:.1f}"
    tok_s = f"{statistics.median(rates[name]):,.0f} ({min(rates[name]):,.0f}-{max(rates[name]):,.0f})"
    return (
        f"| {name} | {tok_s} | {matmul_s / wall_s:.0%} | {matmul_s * ms:.1f} | {(wall_s - matmul_s) * ms:.1f} "
        f"| {bound} | {needed} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("models", nargs="+", help="NAME=PATH; the first is the one bounded")
    parser.add_argument("--texts", type=int, default=128, help="test texts per pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--target", type=float, default=1.5, help="the speed-up over each peer asked for")
    parser.add_argument("--profiles", type=int, default=3, help="profiled passes per model (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="the training run's seed: the same test split")
    parser.add_argument(
        "--allow-split-mismatch",
        action="store_true",
        help="time models trained against other splits (as benchmarks/compare.py)",
    )
    args = parser.parse_args()
    paths = dict(spec.partition("=")[::2] for spec in args.models)
    if len(paths) < 2 or not all(name and Path(path).exists() for name, path in paths.items()):
        parser.error(f"{args.models}: expected two or more NAME=PATH, each an existing model folder")
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # as benchmarks/compare.py: several compiled models
    task = OmegaConf.load(conf_dir() / "task" / "sentiment.yaml")
    data = load_task(task, args.seed)
    for path in paths.values():  # every model on the texts it was trained against
        check_split(Path(path), task, args.seed, data, allow=args.allow_split_mismatch)
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}", flush=True)
    models, tokenizer = {}, None
    for name, path in paths.items():
        models[name], tokenizer = as_deployed(Path(path))
    texts, first = list(data.test.texts[: args.texts]), next(iter(paths))
    for order in ORDERS:
        batches = turn_batches(tokenizer, texts, 16, task.max_length, by_length=order == ORDERS[1])
        with torch.inference_mode():
            for model in models.values():  # compiles every batch shape, warms caches: untimed
                timed_pass(model, batches)
        rates = rates_in_turns(models, tokenizer, texts, 16, args.rounds, task.max_length, order == ORDERS[1])
        profiled = {}  # the median of `--profiles` passes' int8 matmul seconds, and of their wall seconds
        for name, model in models.items():
            passes = [profile_pass(model, batches) for _ in range(args.profiles)]
            profiled[name] = tuple(statistics.median(p[i] for p in passes) for i in (0, 1))
        tokens = sum(int(mask.sum()) for _, mask in batches)
        print(
            f"\n{order}, batch 16, {len(texts)} test texts ({tokens:,} real tokens), {args.rounds} rounds in turns"
        )
        print(
            "| model | tok/s in turns (rounds) | int8 matmuls, share of the profiled pass | "
            f"int8 matmuls, ms per 1,000 tokens | the rest, ms per 1,000 tokens | {first} at most, "
            "were all but its int8 matmuls free | "
            f"{first}'s rest for {args.target}x this, ms per 1,000 tokens |"
        )
        print("|---|---|---|---|---|---|---|")
        for name in models:
            print(report(name, first, rates, profiled, tokens, args.target))


if __name__ == "__main__":
    user_errors(main)()  # a split mismatch or a bad path: one line and exit 2
