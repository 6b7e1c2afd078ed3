"""The runtimes users deploy on, side by side with ours, on one model: build each with its own tools,
then accuracy (paired with the first), batch-16 throughput in turns and batch-1 latency.

    flock /tmp/heavy.lock python benchmarks/runtimes.py outputs/sentiment/<run>/model \\
        --also torch_int8=outputs/sentiment/<run>/quantized --out outputs/runtimes/<run>

Builds, from MODEL_DIR (a `model/` folder): ONNX Runtime fp32 and int8 (`quantize_dynamic`, and
`quantize_static` calibrated on training texts), OpenVINO fp32 (f32 hint), bf16 (its precision hint:
bf16 only where the CPU has it) and int8 (`nncf.quantize`, ModelType.TRANSFORMER, SmoothQuant), with
llm_lightning.runtimes (the `quantize=` exports). `--also NAME=PATH` adds saved models (e.g. the
project's `quantized/` folder). Then benchmarks/compare.py's measurement: every model scored on all
test texts and compared text by text with MODEL_DIR (paired bootstrap, McNemar), tokens/s timed in
turns batch by batch, padded per batch, split order and sorted by length; plus the median batch-1
latency (p50/p95 over `--latency-texts` texts) and each build's seconds and size on disk.
`--padding-free torch_fp32 torch_int8` adds those torch models packed into unpadded rows
(`NAME+padding_free`): the project's own batching against each runtime's padded batches, which is
best against best, not like for like. Current figures: docs/BENCHMARKS.md, "Runtimes".
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from compare import ORDERS, in_turns, load_all, print_table
from harness import int8_rates
from omegaconf import OmegaConf

from llm_lightning.data import load_task
from llm_lightning.data.provenance import check_split, read_provenance
from llm_lightning.measure.bench import (
    SETTLE_S,
    BenchSettings,
    cpu_name,
    measure,
    size_on_disk_mb,
    turn_batches,
)
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.fused_projections import fuse_projections
from llm_lightning.runtime import conf_dir
from llm_lightning.runtimes.build import export_runtime

# name -> (quantize= choice, its settings). Each peer's row is its own documented interface, padded
# input_ids + attention_mask; the `_packed` rows are the same exports taking packed rows
# (quantize.inputs=packed, the default of our exports): the project's batching inside their graphs.
PEER = {"inputs": "padded"}
BUILDS = {
    "ort_fp32": ("onnx", PEER),
    "ort_int8_dynamic": ("onnx_int8", {**PEER, "onnx_mode": "dynamic"}),
    "ort_int8_static": ("onnx_int8", {**PEER, "onnx_mode": "static", "calibration_texts": 300}),
    "ov_fp32": ("openvino", PEER),
    "ov_bf16": ("openvino_bf16", PEER),
    "ov_int8": ("openvino_int8", {**PEER, "calibration_texts": 300}),
    "ort_int8_dynamic_packed": ("onnx_int8", {"inputs": "packed", "onnx_mode": "dynamic"}),
    "ov_bf16_packed": ("openvino_bf16", {"inputs": "packed"}),
    "ov_int8_packed": ("openvino_int8", {"inputs": "packed", "calibration_texts": 300}),
    # quantize=onnx_int8 as shipped: SmoothQuant folded into the weights before ORT's quantize_dynamic,
    # its alpha chosen on the validation split (the other ORT rows are ORT's quantizer alone)
    "ort_int8_packed_auto": (
        "onnx_int8",
        {"inputs": "packed", "onnx_mode": "dynamic", "smooth_quant_alpha": "auto", "calibration_texts": 300},
    ),
    # SmoothQuant's alpha chosen on the validation split (quantize.smooth_quant_alpha=auto); the
    # other int8 rows keep NNCF's own 0.95, the default of its documented call and of ours
    "ov_int8_packed_auto": (
        "openvino_int8",
        {"inputs": "packed", "calibration_texts": 300, "smooth_quant_alpha": "auto"},
    ),
    # q/k/v and gate/up stacked into one linear each before export (llm_lightning.quantization.fused_projections)
    "ov_int8_packed_fused": ("openvino_int8", {"inputs": "packed", "calibration_texts": 300, "fuse": True}),
    # without SmoothQuant (NNCF's alpha -1), what its SmoothQuant is worth
    "ov_int8_packed_nosq": (
        "openvino_int8",
        {"inputs": "packed", "calibration_texts": 300, "smooth_quant_alpha": -1},
    ),
    # NNCF's accuracy control on the validation split (quantize.max_changed_predictions) from
    # ov_int8_packed, ranking on 100 validation texts (quantize.ranking_texts): at NNCF's 300 its
    # ranking alone was ~78 minutes for the teacher on 2 cores (245 groups, 19 s each)
    "ov_int8_packed_ac": (
        "openvino_int8",
        {"inputs": "packed", "calibration_texts": 300, "max_changed_predictions": 0.01, "ranking_texts": 100},
    ),
}


def build_all(model_dir: Path, out: Path, names: list[str], data, max_length: int) -> dict[str, Path]:
    built = {}
    for name in names:
        choice, settings = BUILDS[name]
        model, tokenizer, _ = load_saved(model_dir)  # a fresh copy: exporters may change the module
        if settings.get("fuse"):
            fuse_projections(model)
        started = time.perf_counter()
        path = export_runtime(
            model,
            tokenizer,
            choice,
            out / name,
            data.train.texts,
            max_length,
            OmegaConf.create(settings),
            read_provenance(model_dir)[0],
            data.val.texts,
        )
        print(
            f"  built {name}: {time.perf_counter() - started:.0f} s, {size_on_disk_mb(path):.0f} MB",
            flush=True,
        )
        built[name] = path
    return built


def decoder_linear_params(model_dir: Path) -> int:
    """Weights of the decoder layers' linear maps: the int8 matmuls' share of a token's work."""
    model, *_ = load_saved(model_dir)
    return sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))


