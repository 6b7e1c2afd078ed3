"""Quantizing a model with torchao: the method, SmoothQuant, which linears to skip, the attention kernel."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Collection, Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from llm_lightning.errors import UserError
from llm_lightning.quantization import smoothquant
from llm_lightning.quantization.centering import center_activations
from llm_lightning.quantization.fused_projections import fuse_projections as fuse
from llm_lightning.quantization.settings import (
    AUTO,
    DEFAULT_ACTIVATIONS,
    DEFAULT_CALIBRATION_TEXTS,
    DEFAULT_CANDIDATES,
    DEFAULT_GROUP_SIZE,
    FLOAT_METHODS,
    attention_problem,
    check_settings,
    saved_settings,
    settings_as_used,
    torchao_config,
)

log = logging.getLogger(__name__)


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
    group_size: int = DEFAULT_GROUP_SIZE,
    skip: Sequence[str] = (),
    smoothquant_alpha: float | None = None,
    calibration: Sequence[torch.Tensor] = (),
    activations: str = DEFAULT_ACTIVATIONS,
    fuse_projections: bool = False,
) -> nn.Module:
    """Quantize the model's linear layers in place and return it in eval mode.

    The arguments are checked as the `quantize=` config they stand for (check_settings), on the
    model's device, before the model is touched.

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
            Asymmetric tokens are centred around torchao's symmetric kernel
            (llm_lightning.quantization.centering): its precision at the speed of symmetric.
        fuse_projections: first stack each Llama layer's q/k/v and gate/up into one linear layer
            each (llm_lightning.quantization.fused_projections), so they share one input quantization, one
            SmoothQuant divisor and one wider matmul. Groups with a `skip` layer stay unfused.
    """
    first = next(model.parameters(), None)
    device = first.device.type if first is not None else "cpu"
    as_config = {
        "method": method,
        "group_size": group_size,
        "smoothquant_alpha": smoothquant_alpha,
        "skip": list(skip),
        "fuse_projections": fuse_projections,
    }
    check_settings(
        {**as_config, "calibration_texts": len(calibration), "activations": activations}, device=device
    )
    model.eval()
    if method == "none":
        return model
    if method in FLOAT_METHODS:
        return cast_bf16(model, device)
    if smoothquant_alpha == AUTO:
        raise ValueError(
            "quantize_model needs a number for smoothquant_alpha; 'auto' is resolved on the validation "
            "split by quantize_with_config (python -m llm_lightning.quantize, the compress chain)."
        )
    keep = skipped_linears(model, list(skip))
    if method == "int4_weight_only":
        model.to(torch.bfloat16)  # tinygemm packs bf16 weights
    if keep:
        log.info("quantize.skip keeps %d linear layers in float: %s", len(keep), sorted(keep))
    if fuse_projections:
        fuse(model, keep)
    # asymmetric: torchao quantizes the centred tokens symmetrically
    quantize_linears(model, torchao_config(method, group_size), keep, smoothquant_alpha, calibration)
    if activations == "asymmetric":
        center_activations(model)
    return model


def cast_bf16(model: nn.Module, device: str) -> nn.Module:
    """quantize=bf16: every weight cast to bfloat16 (half the memory of fp32). Fast where the CPU
    multiplies bf16 natively (AVX-512 BF16, AMX), which oneDNN uses through torch's matmuls;
    elsewhere it is emulated and slower than fp32, so that is said before anyone waits for it."""
    from llm_lightning.runtime import NATIVE_BF16, cpu_flags

    if device == "cpu" and not cpu_flags() & NATIVE_BF16:
        log.warning(
            "quantize=bf16: this CPU has no native bf16 (%s): the bf16 model will likely run slower "
            "than fp32 here; quantize=int8_dynamic is the fast choice on such CPUs.",
            "/".join(sorted(NATIVE_BF16)),
        )
    # rotary frequencies stay fp32, as from_pretrained(dtype=bf16) leaves them: in bf16 they would
    # shift every position's angle, and the saved folder would load into a different model
    rotary = {
        (module, name): getattr(module, name)
        for module in model.modules()
        for name in ("inv_freq", "original_inv_freq")
        if isinstance(getattr(module, name, None), torch.Tensor)
    }
    model.to(torch.bfloat16)
    for (module, name), frequencies in rotary.items():
        setattr(module, name, frequencies)
    return model


def quantize_linears(
    model: nn.Module,
    base,
    keep: Collection[str] = (),
    smoothquant_alpha: float | None = None,
    calibration: Sequence[torch.Tensor] = (),
) -> nn.Module:
    """torchao's `quantize_` with the torchao config `base` (e.g. `torchao_config(...)`) on every
    linear layer not named in `keep`, in place; with `smoothquant_alpha`, SmoothQuant around it,
    calibrated on `calibration` (see `quantize_model`). Checks nothing: `quantize_model` does."""
    from torchao.quantization import quantize_
    from torchao.quantization.quant_api import _is_linear  # torchao's default filter

    def chosen(module: nn.Module, name: str) -> bool:
        return _is_linear(module) and name not in keep

    if smoothquant_alpha is None:
        quantize_(model, base, filter_fn=chosen)
        return model
    from torchao.prototype.smoothquant import SmoothQuantConfig

    def step(name: str) -> SmoothQuantConfig:
        # running abs-max observers: texts of any length, O(channels) memory
        return SmoothQuantConfig(base, name, alpha=float(smoothquant_alpha), use_running_absmax=True)

    device = next(model.parameters()).device
    quantize_(model, step("prepare"), filter_fn=chosen)
    with torch.inference_mode():
        for ids in calibration:
            model(input_ids=ids.to(device))
    quantize_(model, step("convert"), filter_fn=chosen)
    return model


def set_attention(model: nn.Module, attention: str | None) -> None:
    """Give the model the attention kernel `quantize.attention` names (None: leave it).

    An exported `model/` folder loads with transformers' default, SDPA, whatever kernel it was
    trained with (config.json does not keep it). For the short texts this is measured on, eager
    attention compiles into two small matmuls around one fused softmax and ran the compiled int8
    teacher 1.02-1.17x faster than SDPA in two runs (docs/BENCHMARKS.md, "Eager attention for the
    compiled int8 model"); quantization.json records the choice, and the loader builds the model with it."""
    if problem := attention_problem(attention):
        raise UserError(problem)
    if attention is not None and getattr(model.config, "_attn_implementation", None) != attention:
        model.set_attn_implementation(attention)


def calibration_inputs(tokenizer, texts: Sequence[str], n: int, max_length: int) -> list[torch.Tensor]:
    """The first `n` texts as (1, seq_len) input_ids tensors, for `quantize_model(calibration=...)`."""
    rows = tokenizer(list(texts[:n]), truncation=True, max_length=max_length)["input_ids"]
    return [torch.tensor([row]) for row in rows]


def quantize_with_config(
    model: nn.Module, tokenizer, qcfg: DictConfig, data, max_length: int
) -> tuple[nn.Module, dict]:
    """`quantize_model` with a `quantize=` config checked by `check_settings`; SmoothQuant
    calibrates on the training split (never the test texts it is then evaluated on).

    Returns the quantized model and the settings it was made with (`settings_as_used`:
    `smoothquant_alpha: auto` replaced by the alpha `chosen_alpha` picked), for `save_quantized`
    and the report. `qcfg` is left as it is."""
    settings = saved_settings(qcfg)
    skipped_linears(model, settings["skip"])  # a bad pattern fails before `auto` tries its candidates
    set_attention(model, qcfg.get("attention"))  # before auto: candidates are judged as they will run
    calibration = []
    if settings["smoothquant_alpha"] is not None and qcfg.method == "int8_dynamic":
        texts = int(qcfg.get("calibration_texts", DEFAULT_CALIBRATION_TEXTS))
        calibration = calibration_inputs(tokenizer, data.train.texts, texts, max_length)

    def quantize(each: nn.Module, alpha: float | None) -> nn.Module:
        return quantize_model(
            each,
            qcfg.method,
            qcfg.get("group_size", DEFAULT_GROUP_SIZE),
            calibration=calibration,
            fuse_projections=bool(qcfg.get("fuse_projections", False)),
            **{**settings, "smoothquant_alpha": alpha},
        )

    alpha = chosen_alpha(model, tokenizer, qcfg, data, max_length, quantize)
    return quantize(model, alpha), settings_as_used(qcfg, alpha)


def chosen_alpha(
    model: nn.Module,
    tokenizer,
    qcfg: DictConfig,
    data,
    max_length: int,
    quantize: Callable[[nn.Module, float], nn.Module],
) -> float | str | None:
    """The config's `smoothquant_alpha`; for `auto` (int8_dynamic), the candidate whose
    `quantize(copy, alpha)` agrees best with `model` on the validation split
    (llm_lightning.quantization.smoothquant)."""
    alpha = qcfg.get("smoothquant_alpha")
    if alpha != AUTO or qcfg.method != "int8_dynamic":
        return alpha
    rows = tokenizer(list(data.val.texts), truncation=True, max_length=max_length)["input_ids"]
    candidates = qcfg.get("smoothquant_candidates") or DEFAULT_CANDIDATES
    return smoothquant.choose_alpha(model, quantize, rows, tokenizer.pad_token_id, candidates)[0]
