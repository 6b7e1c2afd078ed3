"""Every check of a `quantize=` config, in one place, before anything is trained or measured.

`check_settings` collects every problem of a config and raises one error that lists them all, one
a line (as litgpt's argument checks do), each naming the key, the value seen and the choices. The
library functions that take one of these values on its own (`set_attention`, `choose_alpha`,
`torchao_config`) word their errors with the same `*_problem` functions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from llm_lightning.data.agreement import AUTO
from llm_lightning.data.agreement import validation_problem as no_validation_texts
from llm_lightning.errors import UnsupportedError, UserError
from llm_lightning.quantization import onednn_int8
from llm_lightning.runtimes import CHOICES as RUNTIME_EXPORTS
from llm_lightning.runtimes import require as require_runtime
from llm_lightning.runtimes.build import SMOOTH_QUANT_OFF, SMOOTHED_EXPORTS
from llm_lightning.runtimes.inputs import INPUTS as GRAPH_INPUTS
from llm_lightning.runtimes.onnx import MODES as ONNX_MODES

TORCHAO_METHODS = ("int8_dynamic", "int8_weight_only", "int4_weight_only")
# a cast, no torchao: its quantized/ folder holds bf16 safetensors that transformers loads alone
FLOAT_METHODS = ("bf16",)
# torchao's methods give a quantized/ folder this package loads; the runtime exports
# (llm_lightning.runtimes) give a folder ONNX Runtime or OpenVINO loads on its own
METHODS = ("none", *TORCHAO_METHODS, *FLOAT_METHODS, *RUNTIME_EXPORTS)
ACTIVATIONS = ("symmetric", "asymmetric")  # int8_dynamic's per-token activation scales
ATTENTIONS = ("eager", "sdpa")  # quantize.attention: transformers' attention kernels on CPU
DEFAULT_CANDIDATES = (0.3, 0.4, 0.5, 0.6, 0.7)  # the alphas `auto` tries
# What a config that leaves a key out gets; conf/quantize/*.yaml spell each one out.
DEFAULT_GROUP_SIZE = 128  # int4: input features that share one weight scale (torchao's default)
DEFAULT_CALIBRATION_TEXTS = 64  # training texts that measure SmoothQuant's per-channel maxima
DEFAULT_ACTIVATIONS = "symmetric"


log = logging.getLogger(__name__)


class QuantizationUnsupportedError(UnsupportedError):
    """The chosen quantization has no kernel on this platform."""


def method_problem(method: object, require: bool = False) -> str | None:
    """`require`: the caller is about to quantize, so `none` is a problem too."""
    if method not in METHODS:
        return f"quantize.method={method!r} is not one of {METHODS} (config group `quantize=`)."
    if require and method == "none":
        return (
            f"quantize.method='none' leaves nothing to quantize; choose one of {METHODS[1:]} "
            "(config group `quantize=`)."
        )
    return None


def smoothquant_problems(method: str, alpha: object, calibration_texts: int) -> list[str]:
    if alpha is None:
        return []
    problems = []
    if method != "int8_dynamic":
        problems.append(
            f"quantize.smoothquant_alpha={alpha} needs quantize=int8_dynamic (it evens out the "
            f"activations that int8_dynamic quantizes); quantize.method is {method!r}: set it to null."
        )
    if alpha != AUTO and not (isinstance(alpha, int | float) and 0.0 <= float(alpha) <= 1.0):
        problems.append(
            f"quantize.smoothquant_alpha={alpha!r} must be in [0, 1] (0.5 is SmoothQuant's usual), "
            f"{AUTO!r} (picked on the validation split) or null (off)."
        )
    if calibration_texts < 1:
        problems.append(
            f"SmoothQuant needs calibration texts, got {calibration_texts} "
            "(quantize.calibration_texts >= 1, and a non-empty training split)."
        )
    return problems


def candidates_problem(candidates: Sequence, key: str = "smoothquant_candidates") -> str | None:
    """`auto`'s candidate alphas (torchao's `smoothquant_candidates`, NNCF's `smooth_quant_candidates`)."""
    numbers = all(isinstance(a, int | float) and not isinstance(a, bool) for a in candidates)
    if candidates and numbers and all(0.0 <= float(a) <= 1.0 for a in candidates):
        return None
    return f"quantize.{key}={list(candidates)}: give one or more alphas in [0, 1]."


