"""The hidden-state projection belongs to the module's loss: in the checkpoint with its optimizer
state, restored on resume, also from a checkpoint written when the distillation callback set it
on the module as `distill_hidden` (before issue 20)."""

from __future__ import annotations

import pytest
import torch

from llm_lightning.models import load_classifier
from llm_lightning.models.export import export_model
from llm_lightning.train import train
from tests.conftest import make_cfg, tiny_model_cfg

NARROW_STUDENT = [  # narrower than the teacher: the projection is a Linear that trains
    "distill=kd",
    "distill.student.from_teacher=false",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "distill.hidden_weight=1.0",
    "test=false",
    "export=false",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_resume")
    model, tok = load_classifier(tiny_model_cfg(num_layers=2), ["negative", "positive"])
    teacher = export_model(model, tok, root / "teacher" / "model")
    overrides = [*NARROW_STUDENT, f"distill.teacher={teacher}", f"distill.cache.dir={root / 'cache'}"]
    metrics, objects = train(make_cfg(root / "student", overrides))
    proj = objects["module"].criterion.hidden.proj
    trained = {k: v.detach().clone() for k, v in proj.state_dict().items()}
    moments = objects["trainer"].optimizers[0].state[proj.weight]["exp_avg"].clone()
    return root / "student", overrides, trained, moments, objects["trainer"].global_step


def _resumed(out, overrides, ckpt: str):
    _, objects = train(make_cfg(out, [*overrides, f"ckpt_path={ckpt}"]))
    return objects


def test_the_projection_is_checkpointed_with_its_optimizer_state_and_resumes_exactly(run):
    out, overrides, trained, moments, steps = run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    for name, value in trained.items():
        assert torch.equal(ckpt["state_dict"][f"criterion.hidden.proj.{name}"], value), name
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert len(groups) == 3 and groups[2]["weight_decay"] == 0.0  # decay, no decay, the projection
    objects = _resumed(out, overrides, "last")
    assert objects["trainer"].global_step == steps  # restored at the end: nothing more to train
    proj = objects["module"].criterion.hidden.proj
    for name, value in proj.state_dict().items():
        assert torch.equal(value, trained[name]), name  # not the fresh random init of a new run
    torch.testing.assert_close(objects["trainer"].optimizers[0].state[proj.weight]["exp_avg"], moments)


def test_a_checkpoint_with_the_old_projection_key_resumes_into_the_loss(run):
    out, overrides, trained, _, _ = run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    for name in trained:
        state[f"distill_hidden.proj.{name}"] = state.pop(f"criterion.hidden.proj.{name}")
    old = out / "checkpoints" / "before-issue-20.ckpt"
    torch.save(ckpt, old)
    proj = _resumed(out, overrides, str(old))["module"].criterion.hidden.proj
    for name, value in proj.state_dict().items():
        assert torch.equal(value, trained[name]), name
