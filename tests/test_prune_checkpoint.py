"""Checkpoints of structured- and depth-pruned runs load like the run's exported model/ (issue 4).

Pruning reshapes the model in a callback's `setup`, before training, so the model config a
checkpoint stores beside its weights (issue 19) already has the pruned shapes: `load_saved` and
`python -m llm_lightning.evaluate` rebuild them from it, with no pruning plan and no run config.
"""

from __future__ import annotations

import json

import pytest
import torch

from llm_lightning.models.saved import load_saved
from tests.conftest import run_module

TINY = ["model=tiny", "debug=smoke", "precision='32'"]
STRUCTURED = ["prune=structured", "prune.mlp_sparsity=0.5", "prune.remove_heads=2", "prune.batches=2"]
SHAPES = ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")
SHAPES += ("head_dim", "kept_layers")
DEPTH = ["model.num_layers=3", "prune=depth", "prune.remove_layers=1", "prune.batches=2"]


def train_run(path, *overrides: str) -> None:
    done = run_module("llm_lightning.train", *TINY, *overrides, f"hydra.run.dir={path}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    train_run(root / "structured", *STRUCTURED)
    train_run(root / "depth", *DEPTH)
    # KD from the depth run's model into a full copy of it, which depth pruning then halves.
    train_run(
        root / "kd_depth",
        "distill=kd",
        f"distill.teacher={root / 'depth' / 'model'}",
        "distill.student.num_layers=2",
        f"distill.cache.dir={root / 'cache'}",
        "prune=depth",
        "prune.remove_layers=1",
        "prune.batches=2",
    )
    return root


def logits(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(["a fine film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits


def best_checkpoint(run) -> str:
    return json.loads((run / "metrics.json").read_text())["best_checkpoint"]


@pytest.mark.parametrize("name", ["structured", "depth", "kd_depth"])
def test_pruned_checkpoint_loads_like_its_exported_model(runs, name):
    run = runs / name
    exported, tokenizer, names = load_saved(run / "model")
    from_best, _, best_names = load_saved(best_checkpoint(run))
    assert best_names == names == ["negative", "positive"]
    for key in SHAPES:
        assert getattr(from_best.config, key, None) == getattr(exported.config, key, None), key
    # The exported model holds the best weights (training tests the best checkpoint, then exports).
    exported_weights = exported.state_dict()
    for key, value in from_best.state_dict().items():
        assert torch.equal(value, exported_weights[key]), key
    # Not bit-equal: a checkpoint is rebuilt with the eager attention it stored, model/ loads with sdpa.
    torch.testing.assert_close(logits(from_best, tokenizer), logits(exported, tokenizer))
    from_last, _, _ = load_saved(run / "checkpoints" / "last.ckpt")
    shapes = {k: v.shape for k, v in exported.state_dict().items()}
    assert {k: v.shape for k, v in from_last.state_dict().items()} == shapes


def test_structured_checkpoint_has_the_pruned_shapes(runs):
    model, _, _ = load_saved(best_checkpoint(runs / "structured"))
    config = model.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (64, 2, 2)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (64, 64)
    assert model.model.layers[1].self_attn.q_proj.weight.shape == (2 * config.head_dim, 64)


@pytest.mark.parametrize("name", ["depth", "kd_depth"])
def test_depth_checkpoint_keeps_the_planned_layers(runs, name):
    run = runs / name
    keep = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["DepthPruning"][
        "keep"
    ]
    model, _, _ = load_saved(best_checkpoint(run))
    assert len(model.model.layers) == len(keep) == (2 if name == "depth" else 1)
    assert model.config.kept_layers == json.loads((run / "model" / "config.json").read_text())["kept_layers"]


@pytest.mark.parametrize("name", ["structured", "kd_depth"])
def test_evaluate_cli_on_a_pruned_checkpoint_matches_training(runs, tmp_path, name):
    run = runs / name
    done = run_module(
        "llm_lightning.evaluate",
        f"model_path={best_checkpoint(run)}",
        "task.limit=32",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    evaluated = json.loads((tmp_path / "metrics.json").read_text())
    trained = json.loads((run / "metrics.json").read_text())
    # Same weights, same seeded split, same precision: the same test metrics.
    assert evaluated["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(trained["test/loss"], abs=1e-5)


@pytest.mark.parametrize(("name", "key"), [("structured", "StructuredPruning"), ("depth", "DepthPruning")])
def test_checkpoint_needs_neither_its_pruning_plan_nor_its_run_config(runs, tmp_path, name, key):
    exported, _, _ = load_saved(runs / name / "model")
    state = torch.load(runs / name / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["callbacks"][key]  # the plan is there; the rebuild does not use it
    del state["callbacks"][key]
    ckpt = tmp_path / "last.ckpt"  # no .hydra/config.yaml above it
    torch.save(state, ckpt)
    model, _, _ = load_saved(ckpt)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in exported.state_dict().items()
    }
    for attr in SHAPES:
        assert getattr(model.config, attr, None) == getattr(exported.config, attr, None), attr
