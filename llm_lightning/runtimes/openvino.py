"""OpenVINO: `openvino.convert_model` from the torch model, int8 with NNCF, bf16 as OpenVINO's own
inference-precision hint (the IR stays fp32; the CPU plugin computes in bf16 where the CPU can).

`openvino_int8` is `nncf.quantize` with `ModelType.TRANSFORMER` (its transformer preset: SmoothQuant
on the MatMuls, alpha `smooth_quant_alpha`), calibrated on training texts, never the test split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from llm_lightning.runtimes.folder import RuntimeClassifier, tokenizer_of, write_folder
from llm_lightning.runtimes.inputs import ExportInputs, graph, one_text

MODEL_FILE = "model.xml"
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": None}  # None: OpenVINO's default for the CPU


def convert(model: nn.Module, given: ExportInputs):
    import openvino as ov

    with torch.no_grad():
        return ov.convert_model(graph(model, given.inputs), example_input=given.example)


def quantize(ov_model, given: ExportInputs, pad_id: int, smooth_quant_alpha: float):
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    return nncf.quantize(
        ov_model,
        nncf.Dataset(given.calibration, lambda row: one_text(row, given.inputs, pad_id)),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(given.calibration),
        advanced_parameters=AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=smooth_quant_alpha)
        ),
    )


def save(
    model,
    tokenizer,
    target: Path,
    precision: str,
    given: ExportInputs,
    max_length: int,
    alpha: float,
    training,
):
    """Write an OpenVINO folder (see llm_lightning.runtimes) for `precision` fp32, bf16 or int8."""
    import openvino as ov

    def write_model(tmp: Path) -> None:
        converted = convert(model, given)
        if precision == "int8":
            converted = quantize(converted, given, tokenizer.pad_token_id, alpha)
        ov.save_model(converted, str(tmp / MODEL_FILE), compress_to_fp16=False)

    meta = {
        "runtime": "openvino",
        "precision": precision,
        "inference_precision_hint": HINTS[precision],
        "smooth_quant_alpha": alpha if precision == "int8" else None,
        "inputs": given.inputs,
        "model": MODEL_FILE,
        "max_length": int(max_length),
        "openvino": ov.__version__,
    }
    hint = f', config={{"INFERENCE_PRECISION_HINT": "{HINTS[precision]}"}}' if HINTS[precision] else ""
    readme = {
        "title": f"OpenVINO classifier ({precision})",
        "runtime": "openvino",
        "pip": "openvino",
        "import_line": "import openvino as ov",
        "load_line": f'compiled = ov.Core().compile_model(meta["model"], "CPU"{hint})',
        "run_line": "logits = compiled(inputs)[0]",
    }
    return write_folder(target, model, tokenizer, meta, write_model, readme, training)


def load(path: Path, meta: dict):
    """(classifier, tokenizer) of an OpenVINO folder, on torch's thread count (like for like)."""
    import openvino as ov

    core = ov.Core()
    ov_model = core.read_model(str(path / meta["model"]))
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if meta.get("inference_precision_hint"):
        config["INFERENCE_PRECISION_HINT"] = meta["inference_precision_hint"]
    compiled = core.compile_model(ov_model, "CPU", config)
    count = sum(
        int(np.prod(list(op.get_output_shape(0))))
        for op in ov_model.get_ops()
        if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) >= 1
    )

    def run(fed: dict[str, np.ndarray]) -> np.ndarray:
        return compiled(fed)[0]

    return RuntimeClassifier(path, meta, run, count), tokenizer_of(path)
