"""DDP on CPU (gloo, 2 processes) under Hydra: one run directory, synced metrics, the same result
as one process with the same global batch."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from llm_lightning.data.datamodule import LengthGroupedBatches
from llm_lightning.runtime import ddp as distributed
from llm_lightning.train import train
from tests.conftest import make_cfg, run_module

# 32 training examples, 4 steps of a global batch of 4; fp32 so the two runs compare tightly.
COMMON = ["precision='32'", "callbacks.progress_bar=null", "trainer.max_steps=4"]


def test_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    # A multirun of one job, with a run dir resolved from ${now:}: Lightning re-runs the command
    # line for rank 1, which without llm_lightning.runtime.ddp would relaunch the sweep itself.
    work = tmp_path / "cwd"
    work.mkdir()
    done = run_module(
        "llm_lightning.train",
        "-m",
        "model=tiny",
        "debug=smoke",
        *COMMON,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "batch_size=2",
        "hydra.sweep.dir=sweep/${now:%H-%M-%S-%f}",
        "+stamp=${now:%H-%M-%S-%f}",
        cwd=work,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (sweep,) = list((work / "sweep").iterdir())  # exactly one sweep directory...
    assert sorted(p.name for p in work.iterdir()) == ["sweep"]  # ...and no stray outputs/ or multirun/
    run = sweep / "0"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]
    assert [p.relative_to(work) for p in work.rglob("model.safetensors")] == [
        (run / "model" / "model.safetensors").relative_to(work)
    ]
    assert (run / "train_ddp_rank_1.log").exists()  # rank 1 ran, in the job's own directory
    ddp = json.loads((run / "metrics.json").read_text())

    single_dir = tmp_path / "single"
    single, _ = train(make_cfg(single_dir, [*COMMON, "trainer.accelerator=cpu", "batch_size=4"]))

    # Each rank evaluates half of val/test; equal metrics mean they were synced across ranks.
    for key in ("val/acc", "val/acc_best", "val/f1_macro", "test/acc", "test/f1_macro"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
    for key in ("val/loss", "test/loss"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-4), key
    a, b = (
        load_file(run / "model" / "model.safetensors"),
        load_file(single_dir / "model" / "model.safetensors"),
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_ddp_batches_are_the_single_process_global_batches():
    lengths = [(i * 7) % 23 + 1 for i in range(37)]
    single = LengthGroupedBatches(lengths, batch_size=6, seed=1, window=2)
    ranks = [
        LengthGroupedBatches(lengths, batch_size=3, seed=1, window=2, rank=r, world_size=2) for r in (0, 1)
    ]
    for s in [single, *ranks]:
        s.set_epoch(2)
    per_rank = [list(r) for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0])  # every rank takes the same number of steps
    merged = [sorted(x + y) for x, y in zip(*per_rank, strict=True)]
    # the same global batches, less the one-example remainder (37 = 6 x 6 + 1) no rank pair can split
    assert merged == [sorted(b) for b in single if len(b) > 1]
    assert len(list(single)) == len(merged) + 1
    assert not set(sum(per_rank[0], [])) & set(sum(per_rank[1], []))


def test_ranks_use_the_launchers_resolved_config(monkeypatch):
    """A value that resolves differently in each process (as ${now:} does a moment later, or an
    env var) is resolved once, by the launching process, and rank 1 gets that value."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF

    monkeypatch.delenv(distributed.RUN_CONFIG_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("FAKE_CLOCK", "12-00-00")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = ["model=tiny", "+stamp=${oc.env:FAKE_CLOCK}", "output_dir=/runs/${stamp}"]
        cfg = compose("train", overrides=overrides)
    launcher = distributed.shared_config(cfg)
    assert launcher.output_dir == "/runs/12-00-00" and "${" not in OmegaConf.to_yaml(launcher)

    monkeypatch.setenv("FAKE_CLOCK", "12-00-01")  # rank 1 starts a second later
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank1 = distributed.shared_config(cfg)
    assert rank1.output_dir == "/runs/12-00-00"
    assert OmegaConf.to_container(rank1) == OmegaConf.to_container(launcher)


def test_ungrouped_batches_are_sharded_across_ranks(tmp_path):
    from types import SimpleNamespace

    from llm_lightning.data import ClassificationDataModule, load_task
    from llm_lightning.models import load_classifier

    cfg = make_cfg(tmp_path, ["group_by_length=false"])
    data = load_task(cfg.task, cfg.seed)
    _, tokenizer = load_classifier(cfg.model, data.label_names)
    seen = []
    for rank in (0, 1):
        dm = ClassificationDataModule(data, tokenizer, 64, 4, 8, cfg.seed, group_by_length=False)
        dm.setup()
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, current_epoch=0)
        seen.append([i for b in dm.train_dataloader() for i in b["index"].tolist()])
    assert len(seen[0]) == len(seen[1]) == 16 and not set(seen[0]) & set(seen[1])
