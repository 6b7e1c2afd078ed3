"""torch.compile for inference: each decoder layer compiled once, dynamic shapes, one graph each.

Used for quantized models (where compile fuses int8 activation quantization into the matmuls) and,
through `bench`/`stages`, for any stage measured with `compile=true`.
"""

from __future__ import annotations

import torch
from torch import nn


def maybe_compile(model: nn.Module, compile: bool, options: dict | None = None) -> nn.Module:
    """torch.compile each decoder layer in place ("regional" compilation), with dynamic shapes.

    The decoder layers are identical, so they share one compiled graph: compiling costs one
    layer's time, not thirty's. Dynamic shapes let one graph serve every text length (batch 1
    gets its own). Models without `model.layers` are compiled whole. `options` go to inductor
    (torch.compile's `options`). (benchmarks/harness.py's `compile_decoder` compiles the decoder
    as one graph instead, for the benchmarks that compare the two.)
    """
    if not compile:
        return model
    constant_cpu_probes()
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        for layer in layers:
            layer.compile(dynamic=True, options=options)
        return model
    return torch.compile(model, dynamic=True, options=options)


def constant_cpu_probes() -> None:
    """Let torch.compile trace torchao's int8 matmul on CPU in one graph.

    torchao 0.18's `int_scaled_matmul` asks `torch._C._cpu._is_amx_tile_supported()` (and VNNI)
    on every call to pick its u8s8 or s8s8 path. Dynamo cannot trace that C function, so the
    graph broke inside every quantized linear of a decoder layer: the activation
    quantization, the matmul and its rescale ran as separate graphs that inductor could not fuse.
    The answers are properties of the CPU, so they are asked once here and the module's names
    rebound to functions that return them. Idempotent; a torchao without these names is left alone.
    """
    try:
        from torchao.kernel import intmm
    except ImportError:
        return
    for name in ("_cpu_is_amx_tile_supported", "_cpu_is_vnni_supported"):
        probe = getattr(intmm, name, None)
        if probe is None or getattr(probe, "_llm_lightning_constant", False):
            continue
        answer = bool(probe())

        def constant(answer: bool = answer) -> bool:
            return answer

        constant._llm_lightning_constant = True
        setattr(intmm, name, constant)
