"""Width pruning of a Llama: remove MLP intermediate neurons and attention heads for real, so
the matrices shrink and every forward pass does less work.

HF's `LlamaConfig` has one `intermediate_size`, `num_attention_heads` and
`num_key_value_heads` for all layers, so we remove the same number of neurons and heads in
every layer (which ones differs per layer). The exported model then loads with plain
`from_pretrained`. `head_dim` is written to the config explicitly, since after removing heads
it is no longer `hidden_size // num_attention_heads`. Transformers 5 still requires
`hidden_size % num_attention_heads == 0` (its check ignores `head_dim`), so a head count that
breaks it is refused before training, with the counts that work (`valid_remove_heads`).

Grouped-query attention: query head h reads KV head `h // (H / G)`. Two ways keep that valid:
- `query`: remove the same number of query heads from every group (K/V untouched);
- `kv_group`: remove whole groups, i.e. a KV head and all the query heads that read it.

Why not `torch-pruning`: for a Llama the coupled tensors are known (gate/up rows with down
columns; q rows with o columns; k/v rows with their query heads), so the surgery is a few slices;
torch-pruning's own LLM example still patches head counts and the config by hand afterwards, its
tracker has open GQA shape errors (VainF/Torch-Pruning#516, #461), and a probe of 1.6.1 on the
tiny GQA Llama here produced no result within 10 minutes. No dependency is added.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import transformers
from torch import nn

from llm_lightning.errors import UserError
from llm_lightning.pruning.loadable import config_refusal
from llm_lightning.pruning.schedule import check_sparsity

HEAD_MODES = ("query", "kv_group")
IMPORTANCES = ("activation", "taylor")


@dataclass
class WidthPlan:
    """Indices kept in each decoder layer (lists of ints, so the plan fits in a checkpoint)."""

    mlp_keep: list[list[int]]
    heads_keep: list[list[int]]  # query heads, in order
    kv_keep: list[list[int]]  # KV heads, in order

    def to_dict(self) -> dict:
        return asdict(self)


def llama_of(model: nn.Module) -> nn.Module:
    """The `LlamaModel` inside a `*ForSequenceClassification` (peft wrappers refused)."""
    if hasattr(model, "get_base_model"):
        raise TypeError(
            "Structured and depth pruning change tensor shapes and cannot run on a LoRA "
            "(peft) model; use finetune=full or finetune=freeze with prune=structured/depth."
        )
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise TypeError(
            f"Expected a Llama-style *ForSequenceClassification (.model.layers), got {type(model).__name__}."
        )
    return model.model


def heads_after(config, remove_heads: int, heads_mode: str) -> tuple[int, int]:
    """(query heads, KV heads) per layer once `remove_heads` query heads are removed."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads_mode == "query":
        return heads - remove_heads, kv
    return heads - remove_heads, kv - remove_heads // (heads // kv)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _refusal(config, remove_heads: int, heads_mode: str) -> str | None:
    """Why transformers would refuse the pruned config (head_dim kept explicit, as `shrink_width` writes it)."""
    heads, kv = heads_after(config, remove_heads, heads_mode)
    return config_refusal(
        config, num_attention_heads=heads, num_key_value_heads=kv, head_dim=_head_dim(config)
    )


def valid_remove_heads(config, heads_mode: str) -> list[int]:
    """The `remove_heads` values that keep the GQA grouping and give a config transformers saves and loads."""
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    step = kv if heads_mode == "query" else heads // kv
    return [r for r in range(0, heads, step) if r == 0 or _refusal(config, r, heads_mode) is None]


