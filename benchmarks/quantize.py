"""Quantization variants of one exported classifier, measured the same way (llm_lightning.bench).

    flock /tmp/heavy.lock python benchmarks/quantize.py --model outputs/sentiment/<run>/model
    python benchmarks/quantize.py --model <dir> --variants fp32,int8_dynamic --texts 64   # quicker

Variants: fp32 eager, fp32 + torch.compile, torchao int8 dynamic (eager and compiled) on every
linear layer, the same `+config`: with conf/quantize/int8_dynamic.yaml's accuracy settings
(`skip`, `smoothquant_alpha` calibrated on `calibration_texts` training texts, `activations`,
`fuse_projections`, `attention`; `--skip`, `--smoothquant-alpha` and `--activations` override
them; `+unfused` leaves q/k/v and gate/up as separate layers, `+sdpa` keeps SDPA attention),
torchao int8 weight-only, and the deprecated torch.ao.quantization.quantize_dynamic as a
comparison only. `fp32+eager_attention` runs the fp32 model with eager attention instead of the
SDPA an exported folder loads with. Batches are padded, as a model
gets them, except in `+padding_free` variants (llm_lightning.measure.padding_free packs them).
It also measures this CPU's matrix-multiply rates (2048^3: `torch.mm` in fp32; in int8 the faster of
`torch._int_mm` and oneDNN's packed linear, `harness.int8_rates`) and prints each variant's throughput as a fraction of the ceiling they allow: the rate
divided by 2 x (parameters in linear layers) operations per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import (  # (benchmarks/harness.py)
    compile_decoder,
    int8_ceiling,
    interleaved_with_probes,
    layer_matmul_rate,
    matmul_rate,
)
from omegaconf import OmegaConf
from torch import nn

from llm_lightning.data import load_task
from llm_lightning.measure.bench import (
    BenchSettings,
    cpu_name,
    measure,
    size_on_disk_mb,
)
from llm_lightning.measure.compiling import maybe_compile
from llm_lightning.measure.padding_free import padding_free
from llm_lightning.models.saved import load_saved
from llm_lightning.quantization.centering import CENTERED
from llm_lightning.quantization.saved import save_quantized
from llm_lightning.quantization.settings import saved_settings
from llm_lightning.quantization.torchao_path import quantize_model, quantize_with_config, set_attention
from llm_lightning.runtime import conf_dir

VARIANTS = (
    "fp32",
    "fp32+compile",
    "int8_dynamic",
    "int8_dynamic+compile",
    "int8_dynamic+config",
    "int8_dynamic+compile+config",
    "int8_dynamic+compile+config+torchao_zero_point",  # asymmetric by torchao's zero point, not centring
    "int8_dynamic+compile+config+torchao_linear",  # centred tokens through torchao's own int8 linear
    "int8_dynamic+compile+config+int_mm",  # centred, torch._int_mm on the plain weight (not oneDNN-packed)
    "int8_dynamic+compile+config+cpp_wrapper",  # inductor's C++ wrapper instead of its Python one
    "int8_dynamic+compile+config+decoder_graph",  # the decoder compiled as one graph, not per layer
    "int8_dynamic+compile+config+decoder_graph+cpp_wrapper",
    "int8_dynamic+compile+config+decoder_graph+padding_free",
    "int8_dynamic+compile+config+decoder_graph+cpp_wrapper+padding_free",
    "fp32+padding_free",  # batches packed into unpadded rows (llm_lightning.measure.padding_free)
    "fp32+eager_attention",  # an exported model/ loads with SDPA; this one runs eager attention
    "fp32+eager_attention+padding_free",
    "int8_dynamic+compile+config+padding_free",
    "int8_dynamic+compile+config+unfused",  # q/k/v and gate/up left as separate layers
    "int8_dynamic+compile+config+unfused+padding_free",
    "int8_dynamic+compile+config+sdpa",  # SDPA attention instead of the config's (eager)
    "int8_dynamic+compile+config+sdpa+padding_free",
    "int8_weight_only",
    "torch.ao_dynamic",
)


def linear_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def build(variant: str, model_dir: Path, work: Path, qcfg, data, max_length: int):
    """(model to measure, folder for its size on disk, linear parameters) for one variant; batches
    are padded unless the variant ends with `+padding_free`.

    `qcfg` (skip, smoothquant_alpha, calibration_texts) applies to the `+config` variants only."""
    if variant.endswith("+padding_free"):
        model, folder, tokenizer, n_linear = build(
            variant.removesuffix("+padding_free"), model_dir, work, qcfg, data, max_length
        )
        return padding_free(model, tokenizer.pad_token_id), folder, tokenizer, n_linear
    model, tokenizer, _ = load_saved(model_dir)
    model.eval()
    n_linear = linear_params(model)
    if variant.startswith("fp32"):
        set_attention(model, "eager" if "+eager_attention" in variant else None)
        return maybe_compile(model, variant.endswith("+compile")), model_dir, tokenizer, n_linear
    if variant == "torch.ao_dynamic":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated: measured here only as the comparison
            quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        folder = work / variant
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(quantized.state_dict(), folder / "weights.pt")
        return quantized, folder, tokenizer, n_linear
    method = variant.split("+")[0]
    if "+config" in variant:  # as `python -m llm_lightning.quantize` does it (alpha `auto`: on val)
        vcfg = OmegaConf.merge(qcfg, {"method": method})
        vcfg.fuse_projections = bool(qcfg.get("fuse_projections")) and "+unfused" not in variant
        if variant.endswith("+sdpa"):
            vcfg.attention = "sdpa"
        if variant.endswith("+torchao_zero_point"):
            quantized, used = torchao_zero_point(model, tokenizer, vcfg, data, max_length)
        else:
            quantized, used = quantize_with_config(model, tokenizer, vcfg, data, max_length)
        settings = saved_settings(used)
    else:
        settings = {"skip": [], "smoothquant_alpha": None, "activations": "symmetric"}
        quantized = quantize_model(model, method, **settings)
    folder = save_quantized(quantized, tokenizer, work / variant, method, **settings)
    for module in quantized.modules():
        if getattr(module, CENTERED, False) and variant.endswith("+torchao_linear"):
            module.forward = types.MethodType(_centred_through_torchao, module)
        if getattr(module, CENTERED, False) and variant.endswith("+int_mm"):
            module.packed_int8_weight = (
                None  # llm_lightning.quantization.centering falls back to torchao's _int_mm
            )
    options = {"cpp_wrapper": True} if variant.endswith("+cpp_wrapper") else None
    compiler = compile_decoder if "+decoder_graph" in variant else maybe_compile
    return compiler(quantized, "+compile" in variant, options), folder, tokenizer, n_linear


def torchao_zero_point(model: nn.Module, tokenizer, vcfg, data, max_length: int) -> tuple[nn.Module, dict]:
    """`quantize_with_config` with torchao's own zero point for asymmetric tokens instead of
    centring them (torchao re-sums the int8 weights on every call): the comparison the package no
    longer offers, built from its parts in the same order. Returns (model, settings as used)."""
    from llm_lightning.quantization.fused_projections import fuse_projections
    from llm_lightning.quantization.settings import settings_as_used, torchao_config
    from llm_lightning.quantization.torchao_path import (
        calibration_inputs,
        chosen_alpha,
        quantize_linears,
        skipped_linears,
    )

    keep = skipped_linears(model, list(vcfg.get("skip") or []))
    set_attention(model, vcfg.get("attention"))
    alpha = vcfg.get("smoothquant_alpha")
    texts = int(vcfg.calibration_texts)
    calibration = [] if alpha is None else calibration_inputs(tokenizer, data.train.texts, texts, max_length)
    base = torchao_config(vcfg.method, activations=vcfg.activations)  # asymmetric: torchao's zero point

    def quantize(each: nn.Module, alpha: float | None) -> nn.Module:
        if vcfg.get("fuse_projections"):
            fuse_projections(each.eval(), keep)
        return quantize_linears(each.eval(), base, keep, alpha, calibration)

    alpha = chosen_alpha(model, tokenizer, vcfg, data, max_length, quantize)
    return quantize(model, alpha), settings_as_used(vcfg, alpha)


def _centred_through_torchao(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """llm_lightning.quantization.centering's forward before it quantized by itself (commit 66258c2): torchao's
    symmetric int8 linear on the centred tokens, which reduces each token's range a second time."""
    scaled = x if self.act_pre_scale is None else x * self.act_pre_scale
    center = (scaled.amax(dim=-1, keepdim=True) + scaled.amin(dim=-1, keepdim=True)) / 2
    centred = scaled - center
    if self.act_pre_scale is not None:
        centred = centred / self.act_pre_scale
    return F.linear(centred, self.weight, self.bias) + center * self.weight_row_sums.to(x.dtype)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    """The arguments, and the variants they name (refused when unknown)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="an exported model/ folder")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--texts", type=int, default=128, help="test texts per throughput pass")
    parser.add_argument("--latency-texts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42, help="the training run's seed: the same test split")
    parser.add_argument("--test-limit", type=int, help="only the first N test texts (a speed-only run)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--skip", help="+config variants: comma-separated fnmatch patterns kept in float")
    parser.add_argument("--smoothquant-alpha", help="+config variants: a float, 'auto' or 'none'")
    parser.add_argument("--activations", choices=("symmetric", "asymmetric"), help="+config variants")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="then time all variants in turns, this many rounds (0: skip); keeps every model in memory",
    )
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {VARIANTS}")
    return args, variants


def quantize_config(args: argparse.Namespace):
    """conf/quantize/int8_dynamic.yaml with the `+config` variants' overrides from the arguments."""
    qcfg = OmegaConf.load(conf_dir() / "quantize" / "int8_dynamic.yaml")
    if args.skip is not None:
        qcfg.skip = [p for p in args.skip.split(",") if p]
    if args.smoothquant_alpha is not None:
        named = {"none": None, "auto": "auto"}
        alpha = args.smoothquant_alpha
        qcfg.smoothquant_alpha = named[alpha] if alpha in named else float(alpha)
    if args.activations:
        qcfg.activations = args.activations
    return qcfg


