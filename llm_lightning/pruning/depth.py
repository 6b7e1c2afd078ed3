"""Depth pruning: remove whole decoder layers, the ones that change the hidden state least.

Block influence (ShortGPT, Men et al. 2024): `BI_i = 1 - cos(h_in, h_out)` averaged over the
real tokens of task batches; a layer whose output points where its input did mostly passes
the residual stream through. The kept layers' original indices are written to the config as
`kept_layers`, so an exported model says what it was cut from.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from llm_lightning.errors import UserError
from llm_lightning.pruning.structured import llama_of


def check_remove_layers(num_layers: int, remove_layers: int) -> None:
    if not isinstance(remove_layers, int) or not 0 <= remove_layers < num_layers:
        raise UserError(
            f"prune.remove_layers={remove_layers!r} but the model has {num_layers} decoder layers "
            f"and at least one must stay; choose 0..{num_layers - 1}."
        )


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[dict]) -> torch.Tensor:
    """Mean `1 - cos(h_in, h_out)` per decoder layer, shape (layers,)."""
    layers = llama_of(model).layers
    total = torch.zeros(len(layers), dtype=torch.float64)
    state: dict = {}

    def watch(i: int):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
            total[i] += ((1 - cos) * state["mask"]).sum().double().cpu()

        return hook

    handles = [layer.register_forward_hook(watch(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for batch in batches:
            state["mask"] = batch["attention_mask"].float()
            tokens += int(batch["attention_mask"].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise UserError("No task batches reached the block influence estimate; raise prune.batches.")
    return (total / tokens).float()


def layers_to_keep(influence: torch.Tensor, remove_layers: int) -> list[int]:
    check_remove_layers(len(influence), remove_layers)
    removed = set(torch.topk(influence, remove_layers, largest=False).indices.tolist())
    return [i for i in range(len(influence)) if i not in removed]


def drop_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the decoder layers `keep` (indices into the current layers), in place."""
    llama = llama_of(model)
    n = len(llama.layers)
    if not keep or sorted(set(keep)) != list(keep) or keep[-1] >= n or keep[0] < 0:
        raise UserError(f"Layers to keep must be increasing indices in 0..{n - 1}, got {keep}.")
    previous = getattr(model.config, "kept_layers", None) or list(range(n))
    llama.layers = nn.ModuleList(llama.layers[i] for i in keep)
    for new_index, layer in enumerate(llama.layers):
        layer.self_attn.layer_idx = new_index  # the KV cache is indexed by position in the stack
    config = model.config
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.kept_layers = [previous[i] for i in keep]  # indices in the original, unpruned model
    return model