def _remove_heads_problem(config, remove_heads: int, heads_mode: str) -> str | None:
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per_group = heads // kv
    valid = valid_remove_heads(config, heads_mode)
    if not 0 <= remove_heads < heads:
        return (
            f"prune.remove_heads={remove_heads} but each layer has {heads} query heads and one "
            f"must stay; valid for heads_mode={heads_mode}: {valid}."
        )
    if remove_heads % (kv if heads_mode == "query" else per_group):
        how = (
            f"removing evenly within the {kv} groups needs a multiple of {kv}"
            if heads_mode == "query"
            else f"removing whole groups needs a multiple of the group size {per_group}"
        )
        return (
            f"prune.remove_heads={remove_heads} breaks the GQA grouping ({heads} query heads share "
            f"{kv} KV heads): {how}. Valid: {valid}; or change prune.heads_mode."
        )
    refusal = remove_heads and _refusal(config, remove_heads, heads_mode)
    if not refusal:
        return None
    left, left_kv = heads_after(config, remove_heads, heads_mode)
    other = next(m for m in HEAD_MODES if m != heads_mode)
    return (
        f"prune.remove_heads={remove_heads} (heads_mode={heads_mode}) would leave {left} query heads "
        f"and {left_kv} KV heads per layer, a config transformers {transformers.__version__} refuses "
        f"({refusal}): the run would train and then fail to save model/ (save_pretrained), and it "
        f"would not load (from_pretrained). Valid prune.remove_heads for heads_mode={heads_mode}: "
        f"{valid}; with prune.heads_mode={other}: {valid_remove_heads(config, other)}."
    )


def check_width_args(config, mlp_sparsity: float, remove_heads: int, heads_mode: str) -> None:
    """Every problem with the width request at once, each with the valid choices.

    Runs before the importance pass and training: besides the GQA grouping, the pruned head
    counts must give a config transformers accepts (llm_lightning.pruning.loadable).
    """
    problems = []
    try:
        check_sparsity(mlp_sparsity, "prune.mlp_sparsity")
    except ValueError as e:
        problems.append(str(e))
    if heads_mode not in HEAD_MODES:
        problems.append(f"prune.heads_mode={heads_mode!r} is not one of {HEAD_MODES}.")
    elif problem := _remove_heads_problem(config, remove_heads, heads_mode):
        problems.append(problem)
    if problems:
        raise UserError("Bad structured pruning request:\n  " + "\n  ".join(problems))


