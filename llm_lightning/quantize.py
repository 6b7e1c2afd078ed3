"""Post-training quantization of an exported classifier, with torchao.

    python -m llm_lightning.quantize model_path=outputs/sentiment/<date>/<time>/model quantize=int8_dynamic
    python -m llm_lightning.train task=sentiment quantize=int8_dynamic     # after training, on model/

The quantized model is evaluated on the task's test split, benchmarked next to its fp32 input
(llm_lightning.bench), and saved to `<run>/quantized/` in the format of
`llm_lightning.quantized_dir`, which `evaluate` and `predict` load.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from llm_lightning.centering import center_activations
from llm_lightning.errors import MissingFileError, UnsupportedError, UserError
from llm_lightning.fused_projections import fuse_projections as fuse
from llm_lightning.quantized_dir import save_quantized
from llm_lightning.runtime import apply_runtime, run_entry, user_errors
from llm_lightning.smoothquant_search import AUTO, require_validation

log = logging.getLogger(__name__)

METHODS = ("none", "int8_dynamic", "int8_weight_only", "int4_weight_only")
ACTIVATIONS = ("symmetric", "asymmetric")  # int8_dynamic's per-token activation scales
ATTENTIONS = ("eager", "sdpa")  # quantize.attention: transformers' attention kernels on CPU


class QuantizationUnsupportedError(UnsupportedError):
    """The chosen quantization has no kernel on this platform."""


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"quantize.method={method!r} is not one of {METHODS} (config group `quantize=`).")


def torchao_config(method: str, group_size: int = 128, activations: str = "symmetric"):
    """The torchao `quantize_` config for a method (not `none`)."""
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        MappingType,
    )

    check_method(method)
    if method == "int8_dynamic":  # per-token int8 activations, per-row int8 weights: torch._int_mm
        # asymmetric here is torchao's zero point (quantize_model's zero_point="torchao"); the
        # default asymmetric path centres the tokens and asks for symmetric (llm_lightning.centering)
        mapping = MappingType.ASYMMETRIC if activations == "asymmetric" else MappingType.SYMMETRIC
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=mapping)
    if method == "int8_weight_only":  # int8 weights dequantized inside the fp32 matmul
        return Int8WeightOnlyConfig()
    if method == "int4_weight_only":
        # tile_packed_to_4d is torchao's tinygemm layout, the one int4 path with a non-GPU-library kernel.
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    raise UserError("quantize.method=none has no torchao config; there is nothing to quantize.")


def check_platform(method: str, device: str = "cpu", group_size: int = 128) -> None:
    """Quantize a small probe layer first, so an unsupported choice fails at once with advice,
    not halfway into a model with a torchao assertion."""
    from torchao.quantization import quantize_

    if method == "none":
        return
    dtype = torch.bfloat16 if method == "int4_weight_only" else torch.float32
    probe = nn.Sequential(nn.Linear(group_size, group_size)).to(device=device, dtype=dtype)
    try:
        quantize_(probe, torchao_config(method, group_size))
        with torch.inference_mode():
            probe(torch.randn(2, group_size, device=device, dtype=dtype))
    except (ImportError, NotImplementedError, AssertionError, RuntimeError) as e:
        import torchao

        raise QuantizationUnsupportedError(
            f"quantize.method={method!r} cannot run on this platform ({device}, torch {torch.__version__}, "
            f"torchao {torchao.__version__}): {type(e).__name__}: {str(e).strip()[:200]}. "
            + (
                "torchao's int4 weight-only kernels need CUDA (tinygemm) or the mslk GPU library. "
                if method == "int4_weight_only"
                else ""
            )
            + "On a CPU use quantize=int8_dynamic (int8 activations and weights; fastest here) "
            "or quantize=int8_weight_only."
        ) from e


def linear_names(model: nn.Module) -> list[str]:
    """Qualified names of the model's `nn.Linear` layers, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def skipped_linears(model: nn.Module, skip: Sequence[str] = ()) -> set[str]:
    """The linear layers that `skip` (fnmatch patterns on qualified names) keeps in float.

    A pattern that matches no linear layer is an error: a typo would otherwise quantize the
    layer it meant to protect, and the accuracy loss would look like quantization's fault.
    """
    names = linear_names(model)
    unmatched = [p for p in skip if not fnmatch.filter(names, p)]
    if unmatched:
        shown = names[:8] + (["..."] + names[-2:] if len(names) > 10 else names[8:])
        raise UserError(
            f"quantize.skip: pattern(s) {unmatched} match no linear layer of this model "
            f"({len(names)} linear layers: {', '.join(shown)}). Patterns are fnmatch globs on "
            "these names, e.g. '*.down_proj', 'model.layers.0.*', 'score'."
        )
    return {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in skip)}