def matmul_share(models: dict, turns: dict, rates: list[dict[str, float]], n_linear: int) -> None:
    """Each int8 model's tok/s against the ceiling this CPU's int8 multiply allows it: the 2048^3
    int8 rate (`harness.int8_rates`: `torch._int_mm`, and oneDNN's packed linear where it is
    exact) over 2 x its decoder linear parameters (issue 21's "int8 matmul share"). The fastest
    of the reads is the ceiling: a read slowed by the machine would make every share look higher
    than it is, and so would `_int_mm` where it is a scalar loop (AVX2)."""
    rate = max(max(read.values()) for read in rates)
    ceiling = rate / (2 * n_linear)
    reads = "; ".join(f"{k} {', '.join(f'{r[k] / 1e9:,.0f}' for r in rates)}" for k in rates[0])
    print(
        f"\nint8 matmul share: 2048^3 int8 GOP/s, {reads} "
        f"(before the models, before and after the turns; the fastest, {rate / 1e9:,.0f}, is the ceiling), so {ceiling:,.0f} tok/s for "
        f"{n_linear / 1e6:.1f} M decoder linear weights"
    )
    print("| model | split order | of ceiling | sorted by length | of ceiling |\n|---|---|---|---|---|")
    for name in models:
        if "int8" in name:
            got = [statistics.median(turns[order][name]) for order in ORDERS]
            print(f"| {name} | " + " | ".join(f"{g:,.0f} | {g / ceiling:.0%}" for g in got) + " |")


WAYS = {  # how an OpenVINO folder's batches are run in throughput_hint
    "latency": "OpenVINO's default (LATENCY), one request a batch",
    "queue": "THROUGHPUT, AsyncInferQueue",
    "own": "the folder's classifier: rows cut over THROUGHPUT streams",
}


