"""Config composition: every group choice composes, and mistakes get Hydra's list of choices."""

from __future__ import annotations

import pytest
from hydra.errors import MissingConfigException

from tests.conftest import make_cfg, run_module


@pytest.mark.parametrize(
    "precision,expected",
    [
        ("'32'", 32),
        ("32-true", "32-true"),
        ("16-mixed", "16-mixed"),
        ("bf16-mixed", "bf16-mixed"),
        ("auto", "auto"),
    ],
)
def test_precision_group_maps_to_lightning_precision(tmp_path, precision, expected):
    cfg = make_cfg(tmp_path, [f"precision={precision}"])
    assert cfg.trainer.precision == expected


@pytest.mark.parametrize("choice", ["full", "freeze", "gradual_unfreeze", "lora"])
def test_every_finetune_choice_composes(tmp_path, choice):
    assert make_cfg(tmp_path, [f"finetune={choice}"]).finetune.method == choice


def test_default_run_is_the_documented_recipe(tmp_path):
    cfg = make_cfg(tmp_path, [])
    assert (cfg.task.name, cfg.finetune.method, cfg.trainer.precision) == ("sentiment", "full", "auto")


@pytest.mark.parametrize(
    "flags,expected",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed"),
        ({"avx2", "amx_bf16"}, "bf16-mixed"),
        ({"avx2"}, "32-true"),
    ],
)
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it(flags, expected):
    from llm_lightning.runtime import resolved_precision

    assert resolved_precision("auto", flags=flags, cuda=False) == expected
    assert resolved_precision("16-mixed", flags=flags, cuda=False) == "16-mixed"  # a choice is kept


def test_unknown_choice_lists_the_valid_ones(tmp_path):
    with pytest.raises(MissingConfigException) as e:
        make_cfg(tmp_path, ["finetune=qlora"])
    msg = str(e.value)
    assert "qlora" in msg and all(c in msg for c in ("full", "freeze", "gradual_unfreeze", "lora"))


def test_unknown_choice_on_the_command_line(tmp_path):
    done = run_module("llm_lightning.train", "precision=fp8", f"hydra.run.dir={tmp_path}")
    assert done.returncode != 0
    assert "fp8" in done.stderr and "bf16-mixed" in done.stderr and "16-mixed" in done.stderr
