"""The benchmark and the per-stage report: columns, files, TensorBoard, the speed gate, bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from llm_lightning.data.tasks import Split, TaskData
from llm_lightning.measure.bench import BenchSettings, _percentile, measure
from llm_lightning.measure.report_files import COLUMNS
from llm_lightning.measure.stage_report import (
    NoTestSplitError,
    SpeedGateError,
    Stage,
    measure_stage,
    report_for_run,
    report_stages,
    write_report,
)
from llm_lightning.models.export import export_model

QUICK = BenchSettings(batch_sizes=(16, 32), throughput_texts=32, latency_texts=4, repeats=1)
MEASURED_KEYS = (
    "acc",
    "f1_macro",
    "latency_p50_ms",
    "latency_p95_ms",
    "tokens_per_s_b16",
    "texts_per_s_b16",
    "tokens_per_s_b32",
    "texts_per_s_b32",
    "peak_rss_mb",
    "size_mb",
    "params",
    "threads",
)


@pytest.fixture
def one_thread():
    """Two threads on a loaded 2-core machine wait on each other at every op (timings jump 25x);
    one thread keeps the comparison about the models."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def task_data(n_test: int = 40) -> TaskData:
    texts = [("a great film " if i % 2 else "a dull one ") * (1 + i % 5) for i in range(n_test)]
    split = Split(texts, [i % 2 for i in range(n_test)])
    return TaskData(split, split, split, ["negative", "positive"])


