"""`quantize.smoothquant_alpha: auto`: alpha chosen by agreement with fp32 on the validation split."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llm_lightning.data.agreement import agreement, logits
from llm_lightning.measure.stage_report import report_for_run
from llm_lightning.models.export import export_model
from llm_lightning.quantization.saved import META_FILE
from llm_lightning.quantization.smoothquant import choose_alpha
from llm_lightning.quantization.torchao_path import quantize_model
from llm_lightning.quantize import quantize_run
from tests.conftest import make_cfg

TEXTS = ["a gorgeous, moving film", "dull and far too long", "fine", "an utter mess of a plot", "I laughed"]


def rows(tokenizer) -> list[list[int]]:
    return tokenizer(TEXTS)["input_ids"]


def test_auto_keeps_the_alpha_whose_model_agrees_best(tiny, caplog):
    model, tokenizer = tiny
    caplog.set_level("INFO", logger="llm_lightning.quantization.smoothquant")

    def quantize(each, alpha):  # stands in for int8: a head that drifts with |alpha - 0.4|
        with torch.no_grad():
            if alpha == 0.7:
                each.score.weight.neg_()  # every prediction flips
            else:
                each.score.weight.mul_(1 + abs(alpha - 0.4))  # same predictions, other margins
        return each

    chosen, results = choose_alpha(model, quantize, rows(tokenizer), tokenizer.pad_token_id, (0.3, 0.4, 0.7))
    assert chosen == 0.4
    by_alpha = {r["alpha"]: r for r in results}
    assert by_alpha[0.7]["flips"] == len(TEXTS) and by_alpha[0.3]["flips"] == 0
    assert by_alpha[0.4]["margin_mae"] < 1e-6 < by_alpha[0.3]["margin_mae"]
    # progress: a line before the first pass, then one per candidate with its count
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(f"quantize.smoothquant_alpha=auto: the fp32 model's logits on {len(TEXTS)}")
    assert [line.split(":")[0] for line in lines[1:4]] == [
        "SmoothQuant alpha 0.30 (1 of 3)",
        "SmoothQuant alpha 0.40 (2 of 3)",
        "SmoothQuant alpha 0.70 (3 of 3)",
    ]


def test_logits_come_back_in_the_rows_order(tiny):
    model, tokenizer = tiny
    ids = rows(tokenizer)
    together = logits(model, ids, tokenizer.pad_token_id, batch_size=2)
    for i, row in enumerate(ids):
        alone = logits(model, [row], tokenizer.pad_token_id)
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=0)


def test_agreement_counts_changed_predictions_and_margins():
    reference = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    got = torch.tensor([[0.0, 0.5], [0.0, 1.0]])  # margins 1 -> 0.5 (same class), -2 -> 1 (flipped)
    assert agreement(got, reference) == {"flips": 1, "margin_mae": 1.75, "margin_max": 3.0}
    three = torch.tensor([[3.0, 1.0, 0.0]])  # margins: the reference's top two, classes 0 and 1
    assert agreement(torch.tensor([[3.0, 0.0, 2.0]]), three) == {
        "flips": 0,
        "margin_mae": 1.0,
        "margin_max": 1.0,
    }


def test_quantize_run_with_auto_tunes_on_validation_and_saves_the_number(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "model")
    seen = {}
    real = choose_alpha

    def spy(model, quantize, rows, pad_id, candidates):
        seen["rows"], seen["candidates"] = rows, list(candidates)
        seen["chosen"], results = real(model, quantize, rows, pad_id, candidates)
        return seen["chosen"], results

    monkeypatch.setattr("llm_lightning.quantization.smoothquant.choose_alpha", spy)
    overrides = [
        "quantize=int8_dynamic",
        "quantize.compile=false",
        "quantize.smoothquant_alpha=auto",
        "quantize.smoothquant_candidates=[0.2,0.8]",
        "quantize.calibration_texts=4",
        "bench=quick",
        "task.limit=40",
    ]
    cfg = make_cfg(tmp_path, overrides)
    quantize_run(cfg, tmp_path)
    assert cfg.quantize.smoothquant_alpha == "auto"  # the alpha chosen is returned, not written into cfg
    from llm_lightning.data import load_task

    data = load_task(cfg.task, cfg.seed)
    assert (
        seen["rows"]
        == tokenizer(list(data.val.texts), truncation=True, max_length=cfg.task.max_length)["input_ids"]
    )
    assert seen["candidates"] == [0.2, 0.8]
    meta = json.loads((tmp_path / "quantized" / META_FILE).read_text())
    assert meta["smoothquant_alpha"] == seen["chosen"] in (0.2, 0.8)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quantize"]["smoothquant_alpha"] == seen["chosen"]
    assert f"smoothquant_alpha={seen['chosen']}" in (tmp_path / "report.md").read_text()
    # measured again from the run's config, which still says `auto`: the saved number is reported
    again = report_for_run(tmp_path, make_cfg(tmp_path, overrides))
    assert again["quantize"] == report["quantize"]
    # the same loop loads and measures the same folders: the same answers, text by text
    assert again["per_text"] == report["per_text"]
    assert (
        [s["stage"] for s in again["stages"]]
        == [s["stage"] for s in report["stages"]]
        == [
            "fp32",
            "int8_dynamic",
        ]
    )


def test_auto_needs_validation_texts_and_sane_candidates(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="no validation texts: set quantize.smoothquant_alpha to a number"):
        choose_alpha(model, lambda m, a: m, [], tokenizer.pad_token_id)
    with pytest.raises(
        ValueError, match=r"smoothquant_candidates=\[1.5\]: give one or more alphas in \[0, 1\]"
    ):
        choose_alpha(model, lambda m, a: m, rows(tokenizer), tokenizer.pad_token_id, [1.5])
    with pytest.raises(ValueError, match="'auto' is resolved on the validation split"):
        quantize_model(
            copy.deepcopy(model),
            "int8_dynamic",
            smoothquant_alpha="auto",
            calibration=[torch.tensor([[1, 2]])],
        )