def throughput_hint(models: dict, texts: list[str], rounds: int, max_length: int) -> None:
    """Each OpenVINO folder three ways, timed pass by pass in turns (a pass: all `texts` in
    batches of 16), both orders: compiled as OpenVINO compiles by default (the LATENCY hint: one
    stream on all threads), one request a batch; compiled with OpenVINO's documented setting for
    throughput, PERFORMANCE_HINT=THROUGHPUT (as many streams as it picks, each on its share of the
    cores), its batches fed through an AsyncInferQueue, several batches in flight at once; and the
    folder's own classifier (llm_lightning.runtimes.openvino.load: each batch's rows cut over those
    streams, one batch at a time, as `predict` runs it). Packing a batch counts in its pass."""
    import openvino as ov

    runtimes = {n: m for n, (m, *_) in models.items() if getattr(m, "meta", {}).get("runtime") == "openvino"}
    if not runtimes:
        return
    tokenizer = next(iter(models.values()))[1]
    queues = {}
    for name, model in runtimes.items():
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
        if model.meta.get("inference_precision_hint"):
            config["INFERENCE_PRECISION_HINT"] = model.meta["inference_precision_hint"]
        file = str(model.path / model.meta["model"])
        compiled = ov.Core().compile_model(file, "CPU", {**config, "PERFORMANCE_HINT": "THROUGHPUT"})
        latency = ov.Core().compile_model(file, "CPU", {**config, "PERFORMANCE_HINT": "LATENCY"})
        queues[name] = (model, ov.AsyncInferQueue(compiled), compiled.get_property("NUM_STREAMS"), latency)
    print(
        f"\nOpenVINO folders run three ways, {rounds} rounds in turns pass by pass, batch 16, "
        f"{len(texts)} test texts; tok/s median (slowest-fastest round):"
    )
    print(
        "| model | run by | streams | in flight | split order | sorted by length |\n|---|---|---|---|---|---|"
    )
    rates = {(name, way): {} for name in queues for way in WAYS}
    for order in ORDERS:
        batches = turn_batches(tokenizer, texts, 16, max_length, by_length=order == ORDERS[1])
        tokens = sum(int(mask.sum()) for _, mask in batches)
        for round_ in range(rounds + 1):  # round 0 warms every shape up
            for name, (model, queue, _, latency) in queues.items():
                for way in WAYS:
                    time.sleep(SETTLE_S)  # the previous pass's spinning threads settle (bench.SETTLE_S)
                    started = time.perf_counter()
                    for ids, mask in batches:
                        if way == "latency":
                            latency(model.feed(ids, mask))
                        elif way == "queue":
                            queue.start_async(model.feed(ids, mask))
                        else:
                            model(ids, mask)
                    queue.wait_all()
                    if round_:
                        rates[name, way].setdefault(order, []).append(
                            tokens / (time.perf_counter() - started)
                        )
    for name, (_, queue, streams, _) in queues.items():
        for way, label in WAYS.items():
            cells = [
                f"{statistics.median(r):,.0f} ({min(r):,.0f}-{max(r):,.0f})"
                for r in (rates[name, way][o] for o in ORDERS)
            ]
            flight = len(queue) if way == "queue" else 1
            used = 1 if way == "latency" else streams
            print(f"| {name} | {label} | {used} | {flight} | " + " | ".join(cells) + " |", flush=True)


def latencies(models: dict, test, count: int, max_length: int) -> None:
    print(f"\nBatch-1 latency over the first {count} test texts (median of 3 runs per text):")
    print("| model | p50 ms | p95 ms |\n|---|---|---|")
    settings = BenchSettings(
        batch_sizes=(1,), throughput_texts=1, latency_texts=count, max_length=max_length, padding_free=False
    )
    for name, (model, tokenizer, *_) in models.items():
        row = measure(model, tokenizer, test.texts[:count], test.labels[:count], settings)
        print(f"| {name} | {row['latency_p50_ms']:.1f} | {row['latency_p95_ms']:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir", type=Path, help="a run's model/ folder: the fp32 baseline")
    parser.add_argument("--out", type=Path, default=Path("outputs/runtimes"))
    parser.add_argument("--only", nargs="*", choices=list(BUILDS), default=list(BUILDS))
    parser.add_argument("--also", nargs="*", default=[], help="NAME=PATH saved models to add")
    parser.add_argument(
        "--padding-free",
        nargs="*",
        default=[],
        metavar="NAME",
        help="torch models (torch_fp32, or --also names) measured packed too, as NAME+padding_free",
    )
    parser.add_argument("--texts", type=int, default=128, help="test texts per throughput pass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-texts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="the training run's seed: the same test split")
    parser.add_argument(
        "--allow-split-mismatch", action="store_true", help="score on splits other than training.json's"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    rates = [int8_rates()]  # before any model is built or loaded: the CPU's rate on its own
    task = OmegaConf.load(conf_dir() / "task" / "sentiment.yaml")
    data = load_task(task, args.seed)
    check_split(args.model_dir, task, args.seed, data, allow=args.allow_split_mismatch)
    print(
        f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; {len(data.test)} test texts",
        flush=True,
    )
    paths = {"torch_fp32": (args.model_dir, None)}
    paths |= {
        k: (p, None) for k, p in build_all(args.model_dir, args.out, args.only, data, task.max_length).items()
    }
    paths |= {name: (Path(path), None) for name, _, path in (spec.partition("=") for spec in args.also)}
    options = argparse.Namespace(padding_free=set(args.padding_free), texts=args.texts)
    models = load_all(paths, data.test, task.max_length, options)
    texts = list(data.test.texts[: args.texts])
    rates.append(int8_rates())
    turns = in_turns(models, texts, args.rounds, task.max_length)
    rates.append(int8_rates())
    print_table(models, turns, list(data.test.labels), args.rounds, len(texts))
    matmul_share(models, turns, rates, decoder_linear_params(args.model_dir))
    throughput_hint(models, texts, args.rounds, task.max_length)
    latencies(models, data.test, args.latency_texts, task.max_length)


if __name__ == "__main__":
    main()
