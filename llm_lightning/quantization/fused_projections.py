"""One linear layer for q, k and v, one for gate and up: fewer, wider int8 matmuls.

Llama's attention multiplies the same normed hidden state by q_proj, k_proj and v_proj, and its
MLP by gate_proj and up_proj. Quantized per layer, each of those five quantizes that input on its
own (with its own SmoothQuant divisor) and calls its own small matmul (k and v are 576 -> 192 in
SmolLM2-135M). Concatenating the weights by output rows makes that two matmuls per decoder layer
(576 -> 960 and 576 -> 3072) with one input quantization each, and lets SmoothQuant pick one
divisor per input, as the SmoothQuant paper does for these groups. Measured in docs/BENCHMARKS.md,
"Fused projections".

    layer.self_attn.qkv_proj = [q_proj; k_proj; v_proj]     (rows stacked: q, then k, then v)
    layer.mlp.gate_up_proj   = [gate_proj; up_proj]

Only transformers' own `LlamaAttention` / `LlamaMLP` forwards are replaced (a subclass with a
forward of its own, or another architecture, keeps its layers as they are). The fused forwards
below are transformers 5's Llama forwards with the projection calls merged; tests compare the
logits with the unfused model's (tests/test_fused_projections.py).
"""

from __future__ import annotations

import logging
import types
from collections.abc import Collection

import torch
from torch import nn

log = logging.getLogger(__name__)

QKV, GATE_UP = "qkv_proj", "gate_up_proj"
FUSED = "_llm_lightning_fused"


def fuse_projections(model: nn.Module, keep: Collection[str] = (), empty: bool = False) -> int:
    """Fuse q/k/v and gate/up of every Llama decoder layer in place; return how many groups.

    `keep`: qualified names of linear layers that must stay as they are (`quantize.skip`): a
    group with one of them in it is left unfused. `empty`: the stacked layers get no weights
    (meta tensors), for a state dict that already holds them (`load_state_dict(assign=True)`).
    Idempotent.
    """
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

    groups = {
        LlamaAttention: (QKV, ("q_proj", "k_proj", "v_proj"), _attention_forward),
        LlamaMLP: (GATE_UP, ("gate_proj", "up_proj"), _mlp_forward),
    }
    count = 0
    for name, module in list(model.named_modules()):  # a list: the loop adds and removes modules
        kind = next((k for k in groups if type(module).forward is k.forward and isinstance(module, k)), None)
        if kind is None or getattr(module, FUSED, False):
            continue
        fused_name, parts, forward = groups[kind]
        prefix = f"{name}." if name else ""
        if any(f"{prefix}{p}" in keep for p in parts):
            log.info("%s stays unfused: quantize.skip keeps one of %s", name, parts)
            continue
        linears = [getattr(module, p) for p in parts]
        module.add_module(fused_name, _stacked(linears, empty))
        module.fused_sizes = [m.out_features for m in linears]
        for p in parts:
            delattr(module, p)
        module.forward = types.MethodType(forward, module)
        setattr(module, FUSED, True)
        count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    return any(getattr(m, FUSED, False) for m in model.modules())


def _stacked(linears: list[nn.Linear], empty: bool) -> nn.Linear:
    first = linears[0]
    bias = first.bias is not None
    device = "meta" if empty else first.weight.device
    outputs = sum(m.out_features for m in linears)
    fused = nn.Linear(first.in_features, outputs, bias=bias, device=device, dtype=first.weight.dtype)
    if not empty:
        with torch.no_grad():
            fused.weight.copy_(torch.cat([m.weight for m in linears]))
            if bias:
                fused.bias.copy_(torch.cat([m.bias for m in linears]))
    fused.requires_grad_(first.weight.requires_grad)
    return fused


def _attention_forward(
    self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs
):
    # transformers 5.24 LlamaAttention.forward, with q/k/v from one matmul
    from transformers.models.llama.modeling_llama import (
        ALL_ATTENTION_FUNCTIONS,
        apply_rotary_pos_emb,
        eager_attention_forward,
    )

    cache = kwargs.pop("past_key_values", cache)  # the name before transformers 5.40
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = self.qkv_proj(hidden_states).split(self.fused_sizes, dim=-1)
    query_states, key_states, value_states = (t.reshape(hidden_shape).transpose(1, 2) for t in (q, k, v))
    cos, sin = position_embeddings
    query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward
    )
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _mlp_forward(self, x):
    gate, up = self.gate_up_proj(x).split(self.fused_sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)
