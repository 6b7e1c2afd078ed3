"""ONNX Runtime: export with `torch.onnx.export(dynamo=True)`, int8 with ORT's own quantizer.

`onnx_int8` uses `quantize_dynamic` (int8 weights per output channel, activations quantized per
batch at run time), ONNX Runtime's recommendation for transformers: static (calibrated) scales fix
one activation range for every text, and a classifier's activations vary with length and content.
`onnx.mode: static` gives ORT's calibrated QDQ path for comparison (the runtimes benchmark).
`reduce_range` (7-bit weights) is on where the CPU lacks VNNI: ORT's u8s8 kernels can saturate there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llm_lightning.runtimes.folder import RuntimeClassifier, tokenizer_of, write_folder
from llm_lightning.runtimes.inputs import NAMES, ExportInputs, dynamic_shapes, graph, one_text

MODEL_FILE = "model.onnx"
MODES = ("dynamic", "static")


def _has_vnni() -> bool:
    from llm_lightning.runtime import cpu_flags

    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def export(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, inputs: str) -> None:
    """`model` traced by torch.export into one ONNX file, its `inputs` graph with every axis dynamic."""
    with torch.no_grad():
        program = torch.onnx.export(
            graph(model, inputs),
            example,
            input_names=list(NAMES[inputs]),
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes(inputs),
            dynamo=True,
        )
    program.save(str(path), external_data=False)


class _Calibration:
    """ORT's CalibrationDataReader protocol over token rows, one text per run."""

    def __init__(self, rows: list[list[int]], inputs: str, pad_id: int):
        self.rows, self.inputs, self.pad_id = iter(rows), inputs, pad_id

    def get_next(self) -> dict | None:
        row = next(self.rows, None)
        return None if row is None else one_text(row, self.inputs, self.pad_id)


def quantize(src: Path, dst: Path, mode: str, calibration: _Calibration) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in MODES:
        raise ValueError(f"onnx mode {mode!r} is not one of {MODES}")
    reduce = not _has_vnni()
    if mode == "dynamic":
        quantize_dynamic(src, dst, per_channel=True, reduce_range=reduce, weight_type=QuantType.QInt8)
        return
    quantize_static(
        src,
        dst,
        calibration,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=reduce,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
    )


def save(
    model, tokenizer, target: Path, precision: str, given: ExportInputs, max_length: int, mode: str, training
):
    """Write an ONNX Runtime folder (see llm_lightning.runtimes) for `precision` fp32 or int8."""
    import onnxruntime

    inputs = given.inputs

    def write_model(tmp: Path) -> None:
        if precision == "fp32":
            export(model, given.example, tmp / MODEL_FILE, inputs)
            return
        with tempfile.TemporaryDirectory() as scratch:
            export(model, given.example, Path(scratch) / "fp32.onnx", inputs)
            rows = _Calibration(given.calibration, inputs, tokenizer.pad_token_id)
            quantize(Path(scratch) / "fp32.onnx", tmp / MODEL_FILE, mode, rows)

    meta = {
        "runtime": "onnxruntime",
        "precision": precision,
        "mode": mode if precision == "int8" else None,
        "inputs": inputs,
        "model": MODEL_FILE,
        "max_length": int(max_length),
        "onnxruntime": onnxruntime.__version__,
    }
    readme = {
        "title": f"ONNX Runtime classifier ({precision})",
        "runtime": "onnxruntime",
        "pip": "onnxruntime",
        "import_line": "import onnxruntime as ort",
        "load_line": 'session = ort.InferenceSession(meta["model"], providers=["CPUExecutionProvider"])',
        "run_line": "logits = session.run(None, inputs)[0]",
    }
    return write_folder(target, model, tokenizer, meta, write_model, readme, training)


def load(path: Path, meta: dict):
    """(classifier, tokenizer) of an ONNX Runtime folder, on torch's thread count (like for like)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path / meta["model"]), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(path / meta["model"]), load_external_data=False).graph
    count = sum(int(np.prod(t.dims)) for t in graph.initializer)

    def run(fed: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(None, fed)[0]

    return RuntimeClassifier(path, meta, run, count), tokenizer_of(path)
