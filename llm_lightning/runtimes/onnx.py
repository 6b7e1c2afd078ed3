"""ONNX Runtime: export with `torch.onnx.export(dynamo=True)`, int8 with ORT's own quantizer.

`onnx_int8` uses `quantize_dynamic` (int8 weights per output channel, activations quantized per
batch at run time), ONNX Runtime's recommendation for transformers: static (calibrated) scales fix
one activation range for every text, and a classifier's activations vary with length and content.
`onnx.mode: static` gives ORT's calibrated QDQ path for comparison (the runtimes benchmark).
`reduce_range` (7-bit weights) is on where the CPU lacks VNNI: ORT's u8s8 kernels can saturate there.

ORT's quantizers have no SmoothQuant of their own for `quantize_dynamic`, and a per-tensor
activation range lost 2-5 points (1.99-4.80) on the fine-tuned teacher. `smooth_quant_alpha` folds SmoothQuant
into the fp32 weights before export (llm_lightning.runtimes.folded_smoothing): the graph stays
ORT's plain one. `auto` exports and quantizes once per candidate and keeps the graph whose
validation predictions differ least from the fp32 model's, as `openvino_int8` and `int8_dynamic`
choose theirs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llm_lightning.data.agreement import AUTO
from llm_lightning.runtimes.folded_smoothing import fold_smoothquant, input_ranges
from llm_lightning.runtimes.folder import RuntimeClassifier, tokenizer_of, write_folder
from llm_lightning.runtimes.inputs import NAMES, ExportInputs, dynamic_shapes, graph, one_text

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
MODES = ("dynamic", "static")


@dataclass(frozen=True)
class Smoothing:
    """SmoothQuant folded in before ORT's quantizer: `alpha` a number, or `auto` with the candidates
    and the tokenized validation texts it judges them on."""

    alpha: float | str
    candidates: tuple[float, ...] = ()
    rows: tuple[list[int], ...] = ()


def _has_vnni() -> bool:
    from llm_lightning.runtime import cpu_flags

    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def export(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, inputs: str) -> None:
    """`model` traced by torch.export into one ONNX file, its `inputs` graph with every axis dynamic."""
    with torch.no_grad(), norms_as_onnx_runtime_fuses_them(model):
        program = torch.onnx.export(
            graph(model, inputs),
            example,
            input_names=list(NAMES[inputs]),
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes(inputs),
            dynamo=True,
        )
    program.save(str(path), external_data=False)


def _divided_rms_norm(self, hidden: torch.Tensor) -> torch.Tensor:
    dtype = hidden.dtype
    x = hidden.to(torch.float32)
    x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(dtype)


@contextlib.contextmanager
def norms_as_onnx_runtime_fuses_them(model: nn.Module) -> Iterator[None]:
    """Llama's RMSNorms written as `x / sqrt(mean(x^2) + eps) * w` while `model` is exported: the
    form ONNX Runtime fuses into one SimplifiedLayerNormalization kernel. transformers writes
    `x * rsqrt(...)`, which exports as Sqrt, Reciprocal and Mul and stays seven ops a norm (61 in
    the 30-layer teacher). The same function: the two differ by float rounding only."""
    norms = [
        m
        for m in model.modules()
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight")
    ]
    for norm in norms:
        norm.forward = types.MethodType(_divided_rms_norm, norm)
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward  # the class's forward again


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


def int8_graph(
    model: nn.Module, given: ExportInputs, mode: str, pad_id: int, alpha, file: Path, ranges=None
) -> None:
    """ORT's int8 graph of `model` in `file`, SmoothQuant folded in first for an `alpha` (not None),
    with the calibration texts' activation `ranges` if already measured."""
    if alpha is not None:
        model = fold_smoothquant(copy.deepcopy(model), given.calibration, float(alpha), ranges)
    with tempfile.TemporaryDirectory() as scratch:
        export(model, given.example, Path(scratch) / "fp32.onnx", given.inputs)
        quantize(
            Path(scratch) / "fp32.onnx", file, mode, _Calibration(given.calibration, given.inputs, pad_id)
        )


def choose_alpha(
    model: nn.Module, given: ExportInputs, mode: str, pad_id: int, smoothing: Smoothing, file: Path
):
    """Write to `file` the int8 graph of the candidate alpha whose validation predictions differ least
    from the fp32 `model`'s (ties: the smallest mean change of the logit margin); return what
    runtime.json records of the choice."""
    from llm_lightning.data.agreement import agreement, closeness, logits

    rows = list(smoothing.rows)
    log.info("quantize.smooth_quant_alpha=auto: the fp32 model's logits on %d validation texts", len(rows))
    reference, results = logits(model, rows, pad_id), []
    meta = {"inputs": given.inputs, "pad_token_id": pad_id}
    ranges = input_ranges(model, given.calibration)  # measured once: they do not depend on alpha
    with tempfile.TemporaryDirectory() as scratch:
        for i, alpha in enumerate(smoothing.candidates, 1):
            path = Path(scratch) / f"int8-{i}.onnx"
            int8_graph(model, given, mode, pad_id, alpha, path, ranges)
            scored = RuntimeClassifier(None, meta, _runner(path), 0, model.config)
            results.append({"alpha": float(alpha), **agreement(logits(scored, rows, pad_id), reference)})
            log.info(
                "SmoothQuant alpha %.2f (%d of %d): %s", alpha, i, len(smoothing.candidates), results[-1]
            )
        best = min(range(len(results)), key=lambda i: closeness(results[i]))
        shutil.copyfile(Path(scratch) / f"int8-{best + 1}.onnx", file)
    chosen = results[best]
    log.info(
        "quantize.smooth_quant_alpha=auto chose %.2f on %d validation texts (%d predictions changed)",
        chosen["alpha"],
        len(rows),
        chosen["flips"],
    )
    return {
        "smooth_quant_alpha": chosen["alpha"],
        "smooth_quant_choice": {"validation_texts": len(rows), "candidates": results},
    }


def save(
    model,
    tokenizer,
    target: Path,
    precision: str,
    given: ExportInputs,
    max_length: int,
    mode: str,
    training,
    smoothing: Smoothing | None = None,
):
    """Write an ONNX Runtime folder (see llm_lightning.runtimes) for `precision` fp32 or int8; int8
    with SmoothQuant folded in at `smoothing.alpha` (or the candidate chosen on validation for
    `auto`), or ORT's quantizer alone where `smoothing` is None."""
    import onnxruntime

    inputs, pad_id = given.inputs, tokenizer.pad_token_id

    def write_model(tmp: Path) -> dict:
        """Writes the graph; returns what runtime.json records of how its int8 was made."""
        if precision == "fp32":
            export(model, given.example, tmp / MODEL_FILE, inputs)
            return {}
        if smoothing is not None and smoothing.alpha == AUTO:
            return choose_alpha(model, given, mode, pad_id, smoothing, tmp / MODEL_FILE)
        alpha = None if smoothing is None else float(smoothing.alpha)
        int8_graph(model, given, mode, pad_id, alpha, tmp / MODEL_FILE)
        return {"smooth_quant_alpha": alpha}

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

    graph = onnx.load(str(path / meta["model"]), load_external_data=False).graph
    count = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return RuntimeClassifier(path, meta, _runner(path / meta["model"]), count), tokenizer_of(path)


def _runner(file: Path):
    """`run(fed) -> logits` of an ONNX file, on torch's thread count (like for like)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])

    def run(fed: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(None, fed)[0]

    return run
