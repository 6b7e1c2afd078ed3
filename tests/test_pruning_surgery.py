"""Pruning tensor surgery on a bare tiny Llama: schedules, masks, width and depth removal, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

from llm_lightning.callbacks.prune import DepthPruning, StructuredPruning
from llm_lightning.models import load_classifier
from llm_lightning.pruning import (
    SparsitySchedule,
    block_influence,
    compute_masks,
    drop_layers,
    plan_width,
    prunable_weights,
    shrink_width,
    sparsity_report,
    width_importance,
)
from llm_lightning.pruning.depth import layers_to_keep
from llm_lightning.pruning.loadable import check_saveable, config_refusal
from llm_lightning.pruning.structured import check_width_args

# 6 query heads sharing 2 KV heads: groups of 3, so "query" and "kv_group" modes differ.
TINY = {
    "source": "tiny",
    "hidden_size": 48,
    "intermediate_size": 32,
    "num_layers": 3,
    "num_heads": 6,
    "num_kv_heads": 2,
    "init_seed": 0,
    "attn_implementation": "eager",
}


def tiny_model(**changes):
    model, tok = load_classifier(OmegaConf.create({**TINY, **changes}), ["negative", "positive"])
    return model.eval(), tok


def batches(tok, n: int = 2) -> list[dict]:
    texts = ["a gorgeous, moving film", "dull", "the plot never lands at all", "fine"]
    enc = tok(texts * n, padding=True, return_tensors="pt")
    return [
        {
            "input_ids": enc["input_ids"][i::n],
            "attention_mask": enc["attention_mask"][i::n],
            "labels": torch.tensor([1, 0, 0, 1]),
        }
        for i in range(n)
    ]


def logits(model, tok) -> torch.Tensor:
    enc = tok(["a gorgeous, moving film", "the plot never lands"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_cubic_schedule_follows_zhu_gupta():
    s = SparsitySchedule(
        "cubic", final_sparsity=0.8, initial_sparsity=0.0, start_step=2, end_step=10, frequency=2
    )
    expected = {
        0: 0.0,
        1: 0.0,
        2: 0.0,
        3: 0.0,
        4: 0.8 - 0.8 * (1 - 2 / 8) ** 3,
        5: 0.8 - 0.8 * (1 - 2 / 8) ** 3,
        6: 0.8 - 0.8 * 0.5**3,
        9: 0.8 - 0.8 * (1 - 6 / 8) ** 3,
        10: 0.8,
        50: 0.8,
    }
    for step, value in expected.items():
        assert s.sparsity_at(step) == pytest.approx(value), step
    by_epoch = SparsitySchedule("epochs", final_sparsity=0.6, epochs=[1, 3])
    assert [by_epoch.sparsity_at(0, e) for e in range(5)] == pytest.approx([0, 0.3, 0.3, 0.6, 0.6])
    assert SparsitySchedule("one_shot", final_sparsity=0.5).sparsity_at(0) == 0.5


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"prune\.sparsity=.*outside \[0, 1\)"):
        SparsitySchedule("cubic", final_sparsity=bad)
    with pytest.raises(ValueError, match=r"prune\.mlp_sparsity=.*outside \[0, 1\)"):
        StructuredPruning(mlp_sparsity=bad)


@pytest.mark.parametrize("importance", ["l1", "random"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_masks_remove_exact_count_and_only_grow(importance, scope):
    model, _ = tiny_model()
    weights = prunable_weights(model)
    assert len(weights) == 3 * 7  # q k v o gate up down per layer; no embeddings, norms or head
    low = compute_masks(weights, 0.3, importance, scope)
    high = compute_masks(weights, 0.6, importance, scope, previous=low)
    total = sum(w.numel() for w in weights.values())
    pruned = sum(int((~m).sum()) for m in high.values())
    if scope == "layer":
        assert all(int((~m).sum()) == round(0.6 * m.numel()) for m in high.values())
    assert pruned == pytest.approx(0.6 * total, abs=len(weights))
    assert all(
        not (h & ~lo).any() for h, lo in zip(high.values(), low.values(), strict=True)
    )  # never revived
    if importance == "l1":  # every pruned weight is no larger than every kept one (global)
        for name, w in weights.items():
            if scope == "layer" and (~high[name]).any():
                assert w.abs()[~high[name]].max() <= w.abs()[high[name]].min()


def test_zeroed_neurons_and_heads_are_removed_without_changing_outputs():
    model, tok = tiny_model()
    dead_neurons, dead_heads = [1, 5, 9, 30], [2, 4]  # heads 2 and 4: one in each KV group of 3
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[dead_neurons] = 0  # silu(gate) * 0: no contribution
            w = layer.self_attn.o_proj.weight.view(48, 6, 8)
            w[:, dead_heads] = 0
    before = logits(model, tok)
    mlp, heads = width_importance(model, batches(tok), "activation")
    plan = plan_width(mlp, heads, model.config, mlp_sparsity=4 / 32, remove_heads=2, heads_mode="query")
    assert all(set(keep).isdisjoint(dead_neurons) and len(keep) == 28 for keep in plan.mlp_keep)
    assert plan.heads_keep == [[0, 1, 3, 5]] * 3 and plan.kv_keep == [[0, 1]] * 3
    shrink_width(model, plan)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (48, 28)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 48)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (
        4,
        2,
        8,
    )
    torch.testing.assert_close(logits(model, tok), before, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("importance", ["activation", "taylor"])
def test_zeroed_kv_group_is_removed_whole(importance):
    model, tok = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.view(48, 6, 8)[:, 3:6] = 0  # the 3 query heads of KV head 1
    before = logits(model, tok)
    mlp, heads = width_importance(model, batches(tok), importance)
    assert heads[:, 3:].abs().max() == 0 and heads[:, :3].min() > 0
    plan = plan_width(mlp, heads, model.config, mlp_sparsity=0.0, remove_heads=3, heads_mode="kv_group")
    assert plan.kv_keep == [[0]] * 3 and plan.heads_keep == [[0, 1, 2]] * 3
    shrink_width(model, plan)
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8, 48)
    torch.testing.assert_close(logits(model, tok), before, atol=1e-5, rtol=1e-4)


def test_identity_layer_is_dropped_without_changing_outputs():
    model, tok = tiny_model()
    with torch.no_grad():  # layer 1 adds nothing to the residual stream
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    before = logits(model, tok)
    influence = block_influence(model, batches(tok))
    assert influence[1] == pytest.approx(0.0, abs=1e-6) and influence[[0, 2]].min() > 1e-4
    keep = layers_to_keep(influence, 1)
    assert keep == [0, 2]
    drop_layers(model, keep)
    assert model.config.num_hidden_layers == 2 and model.config.kept_layers == [0, 2]
    torch.testing.assert_close(logits(model, tok), before, atol=1e-5, rtol=1e-4)
    drop_layers(model, [1])  # a second cut still records indices in the original model
    assert model.config.kept_layers == [2]


def test_pruned_model_round_trips_through_save_pretrained(tmp_path):
    model, tok = tiny_model()
    mlp, heads = width_importance(model, batches(tok))
    shrink_width(model, plan_width(mlp, heads, model.config, 0.5, 2, "query"))
    drop_layers(model, layers_to_keep(block_influence(model, batches(tok)), 1))
    magnitude = compute_masks(prunable_weights(model), 0.3)
    for name, w in prunable_weights(model).items():
        w.data.mul_(magnitude[name])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config.intermediate_size == 16 and loaded.config.num_hidden_layers == 2
    assert len(loaded.config.kept_layers) == 2
    assert sparsity_report(prunable_weights(loaded))["overall"] == pytest.approx(0.3, abs=1e-3)
    torch.testing.assert_close(logits(loaded, tok), logits(model, tok), atol=1e-6, rtol=1e-5)


def test_bad_head_and_layer_counts_say_what_is_valid():
    config = tiny_model()[0].config
    with pytest.raises(ValueError, match=r"remove_heads=6 but each layer has 6 query heads.*\[0, 2, 4\]"):
        check_width_args(config, 0.0, 6, "query")
    with pytest.raises(
        ValueError, match=r"remove_heads=1 breaks the GQA grouping.*multiple of 2.*\[0, 2, 4\]"
    ):
        check_width_args(config, 0.0, 1, "query")
    with pytest.raises(ValueError, match=r"remove_heads=2 breaks the GQA grouping.*group size 3.*\[0, 3\]"):
        check_width_args(config, 0.0, 2, "kv_group")
    with pytest.raises(ValueError, match=r"heads_mode='rows' is not one of"):
        StructuredPruning(heads_mode="rows")
    with pytest.raises(ValueError, match=r"remove_layers=3 but the model has 3 decoder layers.*0\.\.2"):
        layers_to_keep(torch.rand(3), 3)
    with pytest.raises(ValueError, match=r"remove_layers=-1"):
        DepthPruning(remove_layers=-1)


def test_a_pruned_config_transformers_would_refuse_is_named_before_export(tmp_path):
    config = tiny_model()[0].config  # 48 wide, 6 heads
    assert config_refusal(config, num_attention_heads=2) is None
    refusal = config_refusal(config, num_attention_heads=5)
    assert "hidden size (48) is not a multiple of the number of attention heads (5)" in refusal
    assert config.num_attention_heads == 6  # asked on a copy
    check_saveable(config, "prune=structured (x)")
    bad = copy.deepcopy(config)
    bad.num_attention_heads = 5  # setting the attribute checks nothing; saving does
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        bad.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"prune=structured \(x\) gives a model config that transformers"):
        check_saveable(bad, "prune=structured (x)")
