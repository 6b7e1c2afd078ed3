"""`quantize=onnx_int8 | openvino_int8 | openvino_bf16` (and the fp32 exports): a torch classifier
in, a runtime folder out (llm_lightning.runtimes)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llm_lightning.data.agreement import AUTO, validation_problem
from llm_lightning.errors import UserError
from llm_lightning.runtimes import CHOICES, require
from llm_lightning.runtimes.inputs import ExportInputs, example_inputs

SMOOTH_QUANT_OFF = -1  # smooth_quant_alpha without SmoothQuant (NNCF: a negative alpha)
# the exports with a `smooth_quant_alpha`, and the usual alpha of each
SMOOTHED_EXPORTS = {
    "openvino_int8": "0.95 is NNCF's for transformers",
    "onnx_int8": "0.5 is the SmoothQuant paper's",
}

# what a config that leaves a key out gets (conf/quantize/*.yaml spell each one out): 0.95 is NNCF's
# own alpha for a transformer's MatMuls, the shipped openvino_int8 config's too
DEFAULTS = {
    "calibration_texts": 300,
    "onnx_mode": "dynamic",
    "smooth_quant_alpha": 0.95,
    "inputs": "packed",
    "ranking_texts": 300,  # NNCF's ranking_subset_size
}
DEFAULT_ALPHA_CANDIDATES = (0.5, 0.65, 0.8, 0.95)  # what smooth_quant_alpha=auto tries


def export_runtime(
    model,
    tokenizer,
    choice: str,
    target: Path,
    train_texts,
    max_length: int,
    qcfg: DictConfig | None = None,
    training: dict | None = None,
    val_texts=(),
) -> Path:
    """Export `model` for the runtime `choice` names into `target`, calibrating int8 on the first
    `calibration_texts` training texts; `smooth_quant_alpha: auto` chooses on `val_texts`."""
    runtime = require(choice)
    precision = CHOICES[choice][1]
    qcfg = qcfg if qcfg is not None else OmegaConf.create({})
    n = int(qcfg.get("calibration_texts") or DEFAULTS["calibration_texts"])
    texts = list(train_texts[:n])
    calibration = (
        tokenizer(texts, truncation=True, max_length=max_length)["input_ids"] if precision == "int8" else []
    )
    inputs = qcfg.get("inputs") or DEFAULTS["inputs"]
    given = ExportInputs(inputs, example_inputs(tokenizer, texts, max_length, inputs), calibration)
    model = model.eval()
    # eager attention traces into plain matmuls and a softmax that both runtimes fuse; SDPA's mask
    # handling exports as extra graph and some converters do not map it
    if getattr(model.config, "_attn_implementation", None) != "eager":
        model.set_attn_implementation("eager")
    alpha = qcfg.get("smooth_quant_alpha")
    if runtime == "onnxruntime":
        from llm_lightning.runtimes import onnx

        mode = qcfg.get("onnx_mode") or DEFAULTS["onnx_mode"]
        smoothing = None  # ONNX Runtime's quantizer alone, as its docs run it
        if precision == "int8" and alpha is not None and alpha != SMOOTH_QUANT_OFF:
            smoothing = onnx.Smoothing(alpha)
            if alpha == AUTO:
                if problem := validation_texts_problem(len(val_texts)):
                    raise UserError(problem)
                candidates = tuple(qcfg.get("smooth_quant_candidates") or DEFAULT_ALPHA_CANDIDATES)
                rows = tokenizer(list(val_texts), truncation=True, max_length=max_length)["input_ids"]
                smoothing = onnx.Smoothing(alpha, candidates, tuple(rows))
        return onnx.save(model, tokenizer, target, precision, given, max_length, mode, training, smoothing)
    from llm_lightning.runtimes import openvino

    alpha = DEFAULTS["smooth_quant_alpha"] if alpha is None else alpha
    max_changed = qcfg.get("max_changed_predictions")
    choices = openvino.NncfChoices(alpha)
    if precision == "int8" and (alpha == AUTO or max_changed is not None):
        key = "smooth_quant_alpha" if alpha == AUTO else "max_changed_predictions"
        if problem := validation_texts_problem(len(val_texts), key, max_changed):
            raise UserError(problem)
        rows = tokenizer(list(val_texts), truncation=True, max_length=max_length)["input_ids"]
        candidates = tuple(qcfg.get("smooth_quant_candidates") or DEFAULT_ALPHA_CANDIDATES)
        ranking = int(qcfg.get("ranking_texts") or DEFAULTS["ranking_texts"])
        choices = openvino.NncfChoices(alpha, candidates, tuple(rows), max_changed, ranking)
    return openvino.save(model, tokenizer, target, precision, given, max_length, choices, training)


def validation_texts_problem(texts: int, key: str = "smooth_quant_alpha", value=None) -> str | None:
    """`smooth_quant_alpha: auto` (openvino_int8, onnx_int8), or openvino_int8's
    `max_changed_predictions`, without validation texts to judge on."""
    if key == "smooth_quant_alpha":
        return validation_problem(texts, key, "SmoothQuant's alpha", "0.95 is NNCF's, 0.5 the paper's")
    if texts >= 1:
        return None
    return (
        f"quantize.{key}={value} bounds the share of validation predictions NNCF's int8 may change, "
        f"and this task has no validation texts: leave quantize.{key} out (null)."
    )
