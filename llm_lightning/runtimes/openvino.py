"""OpenVINO: `openvino.convert_model` from the torch model, int8 with NNCF, bf16 as OpenVINO's own
inference-precision hint (the IR stays fp32; the CPU plugin computes in bf16 where the CPU can).

`openvino_int8` is `nncf.quantize` with `ModelType.TRANSFORMER` (its transformer preset: SmoothQuant
on the MatMuls, alpha `smooth_quant_alpha`), calibrated on training texts, never the test split.
`smooth_quant_alpha: auto` quantizes once per candidate alpha and keeps the graph whose validation
predictions differ least from the fp32 model's (`choose_alpha`), as `quantize=int8_dynamic` picks
its own SmoothQuant alpha (llm_lightning.quantization.smoothquant).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llm_lightning.data.agreement import AUTO
from llm_lightning.runtimes.accuracy_control import ACCURACY_CONTROL_HINT, accuracy_controlled
from llm_lightning.runtimes.folder import RuntimeClassifier, tokenizer_of, write_folder
from llm_lightning.runtimes.inputs import ExportInputs, graph, one_text, split_rows

log = logging.getLogger(__name__)

MODEL_FILE = "model.xml"
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": None}  # None: OpenVINO's default for the CPU
TIP = """
For many texts, OpenVINO's throughput setting is faster: compile with
`{"PERFORMANCE_HINT": "THROUGHPUT"}` and keep one request per stream busy (`ov.AsyncInferQueue`),
or cut each batch's rows into one piece per stream and run the pieces at once, as llm_lightning
does (for its int8 exports on 2 cores, 1.08-1.26x one request a batch in its benchmarks/runtimes.py).
"""


@dataclass(frozen=True)
class NncfChoices:
    """What NNCF's int8 is made with: SmoothQuant's alpha (a number, or `auto` with the candidates),
    the share of validation predictions it may change (`max_changed`, None: no accuracy control),
    the tokenized validation texts that `auto` and the accuracy control judge on, and how many of
    them the accuracy control ranks quantizers on (`ranking_texts`)."""

    alpha: float | str
    candidates: tuple[float, ...] = ()
    rows: tuple[list[int], ...] = ()
    max_changed: float | None = None
    ranking_texts: int = 300


def convert(model: nn.Module, given: ExportInputs):
    import openvino as ov

    with torch.no_grad():
        converted = ov.convert_model(graph(model, given.inputs), example_input=given.example)
    # a named output, as the ONNX export has: NNCF's accuracy control reads outputs by name
    converted.outputs[0].get_tensor().set_names({"logits"})
    return converted


def nncf_args(given: ExportInputs, pad_id: int, smooth_quant_alpha: float) -> tuple[dict, object]:
    """(keyword arguments, advanced parameters) of the documented `nncf.quantize` call for a
    transformer: calibrated on every calibration text, SmoothQuant on the MatMuls."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
    )

    args = {
        "calibration_dataset": nncf.Dataset(
            given.calibration, lambda row: one_text(row, given.inputs, pad_id)
        ),
        "model_type": nncf.ModelType.TRANSFORMER,
        "subset_size": len(given.calibration),
    }
    return args, AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=smooth_quant_alpha)
    )


def quantize(ov_model, given: ExportInputs, pad_id: int, smooth_quant_alpha: float):
    import nncf

    args, advanced = nncf_args(given, pad_id, smooth_quant_alpha)
    return nncf.quantize(ov_model, advanced_parameters=advanced, **args)


def choose_alpha(
    model: nn.Module, converted, given: ExportInputs, pad_id: int, alphas: NncfChoices, reference
):
    """(alpha, NNCF's int8 graph with it, one agreement row per candidate): the candidate whose int8
    graph changes fewest of the fp32 `model`'s predictions (`reference`, its logits) on the
    validation rows (ties: the smallest mean change of the logit margin), as
    llm_lightning.quantization.smoothquant judges."""
    import openvino as ov

    from llm_lightning.data.agreement import agreement, closeness, logits

    log.info("quantize.smooth_quant_alpha=auto: NNCF with each of %s", list(alphas.candidates))
    core, config, best, results = ov.Core(), {"INFERENCE_NUM_THREADS": torch.get_num_threads()}, None, []
    for i, alpha in enumerate(alphas.candidates, 1):
        int8 = quantize(converted.clone(), given, pad_id, float(alpha))  # each from the same fp32 graph
        run = runner(core, as_saved(int8), config, given.inputs)
        scored = RuntimeClassifier(
            None, {"inputs": given.inputs, "pad_token_id": pad_id}, run, 0, model.config
        )
        results.append({"alpha": float(alpha), **agreement(logits(scored, alphas.rows, pad_id), reference)})
        log.info("NNCF SmoothQuant alpha %.2f (%d of %d): %s", alpha, i, len(alphas.candidates), results[-1])
        if best is None or closeness(results[-1]) < closeness(best[0]):
            best = (results[-1], int8)
    chosen, int8 = best
    log.info(
        "quantize.smooth_quant_alpha=auto chose %.2f on %d validation texts (%d predictions changed)",
        chosen["alpha"],
        len(alphas.rows),
        chosen["flips"],
    )
    return chosen["alpha"], int8, results