def main() -> None:
    args, variants = parse_args()
    qcfg = quantize_config(args)
    torch.set_num_threads(args.threads)
    # every compiled variant's decoder layers share one code object, and each variant (inductor
    # options, packed or plain weights) needs its own graphs: 8, torch's default, is too few here
    torch._dynamo.config.recompile_limit = 64
    task = OmegaConf.load(conf_dir() / "task" / "sentiment.yaml")
    data = load_task(task, args.seed)
    test = data.test
    if args.test_limit:
        test.texts, test.labels = test.texts[: args.test_limit], test.labels[: args.test_limit]
    settings = BenchSettings(
        throughput_texts=args.texts,
        latency_texts=args.latency_texts,
        repeats=args.repeats,
        max_length=task.max_length,
        padding_free=False,  # the +padding_free variants pack
    )
    rates = {"fp32": matmul_rate(torch.float32), "int8": int8_ceiling()}
    print(
        f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}; {len(test)} test texts; "
        f"+config: skip {list(qcfg.skip)}, smoothquant_alpha {qcfg.smoothquant_alpha} "
        f"({qcfg.calibration_texts} training texts), {qcfg.activations} activations",
        flush=True,
    )
    print(
        f"2048^3 matmul: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, int8 (fastest kernel) {rates['int8'] / 1e9:.0f} GOP/s",
        flush=True,
    )
    rows, kept = measure_variants(variants, args, qcfg, data, settings, rates, task.max_length)
    print_table(rows)
    turns = in_turns(kept, test.texts[: args.texts], args.rounds, task.max_length)
    if args.json:
        args.json.write_text(json.dumps({"rates": rates, "rows": rows, "in_turns": turns}, indent=2) + "\n")