class Slowed(nn.Module):
    """A "compressed" model that gives the same answers, then waits 3x as long as it worked plus
    0.2 s: clearly slower even when other jobs make this shared machine's timings jump."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, **kwargs):
        started = time.perf_counter()
        out = self.inner(**kwargs)
        time.sleep(0.2 + 3 * (time.perf_counter() - started))
        return out


def row(stage: str, tokens_per_s: float, source: str | None = None, acc: float = 0.8) -> dict:
    values = dict.fromkeys(MEASURED_KEYS, 1.0) | {"acc": acc, "tokens_per_s_b16": tokens_per_s}
    return values | {"stage": stage, "input": source, "compile": False, "path": None}


def test_measure_returns_every_number(tiny, tmp_path, one_thread):
    model, tokenizer = tiny
    data = task_data()
    measured = measure(model, tokenizer, data.test.texts, data.test.labels, QUICK, path=None)
    for key in MEASURED_KEYS:
        assert key in measured, key
    assert measured["size_mb"] is None  # no folder given
    assert measured["params"] == sum(p.numel() for p in model.parameters())
    assert measured["threads"] == torch.get_num_threads()
    assert 0 < measured["latency_p50_ms"] <= measured["latency_p95_ms"]
    # texts/s and tokens/s come from the same timed passes: their ratio is the tokens per text.
    rows = tokenizer(data.test.texts[:32])["input_ids"]
    mean_tokens = sum(map(len, rows)) / len(rows)
    assert measured["tokens_per_s_b16"] / measured["texts_per_s_b16"] == pytest.approx(mean_tokens)
    with torch.inference_mode():
        enc = tokenizer(data.test.texts, padding=True, return_tensors="pt")
        preds = model(**enc).logits.argmax(-1)
    assert measured["acc"] == pytest.approx((preds == torch.tensor(data.test.labels)).float().mean().item())
    assert measured["predictions"] == preds.tolist()  # one per text, in text order


def test_percentile_matches_numpy():
    values = sorted([3.0, 1.0, 7.5, 2.0, 9.0, 4.0, 11.0])
    for q in (50, 95):
        assert _percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_bad_bench_settings_name_the_key():
    with pytest.raises(ValueError, match=r"bench.repeats=0 must be >= 1.*config group `bench=`"):
        BenchSettings(repeats=0)


def test_report_files_have_every_stage_and_column(tmp_path):
    rows = [row("fp32", 400.0), row("int8_dynamic+compile", 1600.0, "fp32", acc=0.79)]
    cfg = OmegaConf.create({"runtime": {"threads": 2}})
    write_report(rows, tmp_path, cfg)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "int8_dynamic+compile"]
    assert report["stages"][1]["speedup"] == pytest.approx(4.0) and report["warnings"] == []
    assert report["runtime"] == {"threads": 2} and report["environment"]["threads"] == torch.get_num_threads()
    table = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == [h for _, h, _ in COLUMNS]
    assert len(table) == 2 + len(rows)  # header, rule, one row per stage
    assert table[3].startswith("| int8_dynamic+compile | fp32 | — | 0.7900 |") and "4.00x" in table[3]
    assert (tmp_path / "pareto.png").stat().st_size > 5000
    events = EventAccumulator(str(tmp_path / "tensorboard" / "report"), size_guidance={"tensors": 0})
    events.Reload()
    assert "report/text_summary" in events.Tags()["tensors"]
    runs = {p.name for p in (tmp_path / "tensorboard" / "report").iterdir() if p.is_dir()}
    assert runs == {"fp32", "int8_dynamic_compile"}  # one hparams run per stage


def test_report_compares_every_stage_with_the_first_text_by_text(tmp_path):
    # ten texts: 0-2 both right, 3 both wrong, 4 only fp32 right, 5-9 only the student right
    labels = [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    fp32 = [0, 1, 0, 0, 0, 0, 1, 0, 1, 0]  # acc 0.4
    student = [0, 1, 0, 0, 1, 1, 0, 1, 0, 1]  # acc 0.8
    rows = [
        row("fp32", 400.0, acc=0.4) | {"predictions": fp32, "labels": labels},
        row("student", 800.0, "fp32", acc=0.8) | {"predictions": student, "labels": labels},
        row("int8", 1600.0, "student", acc=0.4) | {"predictions": fp32, "labels": labels},
    ]
    write_report(rows, tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    first, second, third = report["stages"]
    assert not any(k.startswith("vs_first_") for k in first)
    assert second["vs_first_acc_diff"] == pytest.approx(second["acc"] - first["acc"])
    assert second["vs_first_acc_diff_low"] <= second["vs_first_acc_diff"] <= second["vs_first_acc_diff_high"]
    # 1 text only fp32 gets right, 5 only the student: p = 2 (C(6,0) + C(6,1)) / 2^6 = 14/64
    assert second["vs_first_mcnemar_p"] == pytest.approx(0.21875)
    assert (second["vs_first_only_first_right"], second["vs_first_only_this_right"]) == (1, 5)
    assert second["vs_first_agreement"] == pytest.approx(0.4)
    # against the first stage, not its input: the int8 stage repeats fp32's answers
    assert third["vs_first_acc_diff"] == 0.0 and third["vs_first_agreement"] == 1.0
    # per-text lists kept apart from the rows
    assert not any(k in r for r in report["stages"] for k in ("predictions", "labels"))
    assert report["per_text"] == {
        "labels": labels,
        "predictions": {"fp32": fp32, "student": student, "int8": fp32},
    }
    assert report["paired"] == {"against": "fp32", "texts": 10, "rounds": 10_000, "seed": 0, "level": 0.95}
    text = (tmp_path / "report.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    column = {h: i for i, h in enumerate(cells[0])}
    low, high = (100 * second[k] for k in ("vs_first_acc_diff_low", "vs_first_acc_diff_high"))
    assert cells[3][column["vs first: Δacc pts [95% CI]"]] == f"+40.00 [{low:+.2f}, {high:+.2f}]"
    assert cells[3][column["McNemar p"]] == "0.219" and cells[3][column["agree"]] == "40.00%"
    assert cells[2][column["McNemar p"]] == "—"  # the first stage is the reference
    assert "against 'fp32' on the same 10 test texts" in text and "[0, 1, 0, 0" not in text
    run = tmp_path / "tensorboard" / "report" / "student"
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for key in ("acc_diff", "acc_diff_low", "acc_diff_high", "mcnemar_p", "agreement"):
        assert f"report/vs_first_{key}" in scalars, key
    assert events.Scalars("report/vs_first_mcnemar_p")[0].value == pytest.approx(0.21875)


def test_report_names_the_final_models_fastest_form_and_its_quicker_form_one_text_at_a_time(tmp_path):
    # batch 16 and batch 1 disagree on purpose: the graph runtime wins throughput, torch int8 latency
    rows = [
        row("fp32", 400.0) | {"latency_p50_ms": 90.0},
        row("student", 1200.0, "fp32") | {"latency_p50_ms": 30.0},
        row("int8", 4000.0, "student", acc=0.79) | {"latency_p50_ms": 12.0},
        row("onnx_int8", 5200.0, "student", acc=0.81) | {"latency_p50_ms": 15.0},
    ]
    report = write_report(rows, tmp_path, final=["student", "int8", "onnx_int8"])
    ratios = {r["stage"]: r["latency_speedup_vs_first"] for r in report["stages"]}
    assert ratios == pytest.approx({"fp32": 1.0, "student": 3.0, "int8": 7.5, "onnx_int8": 6.0})
    fastest = report["fastest_final"]
    assert (fastest["stage"], fastest["speedup_vs_first"]) == ("onnx_int8", pytest.approx(13.0))
    assert fastest["latency_speedup_vs_first"] == pytest.approx(6.0)
    assert fastest["quickest_b1"] == {
        "stage": "int8",
        "acc": 0.79,
        "latency_p50_ms": 12.0,
        "latency_speedup_vs_first": pytest.approx(7.5),
    }
    text = (tmp_path / "report.md").read_text()
    assert "**onnx_int8**, 5,200 tokens/s at batch 16 (13.00x the first stage)" in text
    assert "batch-1 p50 15.0 ms (6.00x quicker than the first stage)" in text
    assert "One text at a time, **int8** is quicker, batch-1 p50 12.0 ms (7.50x quicker" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    column = [c.strip() for c in table[0].strip("|").split("|")].index("p50 b1 vs first")
    assert [line.strip("|").split("|")[column].strip() for line in table[2:]] == [
        "1.00x",
        "3.00x",
        "7.50x",
        "6.00x",
    ]
    # the fastest is also the quickest: nothing more to say
    rows[2]["latency_p50_ms"] = 20.0
    assert (
        "quickest_b1"
        not in write_report(rows, tmp_path / "same", final=["student", "int8", "onnx_int8"])["fastest_final"]
    )


def test_the_fastest_final_form_is_named_on_the_figures_timed_in_turns_when_there_are_some(tmp_path):
    # one after another, a drift made onnx_int8 look faster; in turns int8 is
    turns = "tokens_per_s_b16_turns"
    rows = [
        row("fp32", 400.0),
        row("student", 1200.0, "fp32") | {turns: 1300.0, f"{turns}_min": 1250.0, f"{turns}_max": 1350.0},
        row("int8", 4000.0, "student") | {turns: 5100.0, f"{turns}_min": 4900.0, f"{turns}_max": 5300.0},
        row("onnx_int8", 5200.0, "student") | {turns: 4800.0, f"{turns}_min": 4700.0, f"{turns}_max": 5000.0},
    ]
    fastest = write_report(rows, tmp_path, final=["student", "int8", "onnx_int8"])["fastest_final"]
    assert (fastest["stage"], fastest["by"], fastest[turns]) == ("int8", turns, 5100.0)
    text = (tmp_path / "report.md").read_text()
    assert "where it ran 5,100 tokens/s (rounds 4,900-5,300)" in text
    # without figures in turns for every form, the one-after-another figure decides
    del rows[2][turns]
    fastest = write_report(rows, tmp_path / "seq", final=["student", "int8", "onnx_int8"])["fastest_final"]
    assert (fastest["stage"], fastest["by"]) == ("onnx_int8", "tokens_per_s_b16")


def test_stages_measured_on_different_texts_cannot_be_paired(tmp_path):
    rows = [
        row("fp32", 400.0) | {"predictions": [0, 1], "labels": [0, 1]},
        row("int8", 800.0, "fp32") | {"predictions": [0, 1, 1], "labels": [0, 1, 1]},
    ]
    with pytest.raises(ValueError, match="'fp32' and 'int8' were measured on different test texts"):
        write_report(rows, tmp_path)


def test_speed_gate_warns_or_fails_on_a_slower_compressed_stage(tmp_path):
    rows = [row("fp32", 400.0), row("int8_weight_only", 300.0, "fp32")]
    with pytest.warns(UserWarning, match=r"'int8_weight_only' is slower than its input 'fp32': 300 vs 400"):
        write_report(rows, tmp_path / "warn")
    assert json.loads((tmp_path / "warn" / "report.json").read_text())["warnings"]
    assert "## Warnings" in (tmp_path / "warn" / "report.md").read_text()
    with pytest.raises(SpeedGateError, match="quantize.require_speedup=false"):
        write_report(rows, tmp_path / "gate", require_speedup=True)
    assert (tmp_path / "gate" / "report.json").exists()  # written before failing, to see why


def test_speed_gate_trips_on_a_measured_slower_model(tiny, tmp_path, one_thread):
    model, tokenizer = tiny
    data, cfg = task_data(), OmegaConf.create({})
    rows = [
        measure_stage("fp32", model, tokenizer, data, cfg, None, QUICK),
        measure_stage("slowed", Slowed(model), tokenizer, data, cfg, None, QUICK, input_stage="fp32"),
    ]
    assert rows[1]["acc"] == rows[0]["acc"]  # same answers, only slower
    with pytest.raises(SpeedGateError, match="'slowed' is slower than its input 'fp32'"):
        write_report(rows, tmp_path, require_speedup=True)
    # the same model against itself, text by text: no difference, no discordant text, all agree
    paired = {k: v for k, v in rows[1].items() if k.startswith("vs_first_")}
    assert paired == {
        "vs_first_acc_diff": 0.0,
        "vs_first_acc_diff_low": 0.0,
        "vs_first_acc_diff_high": 0.0,
        "vs_first_mcnemar_p": 1.0,
        "vs_first_agreement": 1.0,
        "vs_first_only_first_right": 0,
        "vs_first_only_this_right": 0,
        "vs_first_n": len(data.test),
    }


def test_report_needs_a_test_split(tiny, tmp_path):
    model, tokenizer = tiny
    data = task_data()
    data.test = Split([], [])
    with pytest.raises(NoTestSplitError, match=r"needs the task's test split.*task.split=.*task.test_path"):
        measure_stage("fp32", model, tokenizer, data, OmegaConf.create({}), tmp_path, QUICK)


def test_report_for_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\.hydra/config.yaml"):
        report_for_run(tmp_path)


def test_report_stages_loads_measures_and_reports_each_folder_in_order(tiny, tmp_path, one_thread):
    """The one loop behind `quantize`, `compress` and `report_for_run`: each stage loaded from its
    folder, measured as measure_stage measures it, the settings given recorded as they are."""
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "model")
    data = task_data()
    cfg = OmegaConf.create({"bench": {"throughput_texts": 32, "latency_texts": 4, "repeats": 1}})
    stages = [
        Stage("teacher", tmp_path / "model", compressed=False),
        Stage("again", tmp_path / "model", "teacher", compressed=False),
    ]
    quantize = {"method": "int8_dynamic", "smoothquant_alpha": 0.4}
    report = report_stages(stages, data, cfg, tmp_path / "out", quantize)
    first, second = report["stages"]
    assert (first["stage"], first["input"], second["stage"], second["input"]) == (
        "teacher",
        None,
        "again",
        "teacher",
    )
    assert first["path"] == second["path"] == str(tmp_path / "model")
    assert not second["compressed"] and second["vs_first_agreement"] == 1.0  # the same model twice
    with torch.inference_mode():
        enc = tokenizer(data.test.texts, padding=True, return_tensors="pt")
        expected = model(**enc).logits.argmax(-1).tolist()
    assert report["per_text"]["predictions"] == {"teacher": expected, "again": expected}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["quantize"] == quantize
    assert (
        "Quantization settings: method=int8_dynamic, smoothquant_alpha=0.4"
        in (tmp_path / "out" / "report.md").read_text()
    )
    with pytest.raises(NoTestSplitError):
        report_stages(stages, TaskData(data.train, data.val, Split([], []), data.label_names), cfg, tmp_path)


def test_each_trained_stage_shows_its_runs_validation_accuracy_beside_test(tiny, tmp_path, one_thread):
    """The stage to keep is chosen on validation: a training stage's row carries its run's
    val/acc_best (metrics.json beside model/); a form made from it without training has none."""
    model, tokenizer = tiny
    export_model(model, tokenizer, tmp_path / "run" / "model")
    export_model(model, tokenizer, tmp_path / "run" / "exported")  # e.g. a deploy/ form: not trained
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"val/acc_best": 0.875, "test/acc": 0.5}))
    cfg = OmegaConf.create({"bench": {"throughput_texts": 32, "latency_texts": 4, "repeats": 1}})
    stages = [
        Stage("teacher", tmp_path / "run" / "model", compressed=False),
        Stage("exported", tmp_path / "run" / "exported", "teacher", compressed=False),
    ]
    report = report_stages(stages, task_data(), cfg, tmp_path / "out")
    first, second = report["stages"]
    assert first["val_acc_best"] == 0.875 and "val_acc_best" not in second
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| stage | input | val acc (training) | test acc |" in table
    assert "| teacher | — | 0.8750 |" in table and "| exported | teacher | — |" in table
    assert "Choose between stages on it: the test columns are reported, not chosen on." in table
