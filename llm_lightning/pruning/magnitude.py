"""Unstructured pruning masks: L1 (smallest |w| first) or random, over all decoder weights at
once (global) or each weight matrix on its own (layer).

We keep the masks ourselves instead of using `torch.nn.utils.prune`'s reparametrisation: that
renames each `weight` to `weight_orig` + a `weight_mask` buffer, so checkpoints no longer load
into a plain model and the exported model needs `prune.remove` first (a common complaint about
Lightning's `ModelPruning`). Here the weights stay plain tensors with zeros in them.
Zeros in dense matrices make nothing faster on CPU or GPU: this saves no time, only (after
compression) disk.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from llm_lightning.errors import UserError

IMPORTANCES = ("l1", "random")
SCOPES = ("global", "layer")
_LAYER = re.compile(r"layers\.(\d+)\.")


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The 2-D weights of every Linear inside the decoder layers (not embeddings, norms or head)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _LAYER.search(name + "."):
            found[f"{name}.weight"] = module.weight
    if not found:
        raise TypeError(f"{type(model).__name__} has no Linear layers under `layers.<i>.`: nothing to prune.")
    return found


def _scores(name: str, weight: torch.Tensor, importance: str, seed: int) -> torch.Tensor:
    if importance == "l1":
        return weight.detach().abs().float()
    # One fixed random score per weight (seeded by name), so a rising target extends the same mask.
    gen = torch.Generator().manual_seed(seed + sum(map(ord, name)) * 1_000_003 % (2**31))
    return torch.rand(weight.shape, generator=gen)


def compute_masks(
    weights: dict[str, torch.Tensor],
    sparsity: float,
    importance: str = "l1",
    scope: str = "global",
    previous: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (True = kept) removing exactly `round(sparsity * n)` weights.

    Weights already pruned (`previous[name]` False) score lowest and stay pruned, so masks
    only grow as the target rises.
    """
    if importance not in IMPORTANCES:
        raise UserError(f"prune.importance={importance!r} is not one of {IMPORTANCES}.")
    if scope not in SCOPES:
        raise UserError(f"prune.scope={scope!r} is not one of {SCOPES}.")
    scores = {}
    for name, w in weights.items():
        s = _scores(name, w, importance, seed)
        if previous is not None and name in previous:
            s = torch.where(previous[name].to(s.device), s, torch.full_like(s, -1.0))
        scores[name] = s
    if scope == "layer":
        return {name: _keep_mask(s, round(sparsity * s.numel())) for name, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _keep_mask(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, s in scores.items():
        masks[name] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return masks


def _keep_mask(scores: torch.Tensor, n_pruned: int) -> torch.Tensor:
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if n_pruned > 0:
        # Exactly n_pruned, even with ties (many zeros): topk picks indices, not a threshold.
        keep[torch.topk(scores.flatten(), n_pruned, largest=False).indices] = False
    return keep.view_as(scores)


@torch.no_grad()
def apply_masks(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        weights[name].mul_(mask.to(weights[name].device, weights[name].dtype))


@torch.no_grad()
def sparsity_report(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction of exact zeros: `overall` and one entry per decoder layer (`layer_00`, ...)."""
    zeros: dict[str, int] = {}
    total: dict[str, int] = {}
    for name, w in weights.items():
        key = f"layer_{int(_LAYER.search(name).group(1)):02d}"
        zeros[key] = zeros.get(key, 0) + int((w == 0).sum())
        total[key] = total.get(key, 0) + w.numel()
    report = {"overall": sum(zeros.values()) / sum(total.values())}
    report.update({k: zeros[k] / total[k] for k in sorted(total)})
    return report