def measure_variants(
    variants: list[str],
    args: argparse.Namespace,
    qcfg,
    data,
    settings: BenchSettings,
    rates: dict,
    max_length: int,
) -> tuple[list[dict], dict]:
    """One row per variant, built and measured one after another (on `data.test`), and the models
    kept for the turns (all of them unless `--rounds 0`)."""
    test = data.test
    rows, kept = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            started = time.perf_counter()
            model, folder, tokenizer, n_linear = build(variant, args.model, Path(tmp), qcfg, data, max_length)
            row = measure(model, tokenizer, test.texts, test.labels, settings, path=folder)
            ceiling = rates["int8" if variant.startswith(("int8_dynamic", "torch.ao")) else "fp32"] / (
                2 * n_linear
            )
            row.update(
                {
                    "variant": variant,
                    "ceiling_tokens_per_s": ceiling,
                    "of_ceiling": row["tokens_per_s_b16"] / ceiling,
                    "seconds": time.perf_counter() - started,
                    "size_mb": size_on_disk_mb(folder),
                }
            )
            rows.append(row)
            print(
                f"  {variant}: {row['tokens_per_s_b16']:,.0f} tok/s b16, acc {row['acc']:.4f} "
                f"({row['seconds']:.0f} s)",
                flush=True,
            )
            if args.rounds:
                kept[variant] = (model, tokenizer, n_linear)
            else:
                del model
    return rows, kept


