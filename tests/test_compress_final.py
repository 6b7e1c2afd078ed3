"""`final_among`: the chain's quantized and deploy forms are made from the named stage whose run
reached the best validation accuracy, chosen after training, and the report says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llm_lightning.compress import compress, prepare, train_stages
from llm_lightning.errors import UserError


def with_validation(out: Path, **scores: float) -> None:
    """Each stage's val/acc_best as its run's metrics.json records it (what the choice reads)."""
    for stage, value in scores.items():
        metrics = out / stage / "metrics.json"
        metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "val/acc_best": value}))


def quantized_input(out: Path) -> dict:
    return json.loads((out / "quantized" / "stage.json").read_text())["inputs"]


def test_the_final_model_is_the_named_stage_with_the_best_validation_accuracy(chain, capsys):
    out = Path(chain.out)
    chain.final_among = ["pruned", "distilled"]
    chain.quantize = {**chain.quantize, "smoothquant_alpha": None, "fuse_projections": False}  # quicker
    fingerprints = {s: f.value for s, f in train_stages(chain).fingerprints.items()}

    with_validation(out, pruned=0.9, distilled=0.6)
    report = compress(chain)
    assert report["stages"][-1]["input"] == "pruned"
    assert quantized_input(out) == {"pruned": fingerprints["pruned"]}
    assert report["final_choice"] == {
        "stage": "pruned",
        "by": "val/acc_best",
        "among": {"pruned": 0.9, "distilled": 0.6},
    }
    assert report["fastest_final"]["among"] == ["pruned", "quantized (int8_dynamic)"]
    assert "[compress] final model: pruned, chosen on val/acc_best (pruned 0.9000, distilled 0.6000)" in (
        capsys.readouterr().out
    )
    assert "The final model is **pruned**, chosen on the validation split" in (out / "report.md").read_text()

    with_validation(out, pruned=0.6, distilled=0.6)  # a tie: the stage listed first
    assert compress(chain)["final_choice"]["stage"] == "pruned"

    with_validation(out, pruned=0.5, distilled=0.7)  # the other way: quantized is made again, from distilled
    report = compress(chain)
    assert report["stages"][-1]["input"] == "distilled"
    assert quantized_input(out) == {"distilled": fingerprints["distilled"]}


def test_final_among_a_stage_the_chain_does_not_have_is_refused_before_anything_runs(chain):
    chain.final_among = ["distilled", "distiled"]
    with pytest.raises(UserError, match=r"final_among=.* names \['distiled'\], not stages of this chain"):
        prepare(chain)
    assert not Path(chain.out).exists()
