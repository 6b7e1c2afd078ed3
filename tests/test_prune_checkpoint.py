"""Checkpoints of structured- and depth-pruned runs load like the run's exported model/ (issue 4).

The run config describes the model before pruning; the pruning plan in the checkpoint must
reshape it before the weights load, for `load_saved` and for `python -m llm_lightning.evaluate`.
"""

from __future__ import annotations

import json
import shutil

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
    # Not bit-equal: a checkpoint is rebuilt with the run's eager attention, model/ loads with sdpa.
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


def copy_run(run, to) -> tuple:
    """The run's config and last checkpoint, copied so a test can spoil one of them."""
    shutil.copytree(run / ".hydra", to / ".hydra")
    ckpt = to / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", ckpt)
    return to / ".hydra" / "config.yaml", ckpt


@pytest.mark.parametrize(("name", "key"), [("structured", "StructuredPruning"), ("depth", "DepthPruning")])
def test_checkpoint_without_its_pruning_plan_is_a_clear_error(runs, tmp_path, name, key):
    _, ckpt = copy_run(runs / name, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    del state["callbacks"][key]
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match=rf"prune={name}, but its checkpoint holds no pruning plan"):
        load_saved(ckpt)


def test_checkpoint_whose_config_lost_the_pruning_is_a_clear_error(runs, tmp_path):
    config, ckpt = copy_run(runs / "structured", tmp_path)
    config.write_text(config.read_text().replace("method: structured", "method: none"))
    with pytest.raises(
        ValueError, match=r"does not fit the model rebuilt .* size mismatch for model\.layers"
    ):
        load_saved(ckpt)