class _UnitScores:
    """Per-layer importance sums of the MLP neurons and query heads, fed by forward pre-hooks on
    `down_proj` and `o_proj` (their inputs are the units' activations)."""

    def __init__(self, layers: nn.ModuleList, method: str):
        self.method = method
        self.head_dim = layers[0].self_attn.head_dim
        self.n_heads = layers[0].self_attn.o_proj.in_features // self.head_dim
        self.mlp = torch.zeros(len(layers), layers[0].mlp.down_proj.in_features)
        self.heads = torch.zeros(len(layers), self.n_heads)
        self.mask: torch.Tensor | None = None  # the current batch's attention mask, (B, T)

    def hook(self, i: int, kind: str):
        def watch(module, args):
            a = args[0]
            mask = self.mask[..., None].to(a.dtype)
            if self.method == "taylor":
                a.register_hook(lambda g: self.add_taylor(i, kind, a.detach(), g, mask))
                return
            with torch.no_grad():
                self.add_activation(i, kind, module, a, mask)

        return watch

    def add_activation(
        self, i: int, kind: str, module: nn.Linear, a: torch.Tensor, mask: torch.Tensor
    ) -> None:
        if kind == "mlp":
            self.mlp[i] += ((a.abs() * mask).sum((0, 1)) * module.weight.norm(dim=0)).float().cpu()
            return
        # contribution of each head to the residual: (B, T, H, hidden)
        w = module.weight.view(module.out_features, self.n_heads, self.head_dim)
        contrib = torch.einsum("bthd,ohd->btho", a.view(*a.shape[:2], self.n_heads, self.head_dim), w)
        self.heads[i] += (contrib.norm(dim=-1) * mask).sum((0, 1)).float().cpu()

    def add_taylor(self, i: int, kind: str, a: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> None:
        score = (a * g).abs() * mask
        if kind == "mlp":
            self.mlp[i] += score.sum((0, 1)).float().cpu()
        else:
            self.heads[i] += (
                score.view(*score.shape[:2], self.n_heads, self.head_dim).sum((0, 1, 3)).float().cpu()
            )


def _forward(model: nn.Module, batch: dict, method: str) -> None:
    """One batch through the model: with the loss's backward for `taylor` (the hooks read the
    gradients), without gradients for `activation`."""
    if method == "taylor":
        with torch.enable_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nn.functional.cross_entropy(logits.float(), batch["labels"]).backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def width_importance(
    model: nn.Module,
    batches: Iterable[dict],
    method: str = "activation",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of every MLP neuron and query head, from task batches.

    `activation`: mean over real tokens of the unit's contribution to the residual stream,
    |a_j| * ||W_down[:, j]|| for a neuron and ||W_o[:, head] a_head|| for a head.
    `taylor`: mean over real tokens of |a * dL/da| (first-order loss change if the unit were
    zeroed), summed over a head's dimensions; needs the labels in each batch.

    Returns:
        (mlp, heads): shapes (layers, intermediate_size) and (layers, num_attention_heads).
    """
    if method not in IMPORTANCES:
        raise UserError(f"prune.importance={method!r} is not one of {IMPORTANCES}.")
    layers = llama_of(model).layers
    scores = _UnitScores(layers, method)
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(scores.hook(i, "mlp")))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(scores.hook(i, "heads")))
    was_training, tokens = model.training, 0
    model.eval()
    try:
        for batch in batches:
            scores.mask = batch["attention_mask"]
            tokens += int(batch["attention_mask"].sum())
            _forward(model, batch, method)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise UserError("No task batches reached the importance estimate; raise prune.batches.")
    return scores.mlp / tokens, scores.heads / tokens


def plan_width(
    mlp_scores: torch.Tensor,
    head_scores: torch.Tensor,
    config,
    mlp_sparsity: float,
    remove_heads: int,
    heads_mode: str = "query",
) -> WidthPlan:
    """Keep the highest-scoring units, the same number in every layer (see module docstring)."""
    check_width_args(config, mlp_sparsity, remove_heads, heads_mode)
    n_mlp = mlp_scores.shape[1]
    keep_mlp = n_mlp - round(mlp_sparsity * n_mlp)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    per_group = heads // kv
    plan = WidthPlan([], [], [])
    for layer_mlp, layer_heads in zip(mlp_scores, head_scores, strict=True):
        plan.mlp_keep.append(sorted(torch.topk(layer_mlp, keep_mlp).indices.tolist()))
        grouped = layer_heads.view(kv, per_group)
        if heads_mode == "query":
            keep_in_group = per_group - remove_heads // kv
            idx = torch.topk(grouped, keep_in_group, dim=1).indices.sort(dim=1).values
            q = (idx + torch.arange(kv)[:, None] * per_group).flatten().tolist()
            plan.heads_keep.append(q)
            plan.kv_keep.append(list(range(kv)))
        else:
            keep_groups = kv - remove_heads // per_group
            groups = sorted(torch.topk(grouped.sum(1), keep_groups).indices.tolist())
            plan.kv_keep.append(groups)
            plan.heads_keep.append([g * per_group + j for g in groups for j in range(per_group)])
    return plan


def _rows(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[index].clone(), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[index].clone(), linear.bias.requires_grad)
    linear.out_features = len(index)


def _cols(linear: nn.Linear, index: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.data[:, index].clone(), linear.weight.requires_grad)
    linear.in_features = len(index)


def _head_index(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def shrink_width(model: nn.Module, plan: WidthPlan) -> nn.Module:
    """Slice the weights to the plan, in place, and update the config to match."""
    llama = llama_of(model)
    layers = llama.layers
    if not len(plan.mlp_keep) == len(plan.heads_keep) == len(layers):
        raise ValueError(
            f"The width plan covers {len(plan.mlp_keep)} layers but the model has {len(layers)}."
        )
    config = model.config
    head_dim = config.head_dim
    for layer, mlp_keep, q_keep, kv_keep in zip(
        layers, plan.mlp_keep, plan.heads_keep, plan.kv_keep, strict=True
    ):
        mlp_index = torch.tensor(mlp_keep)
        _rows(layer.mlp.gate_proj, mlp_index)
        _rows(layer.mlp.up_proj, mlp_index)
        _cols(layer.mlp.down_proj, mlp_index)
        attn = layer.self_attn
        _rows(attn.q_proj, _head_index(q_keep, head_dim))
        _cols(attn.o_proj, _head_index(q_keep, head_dim))
        _rows(attn.k_proj, _head_index(kv_keep, head_dim))
        _rows(attn.v_proj, _head_index(kv_keep, head_dim))
        attn.num_key_value_groups = len(q_keep) // len(kv_keep)
    config.intermediate_size = len(plan.mlp_keep[0])
    config.num_attention_heads = len(plan.heads_keep[0])
    config.num_key_value_heads = len(plan.kv_keep[0])
    config.head_dim = head_dim
    return model