def _int8(model: nn.Module, converted, given: ExportInputs, pad_id: int, choices: NncfChoices):
    """(NNCF's int8 graph of the fp32 `converted`, what runtime.json records of its making)."""
    from llm_lightning.data.agreement import logits

    validated = choices.alpha == AUTO or choices.max_changed is not None
    if validated:
        log.info("NNCF int8: the fp32 model's logits on %d validation texts", len(choices.rows))
    reference = logits(model, choices.rows, pad_id) if validated else None
    alpha, int8, record = choices.alpha, None, {}
    if alpha == AUTO:
        alpha, int8, results = choose_alpha(model, converted, given, pad_id, choices, reference)
        # how it was chosen, for the report and a reviewer
        record["smooth_quant_choice"] = {"validation_texts": len(choices.rows), "candidates": results}
    record["smooth_quant_alpha"] = float(alpha)
    if choices.max_changed is not None:
        args = nncf_args(given, pad_id, float(alpha))
        int8, control = accuracy_controlled(
            converted,
            given,
            pad_id,
            args,
            choices.rows,
            reference,
            choices.max_changed,
            choices.ranking_texts,
        )
        record.update(max_changed_predictions=float(choices.max_changed), accuracy_control=control)
    elif int8 is None:
        int8 = quantize(converted, given, pad_id, float(alpha))
    return int8, record


def as_saved(ov_model):
    """`ov_model` as a folder's reader gets it, written and read back, to judge the graph that is
    shipped. OpenVINO's writer drops NNCF's run-time marks (its dequantization nodes), and where the
    CPU plugin computes the float parts in bf16 by default (AVX-512 BF16, AMX) they run otherwise
    without them: on the tiny model, int8 at alpha 0.3 moved the logits by at most 0.0099 in memory
    and 0.0088 written and read back, identical under the f32 hint (EPYC-512)."""
    import openvino as ov

    core = ov.Core()
    core.set_property({"ENABLE_MMAP": False})  # the file goes with the folder below
    with tempfile.TemporaryDirectory() as tmp:
        _write(ov_model, Path(tmp) / MODEL_FILE)
        return core.read_model(str(Path(tmp) / MODEL_FILE))


def _write(ov_model, file: Path) -> None:
    import openvino as ov

    ov.save_model(ov_model, str(file), compress_to_fp16=False)  # float weights stay fp32


def save(
    model,
    tokenizer,
    target: Path,
    precision: str,
    given: ExportInputs,
    max_length: int,
    choices: NncfChoices,
    training,
):
    """Write an OpenVINO folder (see llm_lightning.runtimes) for `precision` fp32, bf16 or int8;
    int8 with SmoothQuant's `choices.alpha` (or the candidate chosen on validation for `auto`), and
    with `choices.max_changed`, under NNCF's accuracy control (llm_lightning.runtimes.accuracy_control)."""
    import openvino as ov

    def write_model(tmp: Path) -> dict:
        """Writes the graph; returns what runtime.json records of how its int8 was made."""
        converted, record = convert(model, given), {"smooth_quant_alpha": None}
        if precision == "int8":
            converted, record = _int8(model, converted, given, tokenizer.pad_token_id, choices)
        _write(converted, tmp / MODEL_FILE)
        return record

    precision_hint = HINTS[precision]
    if precision == "int8" and choices.max_changed is not None:
        precision_hint = ACCURACY_CONTROL_HINT
    meta = {
        "runtime": "openvino",
        "precision": precision,
        "inference_precision_hint": precision_hint,
        "inputs": given.inputs,
        "model": MODEL_FILE,
        "max_length": int(max_length),
        "openvino": ov.__version__,
    }
    hint = f', config={{"INFERENCE_PRECISION_HINT": "{precision_hint}"}}' if precision_hint else ""
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
    count = sum(
        int(np.prod(list(op.get_output_shape(0))))
        for op in ov_model.get_ops()
        if op.get_type_name() == "Constant" and len(op.get_output_shape(0)) >= 1
    )
    run = runner(core, ov_model, config, meta.get("inputs", "padded"))
    return RuntimeClassifier(path, meta, run, count), tokenizer_of(path)


def runner(core, ov_model, config: dict, inputs: str) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """`run(fed) -> logits` of `ov_model`, batches cut over streams as `load` says."""
    compiled = {}

    def compiled_for(hint: str):
        if hint not in compiled:
            compiled[hint] = core.compile_model(ov_model, "CPU", {**config, "PERFORMANCE_HINT": hint})
        return compiled[hint]

    requests = []

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

    return run
