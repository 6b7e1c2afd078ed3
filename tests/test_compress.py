"""The one-command chain on the tiny model: fine-tune, prune, distil, quantize, report; then resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import llm_lightning.train
from llm_lightning.compress import CONF, compress, merged_overrides


def test_later_overrides_of_the_same_key_win():
    merged = merged_overrides(
        ["model=tiny", "debug=smoke", "trainer.max_steps=4"], ["model=hf", "+extra=1", "trainer.max_steps=9"]
    )
    assert merged == ["debug=smoke", "model=hf", "+extra=1", "trainer.max_steps=9"]


@pytest.fixture
def chain(tmp_path):
    chain = OmegaConf.load(CONF / "compress.yaml")
    return OmegaConf.merge(
        chain,
        {
            "out": str(tmp_path / "chain"),
            "common": ["model=tiny", "debug=smoke", "bench=quick", "runtime.threads=1"],
            # the tiny model has 2 layers: drop 1
            "stages": {
                "pruned": [
                    "model=hf",
                    "model.name_or_path={teacher}",
                    "prune=depth",
                    "prune.remove_layers=1",
                ],
                # the shipped recipe's transfer set, cut to a few texts: the tiny teacher labels them too
                "distilled": [*chain.stages.distilled, "distill.transfer.limit=48"],
            },
            "quantize": {"compile": False},
        },
    )


def test_chain_exports_every_stage_reports_them_and_resumes(chain, monkeypatch):
    report = compress(chain)
    out = chain.out
    for path in (
        "teacher/model/config.json",
        "pruned/model/config.json",
        "distilled/model/config.json",
        "quantized/quantization.json",
        "report.json",
        "report.md",
        "pareto.png",
    ):
        assert (Path(out) / path).exists(), path
    stages = [(r["stage"], r["input"], r["compressed"]) for r in report["stages"]]
    assert stages == [
        ("teacher", None, False),
        ("pruned", "teacher", True),
        ("distilled", "pruned", False),
        ("quantized (int8_dynamic)", "distilled", True),
    ]
    params = [r["params"] for r in report["stages"]]
    assert params[1] < params[0] and params[2] == params[1] == params[3]  # one of two layers removed
    # The distilled stage trained from the pruned model, with the teacher's soft labels.
    distilled = OmegaConf.load(f"{out}/distilled/.hydra/config.yaml")
    assert distilled.distill.method == "kd" and distilled.distill.teacher.endswith("teacher/model")
    assert distilled.model.name_or_path.endswith("pruned/model")
    assert distilled.distill.transfer.source == "imdb_sentences" and distilled.distill.transfer.limit == 48
    assert json.loads(open(f"{out}/report.json").read())["runtime"] == {"threads": 1}

    def no_training(cfg):
        raise AssertionError(f"stage in {cfg.output_dir} ran again")

    monkeypatch.setattr(llm_lightning.train, "train", no_training)
    again = compress(chain)  # every stage exists: nothing is retrained, the report is measured again
    assert [r["stage"] for r in again["stages"]] == [s for s, _, _ in stages]


def test_unknown_stage_is_refused(chain):
    chain.stages.sparsify = []
    with pytest.raises(
        ValueError, match=r"\['sparsify'\] are not among \('teacher', 'pruned', 'distilled'\)"
    ):
        compress(chain)
