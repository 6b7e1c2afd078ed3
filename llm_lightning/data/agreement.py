"""How far a classifier's predictions on some texts are from a reference model's on the same texts:
what picks a SmoothQuant alpha on the validation split, for torchao (llm_lightning.quantization.smoothquant),
NNCF (llm_lightning.runtimes.openvino) and ONNX Runtime (llm_lightning.runtimes.onnx) alike."""

from __future__ import annotations

import torch
from torch import nn

from llm_lightning.data.batching import run_by_length

# A setting whose value is chosen on the validation split by the rule below (`closeness`):
# quantize.smoothquant_alpha (torchao) and quantize.smooth_quant_alpha (NNCF, ONNX Runtime).
AUTO = "auto"


def logits(model: nn.Module, rows: list[list[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """(len(rows), num_labels) fp32 logits, in the rows' order (batched by length: little padding)."""
    with torch.inference_mode():
        return run_by_length(
            rows,
            batch_size,
            pad_id,
            lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits.float(),
        )


def agreement(got: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far quantized logits are from the fp32 ones: predictions changed, margin error (2 classes:
    logit[1] - logit[0]; more: the predicted class's logit minus the runner-up's)."""
    if reference.shape[-1] == 2:
        top = torch.tensor([[1, 0]]).expand(len(reference), 2)
    else:
        top = reference.topk(2, dim=-1).indices

    def margin(x: torch.Tensor) -> torch.Tensor:
        return (x.gather(1, top[:, :1]) - x.gather(1, top[:, 1:])).squeeze(1)

    error = (margin(got) - margin(reference)).abs()
    return {
        "flips": int((got.argmax(-1) != reference.argmax(-1)).sum()),
        "margin_mae": float(error.mean()),
        "margin_max": float(error.max()),
    }


def closeness(result: dict) -> tuple[int, float]:
    """How far an `agreement` row is from the reference, for `min`: predictions changed first, then
    the mean change of the margin. The rule every `auto` SmoothQuant alpha is chosen by."""
    return result["flips"], result["margin_mae"]


def validation_problem(texts: int, key: str, what: str, usual: str) -> str | None:
    """Why `quantize.<key>=auto` cannot choose: no validation texts to judge the agreement on."""
    if texts >= 1:
        return None
    return (
        f"quantize.{key}=auto picks {what} on the validation split, and this task has no validation "
        f"texts: set quantize.{key} to a number ({usual})."
    )