def validation_problem(texts: int) -> str | None:
    """int8_dynamic's `smoothquant_alpha: auto` without validation texts."""
    return no_validation_texts(texts, "smoothquant_alpha", "alpha", "0.5 is usual")


def activations_problem(method: str, activations: object) -> str | None:
    if activations not in ACTIVATIONS:
        return f"quantize.activations={activations!r} is not one of {ACTIVATIONS}."
    if activations == "asymmetric" and method != "int8_dynamic":
        return (
            f"quantize.activations='asymmetric' needs quantize=int8_dynamic (the only choice that "
            f"quantizes activations); quantize.method is {method!r}: set it to symmetric."
        )
    return None


def attention_problem(attention: object) -> str | None:
    if attention is None or attention in ATTENTIONS:
        return None
    return (
        f"quantize.attention={attention!r} is not one of {ATTENTIONS}, or null to keep the "
        "attention kernel the model was loaded with."
    )


def torchao_config(method: str, group_size: int = DEFAULT_GROUP_SIZE, activations: str = DEFAULT_ACTIVATIONS):
    """The torchao `quantize_` config for a method (not `none`).

    `activations="asymmetric"` is torchao's own zero point, which re-sums the weights on every
    call; the package quantizes asymmetric tokens by centring them and asking for symmetric
    (llm_lightning.quantization.centering). Benchmarks and tests build the zero point from it to compare.
    """
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        MappingType,
    )

    if problem := method_problem(method):
        raise UserError(problem)
    if method == "int8_dynamic":  # per-token int8 activations, per-row int8 weights: torch._int_mm
        mapping = MappingType.ASYMMETRIC if activations == "asymmetric" else MappingType.SYMMETRIC
        return Int8DynamicActivationInt8WeightConfig(act_mapping_type=mapping)
    if method == "int8_weight_only":  # int8 weights dequantized inside the fp32 matmul
        return Int8WeightOnlyConfig()
    if method == "int4_weight_only":
        # tile_packed_to_4d is torchao's tinygemm layout, the one int4 path with a non-GPU-library kernel.
        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
    raise UserError("quantize.method=none has no torchao config; there is nothing to quantize.")


def _platform_problem(method: str, device: str, group_size: int) -> tuple[str, Exception] | None:
    """Quantize a small probe layer first, so an unsupported choice fails at once with advice,
    not halfway into a model with a torchao assertion. Reached from `check_settings` only."""
    from torchao.quantization import quantize_

    dtype = torch.bfloat16 if method == "int4_weight_only" else torch.float32
    probe = nn.Sequential(nn.Linear(group_size, group_size)).to(device=device, dtype=dtype)
    try:
        quantize_(probe, torchao_config(method, group_size))
        with torch.inference_mode():
            probe(torch.randn(2, group_size, device=device, dtype=dtype))
    except (ImportError, NotImplementedError, AssertionError, RuntimeError) as e:
        import torchao

        return (
            f"quantize.method={method!r} cannot run on this platform ({device}, torch {torch.__version__}, "
            f"torchao {torchao.__version__}): {type(e).__name__}: {str(e).strip()[:200]}. "
            + (
                "torchao's int4 weight-only kernels need CUDA (tinygemm) or the mslk GPU library. "
                if method == "int4_weight_only"
                else ""
            )
            + "On a CPU use quantize=int8_dynamic (int8 activations and weights; fastest here) "
            "or quantize=int8_weight_only.",
            e,
        )
    return None


def check_settings(qcfg: Mapping, data=None, *, device: str = "cpu", require_method: bool = False) -> None:
    """Every check of a `quantize=` config (or a dict of its keys) that needs no model: the method,
    that this platform runs it on `device`, SmoothQuant, activations, attention; with the task's
    `data`, that SmoothQuant has calibration texts and `auto` a validation split.

    Raises one UserError listing every problem, one a line; a QuantizationUnsupportedError (a
    UserError too) when the platform is among them. `require_method`: `none` is a problem as well.
    """
    method = qcfg.get("method")
    problems = [p for p in (method_problem(method, require_method),) if p]
    if problems or method == "none":  # every other key says how to quantize with the method
        _raise(problems)
        return
    if method in RUNTIME_EXPORTS:
        _raise(runtime_problems(qcfg, data))
        return
    if method in FLOAT_METHODS:
        _raise(float_problems(qcfg))
        return
    platform = _platform_problem(method, device, qcfg.get("group_size", DEFAULT_GROUP_SIZE))
    if platform:
        problems.append(platform[0])
    alpha = qcfg.get("smoothquant_alpha")
    texts = int(qcfg.get("calibration_texts", DEFAULT_CALIBRATION_TEXTS))
    problems += smoothquant_problems(method, alpha, texts if data is None else (len(data.train) and texts))
    activations = qcfg.get("activations", DEFAULT_ACTIVATIONS)
    problems += [activations_problem(method, activations)]
    problems += [attention_problem(qcfg.get("attention"))]
    if method == "int8_dynamic" and activations == "symmetric" and device == "cpu":
        _warn_if_int_mm_is_slow()
    if alpha == AUTO and method == "int8_dynamic":
        problems += [candidates_problem(qcfg.get("smoothquant_candidates") or DEFAULT_CANDIDATES)]
        problems += [validation_problem(len(data.val))] if data is not None else []
    _raise([p for p in problems if p], platform[1] if platform else None)


