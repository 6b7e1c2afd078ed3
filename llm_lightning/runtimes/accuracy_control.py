"""`quantize.max_changed_predictions` for `openvino_int8`: NNCF's `quantize_with_accuracy_control`
on the validation split, so that the int8 graph changes at most that share of the fp32 model's
validation predictions.

NNCF quantizes as `nncf.quantize` does, scores the fp32 and int8 graphs with a validation function,
and while the drop is over `max_drop` ranks its groups of quantizers by how far each one's removal
moves the outputs on a subset of the texts (normalized MSE of the logits), then returns groups to
float, costliest first, re-scoring after each. With SmoothQuant on, a returned layer keeps its
int8 weights and computes in float from there (NNCF's `RestoreMode.ONLY_ACTIVATIONS`): NNCF 3.4's
full revert restores a layer's pre-SmoothQuant weights but keeps SmoothQuant's scale on its input,
which breaks the layer. Without SmoothQuant (`smooth_quant_alpha: -1`) a returned layer is all
float. The score here is agreement with the fp32 torch
model's predictions, the rule `smooth_quant_alpha: auto` chooses by: a bound on changed predictions
bounds the accuracy change both ways, where a bound on accuracy lets flips that cancel pass.
NNCF judges every graph under OpenVINO's f32 precision hint, so the folder records that hint and
runs under it, where a CPU's default (bf16 with AVX-512 BF16 or AMX) would change predictions NNCF
kept; on EPYC-512 that cost no speed (docs/QUANTIZATION.md, "Accuracy control").
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from llm_lightning.data.batching import pad
from llm_lightning.runtimes.inputs import ExportInputs, feed, one_text

log = logging.getLogger(__name__)

# NNCF judges each graph under OpenVINO's f32 hint (its OVPreparedModel), not the CPU's default
# (bf16 where it has AVX-512 BF16 or AMX): the folder is run as it was judged
ACCURACY_CONTROL_HINT = "f32"
BATCH = 16  # validation texts per request, packed as the folder runs them


def accuracy_controlled(
    ov_model,
    given: ExportInputs,
    pad_id: int,
    nncf_args: tuple,
    rows,
    reference: torch.Tensor,
    max_changed,
    ranking_texts: int,
):
    """(NNCF's int8 graph of the fp32 `ov_model`, the record for runtime.json) with at most
    `max_changed` (a share) of the validation `rows` predicted otherwise than by `reference`, the fp32
    torch model's logits on them. `nncf_args`: (keyword arguments, advanced parameters) of the plain
    `nncf.quantize` call (llm_lightning.runtimes.openvino.nncf_args). NNCF ranks each group of
    quantizers on `ranking_texts` of the rows (all of them if fewer): its time is about groups x
    (a compile + that many one-text requests)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    want = reference.argmax(-1).numpy()
    passes: list[float] = []  # the share kept, for each scoring of the whole validation split

    def score(compiled, items) -> tuple[float, list[list[np.ndarray]]]:
        index = [int(i) for i in items]
        got = []
        for start in range(0, len(index), BATCH):
            ids, mask = pad([rows[i] for i in index[start : start + BATCH]], pad_id)
            got.append(compiled(feed(ids.numpy(), mask.numpy(), given.inputs, pad_id))[0])
        logits = np.concatenate(got)
        kept = float((logits.argmax(-1) == want[index]).mean())
        if len(index) == len(rows):
            passes.append(kept)
            log.info(
                "NNCF accuracy control: %.2f%% of %d validation predictions kept", 100 * kept, len(index)
            )
        return kept, [[x] for x in logits]

    validation = nncf.Dataset(range(len(rows)), lambda i: one_text(rows[i], given.inputs, pad_id))
    log.info(
        "quantize.max_changed_predictions=%s: NNCF's quantize_with_accuracy_control on %d validation texts",
        max_changed,
        len(rows),
    )
    args, advanced = nncf_args
    restorer = AdvancedAccuracyRestorerParameters(
        ranking_subset_size=int(ranking_texts),
        restore_mode=restore_mode(advanced.smooth_quant_alphas.matmul),
    )
    int8 = nncf.quantize_with_accuracy_control(
        ov_model,
        validation_dataset=validation,
        validation_fn=score,
        max_drop=float(max_changed),
        advanced_quantization_parameters=advanced,
        advanced_accuracy_restorer_parameters=restorer,
        **args,
    )
    # NNCF scores the fp32 graph, then plain int8, then each step; a one-text split also counts
    # NNCF's first probe of the validation function, on the fp32 graph
    fp32, before = (passes[1], passes[2]) if len(rows) == 1 else (passes[0], passes[1])
    kept = score(_compiled(int8), range(len(rows)))[0]
    record = {
        "validation_texts": len(rows),
        "ranking_texts": min(restorer.ranking_subset_size, len(rows)),  # NNCF takes all if fewer
        "kept_by_the_fp32_graph": fp32,
        "kept_before": before,
        "kept": kept,
        # NNCF stops short of the bound when reverting more does not help (or its iterations end)
        "met": bool(kept >= fp32 - float(max_changed) - 1e-12),
        "quantizers": _quantizers(int8),
    }
    if not record["met"]:
        log.warning(
            "quantize.max_changed_predictions=%s not met: the int8 graph keeps %.2f%% of %d validation "
            "predictions, the fp32 graph %.2f%%",
            max_changed,
            100 * kept,
            len(rows),
            100 * fp32,
        )
    log.info("NNCF accuracy control: %s", record)
    return int8, record


def restore_mode(smooth_quant_alpha: float):
    """How NNCF returns a layer to float: weights too only where SmoothQuant did not scale them."""
    from nncf.quantization.advanced_parameters import RestoreMode

    smoothed = smooth_quant_alpha >= 0  # NNCF: a negative alpha skips SmoothQuant
    return RestoreMode.ONLY_ACTIVATIONS if smoothed else RestoreMode.ACTIVATIONS_AND_WEIGHTS


def _compiled(ov_model):
    import openvino as ov

    config = {
        "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "INFERENCE_PRECISION_HINT": ACCURACY_CONTROL_HINT,
    }
    return ov.Core().compile_model(ov_model, "CPU", config)  # as NNCF judged it and the folder runs it


def _quantizers(ov_model) -> int:
    """FakeQuantize nodes left in the graph: fewer than plain `nncf.quantize` leaves, by the groups
    returned to float."""
    return sum(op.get_type_name() == "FakeQuantize" for op in ov_model.get_ops())
