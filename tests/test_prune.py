"""Pruning callbacks inside Lightning: sparsity per step, resume, export, and the CLI end to end."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llm_lightning.callbacks.prune import DepthPruning, MagnitudePruning, StructuredPruning
from llm_lightning.pruning import prunable_weights, sparsity_report
from llm_lightning.train import build, train
from tests.conftest import make_cfg, run_module

CUBIC = [
    "prune=magnitude",
    "prune.schedule.kind=cubic",
    "prune.schedule.start_step=1",
    "prune.schedule.end_step=7",
    "prune.schedule.frequency=2",
    "prune.sparsity=0.6",
    "prune.scope=layer",
]


def expected_cubic(step: int) -> float:
    """Zhu & Gupta with s_i=0, s_f=0.6, t0=1, n*dt=6, dt=2, written out independently."""
    if step < 1:
        return 0.0
    t = min(step - 1, 6)
    t = t if t == 6 else t - t % 2
    return 0.6 * (1 - (1 - t / 6) ** 3)


class SaveAt(Callback):
    """Write a checkpoint right after optimizer step `step`, as a run killed there would have left."""

    def __init__(self, step: int, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


class Recorder(Callback):
    """Measured sparsity of the weights each forward pass sees, by optimizer step."""

    def __init__(self):
        self.seen: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step] = sparsity_report(prunable_weights(pl_module.model))["overall"]


def fit(tmp_path, overrides, max_steps, ckpt_path=None, extra=()):
    cfg = make_cfg(tmp_path, ["callbacks=none", "finetune=full", *overrides])
    module, datamodule, _, callbacks = build(cfg)
    recorder = Recorder()
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[*callbacks, recorder, *extra],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, module, recorder


def test_sparsity_follows_cubic_schedule_each_step(tmp_path):
    trainer, module, recorder = fit(tmp_path, CUBIC, max_steps=9)
    assert sorted(recorder.seen) == list(range(9))
    for step, measured in recorder.seen.items():
        assert measured == pytest.approx(expected_cubic(step), abs=2e-3), step
    # Masks are re-applied after each optimizer step and made permanent at the end.
    assert sparsity_report(prunable_weights(module.model))["overall"] == pytest.approx(0.6, abs=2e-3)
    assert not [k for k in module.model.state_dict() if k.endswith(("_orig", "_mask"))]  # plain weights
    pruner = next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))
    assert pruner.sparsity == pytest.approx(0.6)
    assert "prune/sparsity_layer_01" in trainer.callback_metrics


def test_interrupted_magnitude_run_resumes_at_same_schedule_position(tmp_path):
    # Random scores do not depend on the trained weights, so both runs must prune the same entries
    # (resumed training itself is not bit-identical, which would move L1 masks at the margin).
    overrides = [*CUBIC, "prune.importance=random"]
    _, whole_module, whole = fit(tmp_path / "whole", overrides, max_steps=9)
    ckpt = tmp_path / "interrupted.ckpt"
    _, _, first = fit(tmp_path / "first", overrides, max_steps=4, extra=[SaveAt(4, ckpt)])
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("MagnitudePruning"))
    assert saved["sparsity"] == pytest.approx(expected_cubic(3)) and saved["masks"] is not None
    _, resumed_module, second = fit(tmp_path / "second", overrides, max_steps=9, ckpt_path=ckpt)
    assert sorted(second.seen) == list(range(4, 9))
    combined = {**first.seen, **second.seen}
    assert combined == pytest.approx(whole.seen, abs=1e-6)
    for (name, a), b in zip(
        prunable_weights(whole_module.model).items(),
        prunable_weights(resumed_module.model).values(),
        strict=True,
    ):
        assert torch.equal(a == 0, b == 0), name  # the same weights pruned


def test_interrupted_structured_run_rebuilds_the_same_shapes(tmp_path):
    overrides = ["prune=structured", "prune.mlp_sparsity=0.25", "prune.remove_heads=2", "prune.batches=2"]
    ckpt = tmp_path / "interrupted.ckpt"
    trainer, _, _ = fit(tmp_path / "first", overrides, max_steps=2, extra=[SaveAt(2, ckpt)])
    plan = next(c for c in trainer.callbacks if isinstance(c, StructuredPruning)).plan
    trainer2, module2, recorder = fit(tmp_path / "second", overrides, max_steps=4, ckpt_path=ckpt)
    assert sorted(recorder.seen) == [2, 3]
    assert next(c for c in trainer2.callbacks if isinstance(c, StructuredPruning)).plan == plan
    assert module2.model.config.intermediate_size == 96 and module2.model.config.num_attention_heads == 2


def test_depth_run_exports_kept_layers_and_trains_top_layers(tmp_path):
    # The recovery experiment (depth pruning, then fine-tuning the top layers), scaled to the tiny model.
    cfg = make_cfg(
        tmp_path,
        [
            "experiment=prune_recover",
            "prune.remove_layers=2",
            "prune.batches=2",
            "model.num_layers=4",
            "finetune.trainable_layers=1",
            "callbacks=none",
            "test=false",
        ],
    )
    assert (cfg.prune.method, cfg.finetune.method) == ("depth", "freeze")
    metrics, objects = train(cfg)
    model = objects["module"].model
    assert len(model.model.layers) == 2
    # Freezing counted the pruned stack: only its top layer, the norm and the head train.
    assert not any(p.requires_grad for p in model.model.layers[0].parameters())
    assert all(p.requires_grad for p in model.model.layers[1].parameters())
    exported = json.loads((tmp_path / "model" / "config.json").read_text())
    assert exported["num_hidden_layers"] == 2 and len(exported["kept_layers"]) == 2
    assert metrics["train/total_params"] < 4e5
    assert any(isinstance(c, DepthPruning) for c in objects["trainer"].callbacks)


def test_structured_pruning_end_to_end_cli(tmp_path):
    done = run_module(
        "llm_lightning.train",
        "model=tiny",
        "debug=smoke",
        "prune=structured",
        "prune.mlp_sparsity=0.5",
        "prune.remove_heads=2",
        "prune.importance=taylor",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert (model.config.intermediate_size, model.config.num_attention_heads) == (64, 2)
    assert model.model.layers[0].mlp.up_proj.weight.shape == (64, 64)
    assert model(**tok(["a fine film"], return_tensors="pt")).logits.shape == (1, 2)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0


def test_bad_remove_heads_fails_the_cli_with_valid_choices(tmp_path):
    cfg = make_cfg(tmp_path, ["prune=structured", "prune.remove_heads=1"])  # 4 heads share 2 KV heads
    with pytest.raises(ValueError, match=r"breaks the GQA grouping.*Valid: \[0, 2\]"):
        train(cfg)