def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int = 128,
    skip: Sequence[str] = (),
    smoothquant_alpha: float | None = None,
    calibration: Sequence[torch.Tensor] = (),
    activations: str = "symmetric",
    zero_point: str = "centering",
    fuse_projections: bool = False,
) -> nn.Module:
    """Quantize the model's linear layers in place and return it in eval mode.

    Args:
        skip: fnmatch patterns of linear layers kept in float (see `skipped_linears`); embeddings
            are never quantized.
        smoothquant_alpha: int8_dynamic only; None: off. SmoothQuant (torchao.prototype.smoothquant):
            per input channel j, s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), measured on
            `calibration`; the weight's column j is multiplied by s_j and the activation divided by
            it at run time, so an outlier channel no longer sets every token's int8 scale.
        calibration: input_ids tensors, each (1, seq_len), run one at a time (no padding) to
            measure max|x_j|; needed with smoothquant_alpha.
        activations: int8_dynamic only; "symmetric" or "asymmetric" per-token activation scales.
        zero_point: how asymmetric activations are done: "centering" (llm_lightning.centering:
            torchao's symmetric kernel on centred tokens, as fast as symmetric) or "torchao" (its
            own zero point, which re-sums the weights every call; kept for benchmarks).
        fuse_projections: first stack each Llama layer's q/k/v and gate/up into one linear layer
            each (llm_lightning.fused_projections), so they share one input quantization, one
            SmoothQuant divisor and one wider matmul. Groups with a `skip` layer stay unfused.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.quant_api import _is_linear  # torchao's default filter

    check_method(method)
    model.eval()
    if method == "none":
        return model
    check_smoothquant(method, smoothquant_alpha, len(calibration))
    if smoothquant_alpha == AUTO:
        raise ValueError(
            "quantize_model needs a number for smoothquant_alpha; 'auto' is resolved on the validation "
            "split by quantize_with_config (python -m llm_lightning.quantize, the compress chain)."
        )
    check_activations(method, activations)
    keep = skipped_linears(model, list(skip))
    device = next(model.parameters()).device.type
    check_platform(method, device, group_size)
    if method == "int4_weight_only":
        model.to(torch.bfloat16)  # tinygemm packs bf16 weights
    if keep:
        log.info("quantize.skip keeps %d linear layers in float: %s", len(keep), sorted(keep))
    if fuse_projections:
        fuse(model, keep)
    if zero_point not in ("centering", "torchao"):
        raise UserError(f"zero_point={zero_point!r} is not one of ('centering', 'torchao').")
    centre = activations == "asymmetric" and zero_point == "centering"
    if centre:
        activations = "symmetric"  # torchao quantizes the centred tokens symmetrically

    def chosen(module: nn.Module, name: str) -> bool:
        return _is_linear(module) and name not in keep

    if smoothquant_alpha is None:
        quantize_(model, torchao_config(method, group_size, activations), filter_fn=chosen)
        return _centred(model) if centre else model
    from torchao.prototype.smoothquant import SmoothQuantConfig

    def smoothquant(step: str) -> SmoothQuantConfig:
        # running abs-max observers: texts of any length, O(channels) memory
        base = torchao_config(method, group_size, activations)
        return SmoothQuantConfig(base, step, alpha=float(smoothquant_alpha), use_running_absmax=True)

    quantize_(model, smoothquant("prepare"), filter_fn=chosen)
    with torch.inference_mode():
        for ids in calibration:
            model(input_ids=ids.to(device))
    quantize_(model, smoothquant("convert"), filter_fn=chosen)
    return _centred(model) if centre else model


def _centred(model: nn.Module) -> nn.Module:
    center_activations(model)
    return model


def check_smoothquant(method: str, alpha: float | str | None, calibration_texts: int) -> None:
    if alpha is None:
        return
    problems = []
    if method != "int8_dynamic":
        problems.append(
            f"quantize.smoothquant_alpha={alpha} needs quantize=int8_dynamic (it evens out the "
            f"activations that int8_dynamic quantizes); quantize.method is {method!r}: set it to null"
        )
    if alpha != AUTO and not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        problems.append(
            f"quantize.smoothquant_alpha={alpha!r} must be in [0, 1] (0.5 is SmoothQuant's usual), "
            f"{AUTO!r} (picked on the validation split) or null (off)"
        )
    if calibration_texts < 1:
        problems.append(
            f"SmoothQuant needs calibration texts, got {calibration_texts} "
            "(quantize.calibration_texts >= 1, and a non-empty training split)"
        )
    if problems:
        raise UserError("; ".join(problems) + ".")


def check_activations(method: str, activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise UserError(f"quantize.activations={activations!r} is not one of {ACTIVATIONS}.")
    if activations == "asymmetric" and method != "int8_dynamic":
        raise UserError(
            f"quantize.activations='asymmetric' needs quantize=int8_dynamic (the only choice that "
            f"quantizes activations); quantize.method is {method!r}: set it to symmetric."
        )


def check_settings(qcfg: DictConfig, data=None) -> None:
    """Every check of a `quantize=` config that needs no model: the method, that this platform
    runs it, SmoothQuant, activations, attention; with the task's `data`, that SmoothQuant has
    calibration texts and `auto` a validation split. Run before anything is trained or measured."""
    check_method(qcfg.method)
    if qcfg.method == "none":
        return
    check_platform(qcfg.method, "cpu", qcfg.get("group_size", 128))
    alpha = qcfg.get("smoothquant_alpha")
    texts = int(qcfg.get("calibration_texts", 64))
    check_smoothquant(qcfg.method, alpha, texts if data is None else (len(data.train) and texts))
    check_activations(qcfg.method, qcfg.get("activations", "symmetric"))
    check_attention(qcfg.get("attention"))
    if data is not None and alpha == AUTO and qcfg.method == "int8_dynamic":
        require_validation(len(data.val))


def check_attention(attention: str | None) -> None:
    if attention is not None and attention not in ATTENTIONS:
        raise UserError(
            f"quantize.attention={attention!r} is not one of {ATTENTIONS}, or null to keep the "
            "attention kernel the model was loaded with."
        )


def set_attention(model: nn.Module, attention: str | None) -> None:
    """Give the model the attention kernel `quantize.attention` names (None: leave it).

    An exported `model/` folder loads with transformers' default, SDPA, whatever kernel it was
    trained with (config.json does not keep it). For the short texts this is measured on, eager
    attention compiles into two small matmuls around one fused softmax and ran the compiled int8
    teacher 1.02-1.17x faster than SDPA in two runs (docs/BENCHMARKS.md, "Eager attention for the
    compiled int8 model"); quantization.json records the choice, and the loader builds the model with it."""
    check_attention(attention)
    if attention is not None and getattr(model.config, "_attn_implementation", None) != attention:
        model.set_attn_implementation(attention)


def calibration_inputs(tokenizer, texts: Sequence[str], n: int, max_length: int) -> list[torch.Tensor]:
    """The first `n` texts as (1, seq_len) input_ids tensors, for `quantize_model(calibration=...)`."""
    rows = tokenizer(list(texts[:n]), truncation=True, max_length=max_length)["input_ids"]
    return [torch.tensor([row]) for row in rows]


def quantize_with_config(
    model: nn.Module, tokenizer, qcfg: DictConfig, data, max_length: int, zero_point: str = "centering"
) -> nn.Module:
    """`quantize_model` with a `quantize=` config; SmoothQuant calibrates on the training split
    (never the test texts it is then evaluated on). `smoothquant_alpha: auto` is resolved on the
    validation split (llm_lightning.smoothquant_search) and the chosen number written back into
    `qcfg`, so that `saved_settings(qcfg)` records it."""
    set_attention(model, qcfg.get("attention"))  # before auto: candidates are judged as they will run
    alpha = qcfg.get("smoothquant_alpha")
    calibration = []
    if alpha is not None and qcfg.method == "int8_dynamic":
        calibration = calibration_inputs(
            tokenizer, data.train.texts, int(qcfg.get("calibration_texts", 64)), max_length
        )
    settings = saved_settings(qcfg)

    def quantize(each: nn.Module, alpha: float | None) -> nn.Module:
        return quantize_model(
            each,
            qcfg.method,
            qcfg.get("group_size", 128),
            calibration=calibration,
            fuse_projections=bool(qcfg.get("fuse_projections", False)),
            zero_point=zero_point,
            **{**settings, "smoothquant_alpha": alpha},
        )

    if alpha == AUTO and qcfg.method == "int8_dynamic":
        from llm_lightning.smoothquant_search import DEFAULT_CANDIDATES, choose_alpha

        rows = tokenizer(list(data.val.texts), truncation=True, max_length=max_length)["input_ids"]
        candidates = qcfg.get("smoothquant_candidates") or DEFAULT_CANDIDATES
        alpha, _ = choose_alpha(model, quantize, rows, tokenizer.pad_token_id, candidates)
        qcfg.smoothquant_alpha = alpha
    return quantize(model, alpha)


def saved_settings(qcfg: DictConfig) -> dict:
    """The accuracy settings of a `quantize=` config, as `save_quantized` keyword arguments."""
    return {
        "skip": list(qcfg.get("skip") or []),
        "smoothquant_alpha": qcfg.get("smoothquant_alpha"),
        "activations": qcfg.get("activations", "symmetric"),
    }


def quantize_run(cfg: DictConfig, out: Path, model_dir: Path | None = None) -> dict:
    """Quantize `model_dir` (default `<out>/model`), save `<out>/quantized/`, evaluate and benchmark
    both on the test split, and write the per-stage report. Returns `quantize/...` metrics."""
    from llm_lightning.data import load_task
    from llm_lightning.data.provenance import check_split, read_provenance
    from llm_lightning.models.saved import load_saved
    from llm_lightning.stages import bench_settings, measure_stage, write_report

    out = Path(out)
    qcfg = cfg.quantize
    check_method(qcfg.method)
    if qcfg.method == "none":
        raise UserError(
            f"quantize.method='none' leaves nothing to quantize; choose one of {METHODS[1:]} "
            "(config group `quantize=`)."
        )
    model_dir = Path(model_dir) if model_dir is not None else out / "model"
    if not (model_dir / "config.json").exists():
        raise MissingFileError(
            f"quantize: no exported model at {model_dir} (set export=true, or pass "
            "model_path=<a run's model/ folder>)."
        )
    data = load_task(cfg.task, cfg.seed)
    check_split(model_dir, cfg.task, cfg.seed, data, allow=bool(cfg.get("allow_split_mismatch")))
    check_settings(qcfg, data)
    settings = bench_settings(cfg)
    model, tokenizer, _ = load_saved(model_dir)
    skipped_linears(
        model, list(qcfg.get("skip") or [])
    )  # a bad pattern fails now, not after the fp32 benchmark
    rows = [measure_stage("fp32", model, tokenizer, data, cfg, model_dir, settings, compile=False)]
    quantized = quantize_with_config(model, tokenizer, qcfg, data, cfg.task.max_length)
    target = save_quantized(
        quantized,
        tokenizer,
        out / "quantized",
        qcfg.method,
        qcfg.compile,
        **saved_settings(qcfg),
        training=read_provenance(model_dir)[0],
    )
    name = qcfg.method + ("+compile" if qcfg.compile else "")
    rows.append(
        measure_stage(
            name,
            quantized,
            tokenizer,
            data,
            cfg,
            target,
            settings,
            compile=bool(qcfg.compile),
            input_stage="fp32",
        )
    )
    write_report(rows, out, cfg, require_speedup=bool(qcfg.get("require_speedup", False)))
    final = rows[-1]
    return {f"quantize/{k}": v for k, v in final.items() if isinstance(v, float)}


@hydra.main(version_base="1.3", config_path="../conf", config_name="quantize_model")
@user_errors
def main(cfg: DictConfig) -> None:
    apply_runtime(cfg.runtime)
    metrics = quantize_run(cfg, Path(cfg.output_dir), Path(cfg.model_path).expanduser())
    print(json.dumps(metrics, indent=2, sort_keys=True), flush=True)


if __name__ == "__main__":
    run_entry(main)
