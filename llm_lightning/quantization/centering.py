"""Asymmetric int8 activations at the speed of symmetric ones: centre each token, then correct.

Per-token asymmetric quantization spends all 256 int8 levels on a token's [min, max] range instead
of [-max|x|, max|x|]. torchao 0.18 does it with a zero point and corrects the matmul with the
weights' row sums, which it recomputes from the int8 weights on every call: compiled, with
SmoothQuant, a batch-1 forward of SmolLM2-135M took 183 ms (p50) that way on this CPU, 36 ms
centred as below (docs/BENCHMARKS.md, "Asymmetric activations by centring").

Here each token's midpoint c = (max + min) / 2 is taken off before a *symmetric* int8 linear
and added back after it, through the weights' row sums computed once:

    x W^T = (x - c) W^T + c * (W 1)

`x - c` is symmetric around 0 with half-range (max - min) / 2, so its int8 scale is the
asymmetric one: the same precision, at the speed of torchao's symmetric path. The matmul uses
torchao's int8 weights and formulas; the token is quantized here, since its scale follows from
the min and max already taken (torchao would reduce the centred token once more).
The row sums are of the dequantized int8 weights, so the correction matches what the matmul uses.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from llm_lightning.quantization.onednn_int8 import (
    SIGNED_8,
    activation_codes,
    int8_linear_packed,
    pack_int8_weight,
)

CENTERED = "_llm_lightning_centered"
EPS = torch.finfo(torch.float32).eps  # torchao's floor for int8 scales
_int_scaled_matmul = None  # torchao.kernel.int_scaled_matmul, bound by center_activations


def center_activations(model: nn.Module) -> int:
    """Make every dynamically int8-quantized linear layer centre its activations; return how many.

    The layers must be torchao `Int8Tensor` weights with symmetric dynamic activation quantization.
    Buffers are not persistent: the saved state dict is torchao's, and `load_quantized`
    calls this again (quantization.json records it). Idempotent.
    """
    from torchao.kernel import int_scaled_matmul  # here: importing torchao costs seconds

    global _int_scaled_matmul
    _int_scaled_matmul = int_scaled_matmul
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or getattr(module, CENTERED, False):
            continue
        weight = module.weight
        if getattr(weight, "act_quant_kwargs", None) is None:
            continue  # float, or weight-only int8: no activation quantization to centre
        with torch.no_grad():
            row_sums = weight.dequantize().float().sum(dim=-1)
            pre_scale = weight.act_pre_scale  # SmoothQuant's per-channel divisor
            # plain views of torchao's int8 weight and its per-row scales (no copies): the forward
            # below multiplies by them directly
            module.register_buffer("int8_weight_t", weight.qdata.contiguous().t(), persistent=False)
            module.register_buffer("weight_scales", weight.scale.flatten().float(), persistent=False)
            module.register_buffer("weight_row_sums", row_sums, persistent=False)
            module.register_buffer("packed_int8_weight", pack_int8_weight(weight.qdata), persistent=False)
            module.register_buffer(
                "act_pre_scale", None if pre_scale is None else pre_scale.float().clone(), persistent=False
            )
        module.activation_codes = activation_codes() or SIGNED_8  # fixed per CPU: probed once a process
        module.forward = types.MethodType(_centered_forward, module)
        if type(module) is nn.Linear:
            module.__class__ = CentredLinear  # deep-copyable despite the packed weight
        setattr(module, CENTERED, True)
        count += 1
    return count


class CentredLinear(nn.Linear):
    """A centred torchao int8 linear that `copy.deepcopy` and `.to(device)` can handle.

    oneDNN's packed weight is an opaque CPU tensor without storage, which `Tensor.__deepcopy__`
    cannot copy and no other device can hold: copies and moves leave it out and pack the int8
    weight again (to None off the CPU, where the forward uses torchao's matmul).
    """

    def _apply(self, fn, recurse=True):
        self._buffers["packed_int8_weight"] = None
        super()._apply(fn, recurse)
        self._buffers["packed_int8_weight"] = pack_int8_weight(self.weight.qdata)
        return self

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_buffers"] = {**state["_buffers"], "packed_int8_weight": None}
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._buffers["packed_int8_weight"] = pack_int8_weight(self.weight.qdata)


def _centered_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # torchao's symmetric per-token int8 linear, written out so that the token's range is reduced
    # once: the centred token's largest magnitude is (max - min) / 2, which torchao would reduce
    # again. Same formulas as torchao 0.18's Int8Tensor linear (scale = max|x| / 127.5,
    # round(x * (1 / scale)), int_scaled_matmul, then the weight scales).
    scaled = x if self.act_pre_scale is None else x * self.act_pre_scale
    high, low = scaled.amax(dim=-1, keepdim=True), scaled.amin(dim=-1, keepdim=True)
    center = (high + low) / 2
    # oneDNN's packed weight takes the activation codes this CPU multiplies exactly (7-bit ones on
    # CPUs without VNNI, llm_lightning.quantization.onednn_int8); torchao's matmul signed 8-bit
    packed = self.packed_int8_weight is not None
    codes = self.activation_codes if packed else SIGNED_8
    scale = ((high - low) / 2 / codes.half_range).clamp(min=EPS)
    levels = torch.clamp(torch.round((scaled - center) * (1.0 / scale)), codes.low, codes.high)
    q = (levels + codes.zero_point if codes.zero_point else levels).to(codes.dtype)
    rows, row_scales = q.reshape(-1, q.shape[-1]), scale.reshape(-1, 1)
    if packed:  # x86 CPU: oneDNN with the weight packed once
        y = (
            int8_linear_packed(rows, self.packed_int8_weight, self.weight_scales, codes.zero_point)
            * row_scales
        )
    else:
        # torchao's own int8 matmul + activation scale: on CPU torch._int_mm (u8s8 on CPUs with
        # VNNI but no AMX), on CUDA its cuBLAS path with fallbacks for small shapes
        y = _int_scaled_matmul(rows, self.int8_weight_t, row_scales) * self.weight_scales
    y = y.reshape(*x.shape[:-1], -1)
    if self.bias is not None:
        y = y + self.bias
    return (y + center * self.weight_row_sums).to(x.dtype)
