"""Fault tolerance: data-only checkpoint loading, atomic saves, NaN stops, exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from llm_lightning import artifacts as checkpoint_io
from llm_lightning.artifacts import SafeCheckpointIO, UnsafeCheckpointError, resolve_ckpt_path, safe_load
from llm_lightning.data.datamodule import LengthGroupedBatches
from llm_lightning.models.saved import load_saved
from llm_lightning.train import train
from tests.conftest import make_cfg, run_module


class _RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def malicious_ckpt(tmp_path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    # A real run config beside it, so load_saved gets as far as reading the file.
    OmegaConf.save(make_cfg(run), run / ".hydra" / "config.yaml")
    marker = tmp_path / "pwned"
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save(
        {
            "state_dict": {"model.w": torch.zeros(1)},
            "hyper_parameters": {"label_names": ["a", "b"]},
            "payload": _RunsCode(marker),
        },
        ckpt,
    )
    return ckpt, marker


def test_malicious_checkpoint_is_refused_everywhere(malicious_ckpt):
    ckpt, marker = malicious_ckpt
    for load in (safe_load, lambda p: SafeCheckpointIO().load_checkpoint(p), load_saved):
        with pytest.raises(UnsafeCheckpointError, match=r"Refusing to load .*last\.ckpt.*could run code"):
            load(ckpt)
        assert not marker.exists(), "the checkpoint's code ran"
    # The file really is malicious: an unsafe load runs its payload.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_train_refuses_to_resume_from_a_malicious_checkpoint(malicious_ckpt):
    ckpt, marker = malicious_ckpt
    cfg = make_cfg(ckpt.parent.parent, [f"ckpt_path={ckpt}", "~logger", "callbacks=none"])
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load"):
        train(cfg)
    assert not marker.exists()


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def dies_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("killed during save")

    monkeypatch.setattr(checkpoint_io.torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="killed during save"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    kept = io.load_checkpoint(path)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "temporary file left behind"


def test_ckpt_path_last_without_a_checkpoint_says_how_to_resume(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"hydra.run.dir=<run dir> ckpt_path=last"):
        resolve_ckpt_path(make_cfg(tmp_path, ["ckpt_path=last"]))
    assert resolve_ckpt_path(make_cfg(tmp_path)) is None


def test_sampler_resumes_after_the_batches_already_trained():
    sampler = LengthGroupedBatches(list(range(40)), batch_size=4, seed=3, window=2)
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.resume_at(epoch=1, batches_done=3)
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # only the first pass after a resume skips
    sampler.resume_at(epoch=0, batches_done=3)  # a stale position from another epoch is ignored
    assert list(sampler) == full


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = make_cfg(
        tmp_path,
        [
            "+callbacks.poison._target_=tests.faults.PoisonAtStep",
            "+callbacks.poison.step=3",
            "callbacks.progress_bar=null",
            "callbacks.lr_monitor=null",
            "~logger",
        ],
    )
    with pytest.raises(FloatingPointError, match=r"Loss is nan at global step 3 "):
        train(cfg)
    last = safe_load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2  # saved at the validation after step 2, before the NaN
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


# Two epochs of 8 batches, validation (and last.ckpt) after batches 3 and 6 of each; the kill lands
# before step 13, so the resume starts mid-epoch 1 from the checkpoint of step 11, after a gradual
# unfreeze at the epoch boundary.
RESUME = [
    "trainer.max_steps=-1",
    "trainer.max_epochs=2",
    "trainer.val_check_interval=3",
    "eval_batch_size=32",
    "callbacks.progress_bar=null",
    "callbacks.early_stopping.patience=100",
    "finetune=gradual_unfreeze",
    "finetune.trainable_layers=1",
    "finetune.layers_per_step=1",
]


def test_sigkilled_run_resumes_to_the_same_weights_and_metrics(tmp_path):
    killed = tmp_path / "killed"
    done = run_module(
        "llm_lightning.train",
        "model=tiny",
        "debug=smoke",
        *RESUME,
        f"hydra.run.dir={killed}",
        "+callbacks.kill._target_=tests.faults.KillAtStep",
        "+callbacks.kill.step=13",
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not (killed / "metrics.json").exists()
    assert safe_load(killed / "checkpoints" / "last.ckpt")["global_step"] == 11

    resumed, _ = train(make_cfg(killed, [*RESUME, "ckpt_path=last"]))
    reference, _ = train(make_cfg(tmp_path / "reference", RESUME))

    assert resumed["train/trainable_params"] == reference["train/trainable_params"]  # unfreeze schedule
    for key in ("val/acc", "val/loss", "val/acc_best", "val/f1_macro", "test/acc", "test/loss"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-5), key
    assert Path(resumed["best_checkpoint"]).name == Path(reference["best_checkpoint"]).name
    a = load_file(killed / "model" / "model.safetensors")
    b = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
    written = json.loads((killed / "metrics.json").read_text())  # the resumed run finished the job
    assert written["test/acc"] == resumed["test/acc"]


def test_atomic_dir_gets_the_permissions_of_a_plain_mkdir(tmp_path):
    """mkdtemp makes 0700 folders; an exported model must be readable like any other folder."""
    import os

    from llm_lightning.artifacts import atomic_dir

    umask = os.umask(0o022)
    try:
        target = atomic_dir(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"))
    finally:
        os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o755
