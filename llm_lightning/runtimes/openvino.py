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
from llm_lightning.runtimes.inputs import ExportInputs, graph, one_text, split_rows

MODEL_FILE = "model.xml"
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": None}  # None: OpenVINO's default for the CPU
TIP = """
For many texts, OpenVINO's throughput setting is faster: compile with
`{"PERFORMANCE_HINT": "THROUGHPUT"}` and keep one request per stream busy (`ov.AsyncInferQueue`),
or cut each batch's rows into one piece per stream and run the pieces at once, as llm_lightning
does (for its int8 exports on 2 cores, 1.08-1.26x one request a batch in its benchmarks/runtimes.py).
"""


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
        "tip": TIP,
    }
    return write_folder(target, model, tokenizer, meta, write_model, readme, training)


def load(path: Path, meta: dict):
    """(classifier, tokenizer) of an OpenVINO folder, on torch's thread count (like for like).

    A batch of several rows is cut into whole rows, one piece per stream of OpenVINO's THROUGHPUT
    hint (2 streams of one thread each on 2 cores), and the pieces run at once: 1.08-1.26x one
    request on all threads for the teacher's int8 exports (docs/BENCHMARKS.md "Runtimes"), level
    with OpenVINO's AsyncInferQueue, which needs several batches in flight.
    A one-row batch (one text) is one request on all threads (the LATENCY hint). Each is compiled
    when first needed, so a folder used one way holds one compiled model."""
    import openvino as ov

    core = ov.Core()
    ov_model = core.read_model(str(path / meta["model"]))
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if meta.get("inference_precision_hint"):
        config["INFERENCE_PRECISION_HINT"] = meta["inference_precision_hint"]
    compiled = {}

    def compiled_for(hint: str):
        if hint not in compiled:
            compiled[hint] = core.compile_model(ov_model, "CPU", {**config, "PERFORMANCE_HINT": hint})
        return compiled[hint]

    count = sum(
        int(np.prod(list(op.get_output_shape(0))))
        for op in ov_model.get_ops()
        if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) >= 1
    )
    inputs, requests = meta.get("inputs", "padded"), []

    def run(fed: dict[str, np.ndarray]) -> np.ndarray:
        if fed["input_ids"].shape[0] == 1:
            return compiled_for("LATENCY")(fed)[0]
        if not requests:
            streams = compiled_for("THROUGHPUT")
            requests.extend(
                streams.create_infer_request() for _ in range(streams.get_property("NUM_STREAMS"))
            )
        pieces = split_rows(fed, inputs, len(requests))
        for request, (piece, _) in zip(requests, pieces, strict=False):
            request.start_async(piece)
        texts = sum(len(rows) for _, rows in pieces)
        logits = None
        for request, (_, rows) in zip(requests, pieces, strict=False):
            request.wait()
            got = request.get_output_tensor(0).data
            if logits is None:
                logits = np.empty((texts, got.shape[1]), dtype=got.dtype)
            logits[rows] = got
        return logits

    return RuntimeClassifier(path, meta, run, count), tokenizer_of(path)