def float_problems(qcfg: Mapping) -> list[str]:
    """quantize=bf16: a cast of every weight, so the int8 keys that pick layers or scales are errors."""
    method = qcfg.get("method")
    problems = [attention_problem(qcfg.get("attention"))]
    if qcfg.get("skip"):
        problems.append(
            f"quantize.skip={list(qcfg.get('skip'))}: {method} casts the whole model (a layer kept in "
            "fp32 would need its inputs cast back on every call); set quantize.skip=[]."
        )
    # worded as for the other non-int8_dynamic methods; a cast needs no calibration texts
    problems += smoothquant_problems(method, qcfg.get("smoothquant_alpha"), DEFAULT_CALIBRATION_TEXTS)
    if qcfg.get("fuse_projections"):
        problems.append(
            f"quantize.fuse_projections=true is for the torchao int8 methods; {method} saves a plain "
            "transformers folder, which keeps q/k/v and gate/up apart: set it to false."
        )
    return [p for p in problems if p]


def runtime_problems(qcfg: Mapping, data=None) -> list[str]:
    """A runtime export's settings: its packages installed, its graph's inputs, the ONNX mode,
    calibration texts."""
    problems = []
    try:
        require_runtime(qcfg.get("method"))
    except UserError as err:
        problems.append(str(err))
    mode = qcfg.get("onnx_mode")
    if mode is not None and mode not in ONNX_MODES:
        problems.append(f"quantize.onnx_mode={mode!r} is not one of {ONNX_MODES}.")
    inputs = qcfg.get("inputs")
    if inputs is not None and inputs not in GRAPH_INPUTS:
        problems.append(f"quantize.inputs={inputs!r} is not one of {GRAPH_INPUTS}.")
    int8 = RUNTIME_EXPORTS[qcfg.get("method")][1] == "int8"
    texts = qcfg.get("calibration_texts")
    if int8 and texts is not None and int(texts) < 1:
        problems.append(
            f"quantize.calibration_texts={texts} must be >= 1 (int8 calibrates on training texts)."
        )
    if int8 and data is not None and len(data.train) == 0:
        problems.append(
            "quantize: int8 calibrates on training texts, and the task's training split is empty."
        )
    return problems + smooth_quant_alpha_problems(qcfg, data) + nncf_control_problems(qcfg, data)


def smooth_quant_alpha_problems(qcfg: Mapping, data=None) -> list[str]:
    """openvino_int8's and onnx_int8's `smooth_quant_alpha` (a number in [0, 1], -1 or `auto`) and
    `auto`'s candidates."""
    from llm_lightning.runtimes.build import DEFAULT_ALPHA_CANDIDATES, validation_texts_problem

    alpha = qcfg.get("smooth_quant_alpha")
    if alpha is None:
        return []
    method = qcfg.get("method")
    if method not in SMOOTHED_EXPORTS:
        return [
            f"quantize.smooth_quant_alpha={alpha} is SmoothQuant's alpha for quantize=openvino_int8 "
            f"(NNCF's) or quantize=onnx_int8 (folded into the weights); quantize.method is {method!r}: "
            "leave it out."
        ]
    if alpha != AUTO:
        number = isinstance(alpha, int | float) and not isinstance(alpha, bool)
        if number and (0.0 <= float(alpha) <= 1.0 or float(alpha) == SMOOTH_QUANT_OFF):
            return []
        return [
            f"quantize.smooth_quant_alpha={alpha!r} must be in [0, 1] ({SMOOTHED_EXPORTS[method]}), "
            f"{SMOOTH_QUANT_OFF} (no SmoothQuant) or {AUTO!r} (picked on the validation split)."
        ]
    candidates = list(qcfg.get("smooth_quant_candidates") or DEFAULT_ALPHA_CANDIDATES)
    problems = [candidates_problem(candidates, "smooth_quant_candidates")]
    if data is not None:
        problems.append(validation_texts_problem(len(data.val)))
    return [p for p in problems if p]


