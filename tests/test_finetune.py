"""Fine-tuning methods: what trains, what backward touches, schedules that survive resume, LoRA export."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from llm_lightning.callbacks.finetune import GradualUnfreeze, LayerFreeze
from llm_lightning.models import decoder_parts, load_exported
from llm_lightning.models.export import export_model
from llm_lightning.train import build, train

LAYERS = ["model.num_layers=4"]


def trainable_names(module) -> set[str]:
    return {n for n, p in module.model.named_parameters() if p.requires_grad}


def test_freeze_trains_top_layers_norm_and_head_only(tiny_cfg):
    cfg = tiny_cfg([*LAYERS, "finetune=freeze", "finetune.trainable_layers=1"])
    module, dm, _, callbacks = build(cfg)
    freeze = next(c for c in callbacks if isinstance(c, LayerFreeze))
    freeze.freeze_before_training(module)
    names = trainable_names(module)
    assert names and all(n.startswith(("model.layers.3.", "model.norm", "score")) for n in names)
    assert any(n.startswith("model.layers.3.") for n in names) and "score.weight" in names


def test_frozen_layers_get_no_backward_pass(tiny_cfg):
    """The point of freezing: autograd stops at the lowest trainable layer."""
    cfg = tiny_cfg([*LAYERS, "finetune=freeze", "finetune.trainable_layers=2"])
    module, dm, _, callbacks = build(cfg)
    next(c for c in callbacks if isinstance(c, LayerFreeze)).freeze_before_training(module)
    _, layers, _ = decoder_parts(module.model)
    calls = []
    for i, layer in enumerate(layers):
        layer.register_full_backward_hook(lambda *_, i=i: calls.append(i))
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module(batch["input_ids"], batch["attention_mask"]).sum().backward()
    assert sorted(set(calls)) == [2, 3]
    assert all(p.grad is None for p in layers[1].parameters())


def test_trainable_layers_out_of_range_is_clear(tiny_cfg):
    cfg = tiny_cfg([*LAYERS, "finetune=freeze", "finetune.trainable_layers=9"])
    module, *_, callbacks = build(cfg)
    with pytest.raises(ValueError, match=r"trainable_layers=9 but the model has only 4 .*0\.\.4"):
        next(c for c in callbacks if isinstance(c, LayerFreeze)).freeze_before_training(module)


class Record(Callback):
    def __init__(self):
        self.unfrozen, self.trainable = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        sched = next(c for c in trainer.callbacks if isinstance(c, GradualUnfreeze))
        self.unfrozen.append(sched.unfrozen)
        self.trainable.append(pl_module.trainable_parameters())


def test_gradual_unfreeze_follows_schedule_and_resumes(tiny_cfg, tmp_path):
    over = [
        *LAYERS,
        "finetune=gradual_unfreeze",
        "finetune.trainable_layers=1",
        "finetune.layers_per_step=1",
        "trainer.max_epochs=3",
        "trainer.max_steps=-1",
        "task.limit=8",
        "trainer.val_check_interval=1.0",
        "test=false",
        "export=false",
        "callbacks=none",
    ]
    cfg = tiny_cfg(over)
    module, dm, tok, callbacks = build(cfg)
    record = Record()
    import lightning as L

    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[*callbacks, record],
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert record.unfrozen == [1, 2, 3]
    assert record.trainable[0] < record.trainable[1] < record.trainable[2]
    # New param groups follow the LR schedule too (not left at a constant LR).
    opt = trainer.optimizers[0]
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert len(sched.base_lrs) == len(opt.param_groups) == 4
    ckpt = trainer.checkpoint_callback.last_model_path or trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt, weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if "GradualUnfreeze" in k)
    assert saved["unfrozen"] == 3
    fresh = GradualUnfreeze(1, 1, 1)
    fresh.load_state_dict(saved)
    assert fresh.unfrozen == 3


def test_lora_trains_adapters_and_head_and_exports_merged(tiny_cfg, tmp_path):
    cfg = tiny_cfg([*LAYERS, "finetune=lora"])
    metrics, objs = train(cfg)
    module = objs["module"]
    names = trainable_names(module)
    assert names and all("lora_" in n or "score" in n for n in names)
    assert metrics["train/trainable_params"] < 0.5 * metrics["train/total_params"]
    plain, tok = load_exported(tmp_path / "model")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    enc = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    module.model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**enc).logits, module.model(**enc).logits, atol=1e-4, rtol=1e-4)


def test_export_replaces_an_old_model_only_when_complete(tiny_cfg, tmp_path):
    cfg = tiny_cfg(LAYERS)
    module, dm, tok, _ = build(cfg)
    export_model(module.model, tok, tmp_path / "model")
    before = (tmp_path / "model" / "model.safetensors").read_bytes()

    class Broken(torch.nn.Module):
        def save_pretrained(self, *a, **k):
            raise OSError("disk full")

    with pytest.raises(OSError):
        export_model(Broken(), tok, tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
