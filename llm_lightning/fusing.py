"""Fuse each Llama layer's q/k/v projections into one linear layer, and gate/up into another.

The three attention projections (and the two MLP input projections) read the same input. Fused,
a dynamically quantized model quantizes that input once instead of three (two) times, and
multiplies it by one wider int8 matrix, which the CPU's int8 kernels run closer to their peak
than three narrow ones (576 x 960 instead of 576 x 576 and twice 576 x 192 in SmolLM2-135M).
The fused model computes the same function: in float the logits match to rounding
(tests/test_fusing.py).

Only `transformers`' own `LlamaAttention` / `LlamaMLP` modules are fused; any other module is
left as it is. A group is left unfused when `keep` (qualified names of linear layers to leave in
float, `quantize.skip`) names one of its members, so that a skipped layer stays a layer.
"""

from __future__ import annotations

import types
from collections.abc import Collection

import torch
from torch import nn

FUSED = "_llm_lightning_fused"
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def fuse_projections(model: nn.Module, keep: Collection[str] = ()) -> int:
    """Fuse q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, in place; return the groups fused.

    Idempotent. The fused modules' state dict keys are `...self_attn.qkv_proj.*` and
    `...mlp.gate_up_proj.*`, so a saved fused model must be fused again before it loads
    (`llm_lightning.quantized_dir` records this as "fused").
    """
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    fused = 0
    for name, module in model.named_modules():
        if getattr(module, FUSED, False) or any(f"{name}.{p}" in keep for p in QKV + GATE_UP):
            continue
        if type(module) is LlamaAttention:
            module.qkv_sizes = _fuse(module, QKV, "qkv_proj")
            module.forward = types.MethodType(_attention_forward, module)
        elif type(module) is LlamaMLP:
            module.gate_up_sizes = _fuse(module, GATE_UP, "gate_up_proj")
            module.forward = types.MethodType(_mlp_forward, module)
        else:
            continue
        setattr(module, FUSED, True)
        fused += 1
    return fused


def is_fused(model: nn.Module) -> bool:
    return any(getattr(m, FUSED, False) for m in model.modules())


def _fuse(module: nn.Module, parts: tuple[str, ...], fused_name: str) -> tuple[int, ...]:
    linears = [getattr(module, p) for p in parts]
    if any(type(lin) is not nn.Linear for lin in linears):
        raise TypeError(
            f"fuse_projections: {type(module).__name__}'s {parts} must be plain nn.Linear layers "
            f"(got {[type(lin).__name__ for lin in linears]}); fuse before quantizing or adding LoRA."
        )
    first = linears[0]
    with_bias = first.bias is not None
    fused = nn.Linear(
        first.in_features,
        sum(lin.out_features for lin in linears),
        bias=with_bias,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if with_bias:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    for p in parts:
        delattr(module, p)
    setattr(module, fused_name, fused)
    return tuple(lin.out_features for lin in linears)


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
    # LlamaAttention.forward (transformers 5.x) with one projection instead of three.
    from transformers.models.llama.modeling_llama import (
        ALL_ATTENTION_FUNCTIONS,
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    cache = kwargs.pop("past_key_values", cache)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
    query = query.reshape(hidden_shape).transpose(1, 2)
    key = key.reshape(hidden_shape).transpose(1, 2)
    value = value.reshape(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    output, weights = attention(
        self,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


def _mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).split(self.gate_up_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)