def in_turns(kept: dict, texts: list[str], rounds: int, max_length: int) -> dict:
    """Batch-16 throughput of every kept variant timed in turns (`harness.interleaved_with_probes`), on
    the texts in split order and sorted by length; prints a table of ratios to the first variant.

    The 2048^3 `_int_mm` rate is probed in the same turns, so each int8 variant's share of the
    ceiling it allows (rate / (2 x linear parameters) tokens/s) compares speeds taken together,
    not minutes apart on a CPU whose speed drifts."""
    if not kept:
        return {}
    models = {name: model for name, (model, _, _) in kept.items()}
    tokenizer = next(iter(kept.values()))[1]
    turns = {}
    for order in ("split order", "by length"):
        rows = padded_rows(tokenizer, texts, 16, max_length, by_length=order == "by length")
        probes = {
            "int8 ceiling ops/s": lambda: int8_ceiling(repeats=3),
            "layer matmuls ops/s": layer_matmul_rate(next(iter(models.values())), rows),
        }
        turns[order] = interleaved_with_probes(
            models, tokenizer, texts, 16, rounds, max_length, order == "by length", probes
        )
        turns[order]["batch rows"] = rows
    first = next(iter(models))
    print(f"\nIn turns ({rounds} rounds, batch 16, {len(texts)} texts; median tok/s, ratio to {first}):")
    print(
        "| variant | split order | vs first | of int8 ceiling | sorted by length | vs first | of int8 ceiling |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name in models:
        cells = []
        for order in ("split order", "by length"):
            got = turns[order]
            ceiling = got["int8 ceiling ops/s"] / (2 * kept[name][2])
            share = f"{got[name] / ceiling:.0%}" if name.startswith("int8_dynamic") else "—"
            cells += [f"{got[name]:,.0f}", f"{got[name] / got[first]:.2f}x", share]
        print(f"| {name} | " + " | ".join(cells) + " |")
    for order in ("split order", "by length"):
        got = turns[order]
        print(
            f"int8 2048^3 (the fastest kernel) in turns ({order}): {got['int8 ceiling ops/s'] / 1e9:,.0f} GOP/s (median); one "
            f"decoder layer's int8 matmuls alone on {got['batch rows']} rows (a median batch, padded): "
            f"{got['layer matmuls ops/s'] / 1e9:,.0f} GOP/s, "
            f"{got['layer matmuls ops/s'] / got['int8 ceiling ops/s']:.0%} of it"
        )
    return turns


def padded_rows(tokenizer, texts: list[str], batch_size: int, max_length: int, by_length: bool) -> int:
    """Tokens in the median batch, padding included: the rows every matmul of a batch multiplies."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    if by_length:
        lengths.sort()
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    return int(statistics.median(len(b) * max(b) for b in batches))


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if r["variant"] == "fp32"), None)
    print(
        "\n| variant | tok/s b16 | texts/s b16 | tok/s b32 | p50 ms b1 | p95 ms b1 | vs fp32 | test acc | "
        "macro-F1 | disk MB | peak RSS MB | of int8/fp32 ceiling |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s_b16'] / base['tokens_per_s_b16']:.2f}x" if base else "—"
        print(
            f"| {r['variant']} | {r['tokens_per_s_b16']:,.0f} | {r['texts_per_s_b16']:,.1f} | "
            f"{r['tokens_per_s_b32']:,.0f} | {r['latency_p50_ms']:.1f} | {r['latency_p95_ms']:.1f} | {ratio} | "
            f"{r['acc']:.4f} | {r['f1_macro']:.4f} | {r['size_mb']:.1f} | {r['peak_rss_mb']:,.0f} | "
            f"{r['of_ceiling']:.0%} of {r['ceiling_tokens_per_s']:,.0f} |"
        )


if __name__ == "__main__":
    main()
