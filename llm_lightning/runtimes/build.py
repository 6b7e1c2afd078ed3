"""`quantize=onnx_int8 | openvino_int8 | openvino_bf16` (and the fp32 exports): a torch classifier
in, a runtime folder out (llm_lightning.runtimes)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llm_lightning.runtimes import CHOICES, require
from llm_lightning.runtimes.inputs import ExportInputs, example_inputs

DEFAULTS = {"calibration_texts": 300, "onnx_mode": "dynamic", "smooth_quant_alpha": 0.95, "inputs": "packed"}


def export_runtime(
    model,
    tokenizer,
    choice: str,
    target: Path,
    train_texts,
    max_length: int,
    qcfg: DictConfig | None = None,
    training: dict | None = None,
) -> Path:
    """Export `model` for the runtime `choice` names into `target`, calibrating int8 on the first
    `calibration_texts` training texts."""
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
    if runtime == "onnxruntime":
        from llm_lightning.runtimes import onnx

        mode = qcfg.get("onnx_mode") or DEFAULTS["onnx_mode"]
        return onnx.save(model, tokenizer, target, precision, given, max_length, mode, training)
    from llm_lightning.runtimes import openvino

    alpha = float(qcfg.get("smooth_quant_alpha") or DEFAULTS["smooth_quant_alpha"])
    return openvino.save(model, tokenizer, target, precision, given, max_length, alpha, training)
