"""SmoothQuant folded into the fp32 weights, for exports whose int8 quantizer has none.

ONNX Runtime's `quantize_dynamic` quantizes each MatMul's input per tensor at run time, so one
activation channel with outliers (Llama's norms and its down-projection input have them) spends
the 256 levels of every other channel: it lost 2-5 points (1.99-4.80) of test accuracy on the fine-tuned
teacher (docs/BENCHMARKS.md, "Runtimes"). SmoothQuant (Xiao et al. 2023) moves that range into the
weights, channel by channel: `x W^T = (x / s)(W s)^T`. Here `1/s` is folded into the op before
each linear, so the smoothed model is the same float function (to rounding) and the exported graph
has no extra node:
- q/k/v read `input_layernorm`, gate/up read `post_attention_layernorm`: the norm's weight takes
  `1/s`, the linears' input columns take `s` (the SmoothQuant paper's LayerNorm fold);
- down reads `act(gate) * up`: `up`'s output rows take `1/s`, down's input columns `s`.
The attention output (o_proj's input) is left alone: with grouped-query attention one value
channel feeds several heads' columns, which would all need the same scale.
`s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`, the paper's, with `max|x_j|` measured on
calibration texts (training texts, never the test split).
"""

from __future__ import annotations

import torch
from torch import nn

# below this a channel's range is treated as empty: its scale stays 1
TINY = 1e-5


def smoothing_scale(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale for linears that read the same input."""
    w_max = torch.cat([w.abs() for w in weights], dim=0).amax(dim=0).float()
    scale = act_max.clamp(min=TINY).pow(alpha) / w_max.clamp(min=TINY).pow(1 - alpha)
    empty = (act_max < TINY) | (w_max < TINY)
    return torch.where(empty, torch.ones_like(scale), scale)


READERS = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")  # one per smoothed input


def input_ranges(model: nn.Module, rows: list[list[int]]) -> dict[tuple[int, str], torch.Tensor]:
    """max|x_j| of the input of every decoder layer's q_proj, gate_proj and down_proj, over the
    tokens of `rows` (token ids, one text a forward: no padding token counts), keyed by (layer
    index, name): the same for every alpha, and for a copy of `model`."""
    ranges: dict[tuple[int, str], torch.Tensor] = {}

    def recorder(key):
        def record(module, args):
            seen = args[0].detach().abs().flatten(0, -2).amax(dim=0).float()
            ranges[key] = torch.maximum(ranges[key], seen) if key in ranges else seen

        return record

    hooks = [
        layer.get_submodule(name).register_forward_pre_hook(recorder((i, name)))
        for i, layer in enumerate(decoder_layers(model))
        for name in READERS
    ]
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            for row in rows:
                model(input_ids=torch.tensor([row], device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers Llama-style classifier (`.model.layers`)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no .model.layers: SmoothQuant folding needs a Llama-style model"
        )
    return layers


@torch.no_grad()
def fold_smoothquant(
    model: nn.Module, rows: list[list[int]], alpha: float, ranges: dict | None = None
) -> nn.Module:
    """`model` with SmoothQuant's scales for `alpha` folded into its weights, in place; `ranges`:
    `input_ranges` of the unfolded model on `rows`, when already measured."""
    ranges = input_ranges(model, rows) if ranges is None else ranges
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        _fold(layer.input_layernorm, qkv, ranges[i, READERS[0]], alpha)
        _fold(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], ranges[i, READERS[1]], alpha)
        _fold(mlp.up_proj, [mlp.down_proj], ranges[i, READERS[2]], alpha)
    return model


def _fold(source: nn.Module, readers: list[nn.Linear], act_max: torch.Tensor, alpha: float) -> None:
    """Divide each output channel of `source` (a norm's weight, or a linear's rows and bias) by the
    scale, and multiply the input columns of the `readers` by it."""
    scale = smoothing_scale(act_max, [linear.weight for linear in readers], alpha)
    weight = source.weight
    weight.div_((scale.unsqueeze(1) if weight.dim() == 2 else scale).to(weight.dtype))
    if getattr(source, "bias", None) is not None:
        source.bias.div_(scale.to(source.bias.dtype))
    for linear in readers:
        linear.weight.mul_(scale.to(linear.weight.dtype))