def nncf_control_problems(qcfg: Mapping, data=None) -> list[str]:
    """openvino_int8's `max_changed_predictions`: null, or a share in (0, 1) of the validation
    predictions NNCF's accuracy control may change."""
    from llm_lightning.runtimes.build import validation_texts_problem

    bound = qcfg.get("max_changed_predictions")
    if bound is None:
        return []
    if wrong := _not_openvino_int8(qcfg, "max_changed_predictions", "NNCF's accuracy control"):
        return [wrong]
    number = isinstance(bound, int | float) and not isinstance(bound, bool)
    if not (number and 0.0 < float(bound) < 1.0):
        return [
            f"quantize.max_changed_predictions={bound!r} must be a share in (0, 1) of the validation "
            "predictions (0.01: at most 1 in 100 changed), or null for no accuracy control."
        ]
    problems = []
    ranking = qcfg.get("ranking_texts")
    if ranking is not None and (isinstance(ranking, bool) or not isinstance(ranking, int) or ranking < 1):
        problems.append(
            f"quantize.ranking_texts={ranking!r} must be a whole number >= 1: the validation texts NNCF "
            "ranks each group of quantizers on (300, its default; fewer is quicker and coarser)."
        )
    problem = (
        validation_texts_problem(len(data.val), "max_changed_predictions", bound)
        if data is not None
        else None
    )
    return problems + ([problem] if problem else [])


def _not_openvino_int8(qcfg: Mapping, key: str, what: str) -> str | None:
    """Why `quantize.<key>`, an NNCF setting, is out of place on another method."""
    method = qcfg.get("method")
    if method == "openvino_int8":
        return None
    return (
        f"quantize.{key}={qcfg.get(key)} is {what}, for quantize=openvino_int8; "
        f"quantize.method is {method!r}: leave it out."
    )


def _warn_if_int_mm_is_slow() -> None:
    """Symmetric activations go through torchao's own linear, so `torch._int_mm`, which on CPUs
    without VNNI (where oneDNN needs 7-bit codes) is a scalar loop: 40-90x slower than fp32 on AVX2
    (docs/QUANTIZATION.md, "int8 on CPUs without VNNI")."""
    if onednn_int8.activation_codes() == onednn_int8.UNSIGNED_7:
        log.warning(
            "quantize.activations=symmetric multiplies with torch._int_mm, which on this CPU (no VNNI) "
            "ran 40-90x slower than fp32; quantize.activations=asymmetric, the default, uses oneDNN's "
            "int8 linear with 7-bit activation codes (docs/QUANTIZATION.md#int8-on-cpus-without-vnni-avx2)."
        )


def _raise(problems: list[str], unsupported: Exception | None = None) -> None:
    if problems:
        error = QuantizationUnsupportedError if unsupported is not None else UserError
        raise error("\n".join(problems)) from unsupported


def compiles(qcfg: Mapping) -> bool:
    """torch.compile the made model before measuring it: as `quantize.compile` says, except a runtime
    folder (ONNX Runtime, OpenVINO), which its own runtime compiles."""
    return bool(qcfg.get("compile")) and qcfg.get("method") not in RUNTIME_EXPORTS


def saved_settings(qcfg: Mapping) -> dict:
    """The accuracy settings of a `quantize=` config (or of `settings_as_used`), as `save_quantized`
    keyword arguments."""
    return {
        "skip": list(qcfg.get("skip") or []),
        "smoothquant_alpha": qcfg.get("smoothquant_alpha"),
        "activations": qcfg.get("activations", DEFAULT_ACTIVATIONS),
    }


def settings_as_used(qcfg: Mapping, smoothquant_alpha: float | str | None) -> dict:
    """The `quantize=` config as a plain dict, with the SmoothQuant alpha the model was made with
    (`auto` replaced by the number it chose): what quantization.json and the report record.
    The config itself is left as it is."""
    used = OmegaConf.to_container(qcfg, resolve=True) if isinstance(qcfg, DictConfig) else dict(qcfg)
    if "smoothquant_alpha" in used or smoothquant_alpha is not None:
        used["smoothquant_alpha"] = smoothquant_alpha
    return used
