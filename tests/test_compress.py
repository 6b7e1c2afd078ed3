"""The one-command chain on the tiny model: fine-tune, prune, distil, quantize, report; then resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import llm_lightning.train
from llm_lightning.compress import compress, load_chain, merged_overrides


def test_later_overrides_of_the_same_key_win():
    merged = merged_overrides(
        ["model=tiny", "debug=smoke", "trainer.max_steps=4"], ["model=hf", "+extra=1", "trainer.max_steps=9"]
    )
    assert merged == ["debug=smoke", "model=hf", "+extra=1", "trainer.max_steps=9"]


@pytest.fixture
def chain(tmp_path):
    chain = load_chain(["recipe=quick_15_layers"])
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


def test_more_stages_run_in_order_each_from_the_one_it_names(chain, monkeypatch):
    """Pruning twice: each stage starts from the model it names, the last one is quantized, and
    only stages that prune (and the quantized one) must be faster than their input."""
    prune_one = ["model=hf", "prune=depth", "prune.remove_layers=1", "trainer.max_steps=0"]
    chain.stages = {
        "teacher": ["model.num_layers=3"],
        "pruned": [*prune_one, "model.name_or_path={teacher}"],
        "retrained": ["model=hf", "model.name_or_path={pruned}"],
        "pruned_again": [*prune_one, "model.name_or_path={retrained}"],
    }
    chain.quantize = {**chain.quantize, "smoothquant_alpha": None, "fuse_projections": False}
    report = compress(chain)
    out = Path(chain.out)
    assert OmegaConf.load(out / "pruned_again/.hydra/config.yaml").model.name_or_path == str(
        out / "retrained/model"
    )
    stages = [(r["stage"], r["input"], r["compressed"], r["params"]) for r in report["stages"]]
    assert [s[:3] for s in stages] == [
        ("teacher", None, False),
        ("pruned", "teacher", True),
        ("retrained", "pruned", False),
        ("pruned_again", "retrained", True),
        ("quantized (int8_dynamic)", "pruned_again", True),
    ]
    params = [s[3] for s in stages]
    assert params[0] > params[1] == params[2] > params[3] == params[4]  # 3 layers, then 2, then 1


@pytest.mark.parametrize(
    "stages",
    [
        {"pruned": [], "teacher": []},  # teacher not first
        {"teacher": [], "quantized": []},  # the quantized stage's folder
        {"teacher": [], "Pruned/2": []},  # not a plain folder name
    ],
)
def test_a_chain_that_does_not_start_from_the_teacher_or_names_a_stage_badly_is_refused(chain, stages):
    chain.stages = stages
    with pytest.raises(ValueError, match=r"compress stages .*: the first must be 'teacher'.*key `stages`"):
        compress(chain)
    assert not Path(chain.out).exists()  # refused before anything ran


def test_the_default_gradual_recipe_runs_its_stages_in_order(tmp_path):
    """The default recipe, conf/recipes/gradual_11_layers.yaml, wired end to end on a 20-layer tiny
    model: 15, 3 and 1 layers pruned in turn, each step distilled from the teacher (on 48 transfer
    texts, not 30,000)."""
    common = "common=[model=tiny,debug=smoke,bench=quick,runtime.threads=1]"
    chain = load_chain([f"out={tmp_path / 'chain'}", common])
    assert chain.recipe == "gradual_11_layers"
    assert list(chain.stages) == [
        "teacher",
        "layers15",
        "layers15_more",
        "layers12",
        "layers12_more",
        "layers11",
    ]
    assert chain.quantize.method == "int8_dynamic"  # the shipped quantize settings stay
    chain.stages.teacher = ["model.num_layers=20"]
    for stage in list(chain.stages)[1:]:
        chain.stages[stage] = [*chain.stages[stage], "distill.transfer.limit=48"]
    chain.quantize = {**chain.quantize, "compile": False, "smoothquant_alpha": None}
    report = compress(chain)
    layers = {
        s: OmegaConf.load(tmp_path / "chain" / s / "model" / "config.json").num_hidden_layers
        for s in chain.stages
    }
    assert layers == {
        "teacher": 20,
        "layers15": 5,
        "layers15_more": 5,
        "layers12": 2,
        "layers12_more": 2,
        "layers11": 1,
    }
    assert [(r["stage"], r["compressed"]) for r in report["stages"]] == [
        ("teacher", False),
        ("layers15", True),
        ("layers15_more", False),
        ("layers12", True),
        ("layers12_more", False),
        ("layers11", True),
        ("quantized (int8_dynamic)", True),
    ]


def test_an_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(
        FileNotFoundError,
        match=r"recipe='gradual'.*shipped recipes: \['gradual_11_layers', 'quick_15_layers'\]",
    ):
        load_chain(["recipe=gradual"])


def test_no_recipe_and_no_stages_is_refused_before_anything_runs(tmp_path):
    chain = load_chain(["recipe=null", f"out={tmp_path / 'chain'}"])
    with pytest.raises(ValueError, match=r"compress stages \[\]: .*key `stages` of the recipe"):
        compress(chain)
    assert not (tmp_path / "chain").exists()
