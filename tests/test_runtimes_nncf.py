"""NNCF's choices for quantize=openvino_int8 on the tiny model: SmoothQuant's alpha chosen on the
validation split (`smooth_quant_alpha: auto`) and accuracy control (`max_changed_predictions`), and
their settings checked before any work. The folders load and run as tests/test_runtimes.py checks."""

from __future__ import annotations

import json

import pytest

from llm_lightning.models.saved import load_saved
from llm_lightning.runtimes.build import export_runtime

# calibration texts, as tests/test_runtimes.py's
TEXTS = [f"review {i}: " + "a good film " * (i % 5) + "dull " * (i % 3) for i in range(48)]
INT8_TOLERANCE = 0.05  # largest |logit - fp32 torch logit| of an int8 graph (tests/test_runtimes.py)


def test_quantize_openvino_int8_chooses_its_alpha_on_validation_and_reports_it(tmp_path):
    """`quantize=openvino_int8 quantize.smooth_quant_alpha=auto` through the command line: the folder
    records every candidate's count on the run's validation split, and the report gives the alpha
    chosen, not `auto`."""
    from conftest import run_module

    done = run_module(
        "llm_lightning.train",
        "model=tiny",
        "debug=smoke",
        "quantize=openvino_int8",
        "quantize.smooth_quant_alpha=auto",
        "quantize.smooth_quant_candidates=[0.5,0.95]",
        "quantize.calibration_texts=16",
        "bench=quick",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    meta = json.loads((tmp_path / "quantized" / "runtime.json").read_text())
    assert [r["alpha"] for r in meta["smooth_quant_choice"]["candidates"]] == [0.5, 0.95]
    split = json.loads((tmp_path / "model" / "training.json").read_text())
    assert meta["smooth_quant_choice"]["validation_texts"] == split["sizes"]["val"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quantize"]["smooth_quant_alpha"] == meta["smooth_quant_alpha"] in (0.5, 0.95)


def test_accuracy_control_settings_are_checked_before_any_work():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from llm_lightning.errors import UserError
    from llm_lightning.quantization.settings import check_settings

    def problems(data=None, **keys) -> str:
        with pytest.raises(UserError) as err:
            check_settings(OmegaConf.create({"method": "openvino_int8", **keys}), data)
        return str(err.value)

    control = {"max_changed_predictions": 0.01}
    for alpha in (-1, None, 0.95, "auto"):  # SmoothQuant off, or on (NNCF's default, a number, auto)
        check_settings(OmegaConf.create({"method": "openvino_int8", "smooth_quant_alpha": alpha, **control}))
    for bound in (0, 1.5, True, "some"):
        said = problems(smooth_quant_alpha=-1, max_changed_predictions=bound)
        assert f"quantize.max_changed_predictions={bound!r} must be a share in (0, 1)" in said
    no_val = SimpleNamespace(train=["a text"], val=[])
    said = problems(no_val, smooth_quant_alpha=-1, **control)
    assert "quantize.max_changed_predictions=0.01 bounds the share of validation predictions" in said
    with pytest.raises(
        UserError, match="max_changed_predictions=0.01 is NNCF's accuracy control, for quantize"
    ):
        check_settings(OmegaConf.create({"method": "onnx_int8", **control}))
    assert "smooth_quant_alpha=-2 must be in [0, 1]" in problems(smooth_quant_alpha=-2)
    for count in (0, 2.5, True, "many"):
        said = problems(smooth_quant_alpha=-1, ranking_texts=count, **control)
        assert f"quantize.ranking_texts={count!r} must be a whole number >= 1" in said


VAL_TEXTS = [f"critic {i}: " + "fine acting " * (i % 4) + "boring " * (i % 2) for i in range(24)]


def test_nncf_alpha_auto_keeps_the_candidate_that_agrees_best_on_validation(tiny, tmp_path):
    """`smooth_quant_alpha: auto` quantizes with each candidate, judges each on the validation texts
    against fp32 torch, and saves the graph it judged best: the folder's own validation logits give
    back the recorded agreement of the alpha it names, not another candidate's."""
    from omegaconf import OmegaConf

    from llm_lightning.data.agreement import agreement, logits
    from llm_lightning.runtimes import used_settings

    model, tokenizer = tiny
    settings = OmegaConf.create(
        {"smooth_quant_alpha": "auto", "smooth_quant_candidates": [0.3, 0.95], "calibration_texts": 16}
    )
    folder = export_runtime(
        model, tokenizer, "openvino_int8", tmp_path / "auto", TEXTS, 64, settings, val_texts=VAL_TEXTS
    )
    meta = json.loads((folder / "runtime.json").read_text())
    choice = meta["smooth_quant_choice"]
    assert choice["validation_texts"] == len(VAL_TEXTS)
    assert [r["alpha"] for r in choice["candidates"]] == [0.3, 0.95]
    best = min(choice["candidates"], key=lambda r: (r["flips"], r["margin_mae"]))
    assert meta["smooth_quant_alpha"] == best["alpha"]
    other = next(r for r in choice["candidates"] if r is not best)
    assert other["margin_mae"] != best["margin_mae"]  # the two graphs differ, so the check below can tell

    rows = tokenizer(VAL_TEXTS, truncation=True, max_length=64)["input_ids"]
    saved, *_ = load_saved(folder)
    got = agreement(logits(saved, rows, tokenizer.pad_token_id), logits(model, rows, tokenizer.pad_token_id))
    assert got["flips"] == best["flips"]
    assert got["margin_mae"] == pytest.approx(best["margin_mae"], rel=1e-4, abs=1e-7)
    assert used_settings(settings, folder)["smooth_quant_alpha"] == best["alpha"]  # what the report records


def test_nncf_accuracy_control_keeps_the_validation_predictions_within_the_bound(tiny, tmp_path):
    """`max_changed_predictions`: NNCF's accuracy control returns quantizers to float until the int8
    graph changes at most that share of the fp32 model's validation predictions. The folder's own
    logits, scored here on the validation texts, meet the bound that plain int8 misses, and fewer
    quantizers are left than plain int8 has. The folder runs under the f32 hint NNCF judged it in,
    which on a CPU whose OpenVINO default is bf16 (AVX-512 BF16, AMX) is what makes the bound hold."""
    from omegaconf import OmegaConf

    from llm_lightning.data.agreement import agreement, logits
    from llm_lightning.runtimes.accuracy_control import ACCURACY_CONTROL_HINT
    from llm_lightning.runtimes.openvino import load

    model, tokenizer = tiny
    # validation texts close to the fp32 model's decision boundary, where int8's error flips some
    words = "good bad film dull moving funny long acted plot boring fine great awful".split()
    pool = [
        " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(2 + i % 9)) + f" {i}" for i in range(600)
    ]
    pool_rows = tokenizer(pool, truncation=True, max_length=64)["input_ids"]
    margin = logits(model, pool_rows, tokenizer.pad_token_id).diff(dim=-1).abs().squeeze(-1)
    val_texts = [pool[i] for i in margin.argsort()[:40].tolist()]
    rows = tokenizer(val_texts, truncation=True, max_length=64)["input_ids"]
    reference = logits(model, rows, tokenizer.pad_token_id)

    def changed(folder, hint=None) -> int:
        """Predictions changed by the folder, as it runs (or under OpenVINO's precision `hint`)."""
        if hint is None:
            saved, *_ = load_saved(folder)
        else:
            meta = json.loads((folder / "runtime.json").read_text())
            saved, _ = load(folder, {**meta, "inference_precision_hint": hint})
        return agreement(logits(saved, rows, tokenizer.pad_token_id), reference)["flips"]

    plain = OmegaConf.create({"calibration_texts": 16, "smooth_quant_alpha": -1})
    plain_dir = export_runtime(model, tokenizer, "openvino_int8", tmp_path / "plain", TEXTS, 64, plain)
    bound = 0.5 / len(val_texts)  # no prediction may change
    # as NNCF judges (f32 hint), plain int8 misses it, so the bound has work to do
    assert changed(plain_dir, ACCURACY_CONTROL_HINT) > 0
    # NNCF ranks each group of quantizers on 10 of the 40 texts; it scores each step on all 40
    controlled = OmegaConf.create({**plain, "max_changed_predictions": bound, "ranking_texts": 10})
    folder = export_runtime(
        model, tokenizer, "openvino_int8", tmp_path / "ac", TEXTS, 64, controlled, val_texts=val_texts
    )
    meta = json.loads((folder / "runtime.json").read_text())
    control = meta["accuracy_control"]
    assert meta["max_changed_predictions"] == bound and control["validation_texts"] == len(val_texts)
    assert control["ranking_texts"] == 10
    assert control["kept_by_the_fp32_graph"] == 1.0
    assert changed(folder) == 0 and control["kept"] == 1.0 and control["met"]
    assert control["kept_before"] == pytest.approx(
        1 - changed(plain_dir, ACCURACY_CONTROL_HINT) / len(val_texts)
    )
    # the folder runs as NNCF judged it: on a CPU whose default is bf16 it would change others
    assert meta["inference_precision_hint"] == ACCURACY_CONTROL_HINT
    assert f'"INFERENCE_PRECISION_HINT": "{ACCURACY_CONTROL_HINT}"' in (folder / "README.md").read_text()
    fake_quantize = b"FakeQuantize"
    left = (folder / "model.xml").read_bytes().count(fake_quantize)
    assert control["quantizers"] == left < (plain_dir / "model.xml").read_bytes().count(fake_quantize)

    # With SmoothQuant on, a layer NNCF returns to float keeps its int8 weights (RestoreMode.
    # ONLY_ACTIVATIONS): NNCF's full revert, which restores the weights from before SmoothQuant but
    # keeps SmoothQuant's scale on the input, moved these logits by 0.175 (their size is ~0.15).
    smoothed = OmegaConf.create(
        {"calibration_texts": 16, "smooth_quant_alpha": 0.95, "max_changed_predictions": bound}
    )
    folder = export_runtime(
        model, tokenizer, "openvino_int8", tmp_path / "ac_sq", TEXTS, 64, smoothed, val_texts=val_texts
    )
    control = json.loads((folder / "runtime.json").read_text())["accuracy_control"]
    assert control["kept"] > control["kept_before"]  # 0.975 against 0.525 when measured
    saved, *_ = load_saved(folder)
    error = (logits(saved, rows, tokenizer.pad_token_id) - reference).abs().max()
    assert error < INT8_TOLERANCE


def test_a_fixed_nncf_alpha_is_recorded_and_auto_needs_validation_texts(tiny, tmp_path):
    from omegaconf import OmegaConf

    from llm_lightning.errors import UserError

    model, tokenizer = tiny
    fixed = OmegaConf.create({"smooth_quant_alpha": 0.5, "calibration_texts": 8})
    folder = export_runtime(model, tokenizer, "openvino_int8", tmp_path / "fixed", TEXTS, 64, fixed)
    meta = json.loads((folder / "runtime.json").read_text())
    assert meta["smooth_quant_alpha"] == 0.5 and "smooth_quant_choice" not in meta
    auto = OmegaConf.create({"smooth_quant_alpha": "auto", "calibration_texts": 8})
    for choice in ("openvino_int8", "onnx_int8"):  # onnx_int8 folds SmoothQuant in, chosen the same way
        with pytest.raises(
            UserError, match="smooth_quant_alpha=auto picks SmoothQuant's alpha on the validation"
        ):
            export_runtime(model, tokenizer, choice, tmp_path / "none", TEXTS, 64, auto, val_texts=[])
        assert not (tmp_path / "none").exists()  # refused before anything was written
