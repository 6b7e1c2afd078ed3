"""Runtime exports (quantize=onnx_int8 | openvino_int8 | openvino_bf16) on the tiny model: each folder
loads with its runtime alone (the README snippet, in a process that never imports llm_lightning),
its logits are within a stated tolerance of fp32 torch, and the project loads it like any saved model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llm_lightning.errors import UnsupportedError
from llm_lightning.models.saved import load_saved
from llm_lightning.runtimes import require
from llm_lightning.runtimes.build import export_runtime
from llm_lightning.runtimes.folder import snippet_code

TEXTS = [f"review {i}: " + "a good film " * (i % 5) + "dull " * (i % 3) for i in range(48)]
SNIPPET_TEXTS = ["A moving, funny and beautifully acted film.", "Dull, and far too long.", "Loved it."]
# Largest |logit - fp32 torch logit| allowed (this tiny model's logits are ~0.15 in size). fp32
# computes the same graph: rounding only. bf16 where the CPU has it (else OpenVINO computes f32).
# int8 of a random model (no trained structure to keep): measured 0.009 (onnx) and 0.037 (openvino).
# Each folder's graph takes packed rows (quantize.inputs=packed, the default); "+padded" folders take
# input_ids and attention_mask, as other tools feed them.
TOLERANCE = {"openvino": 1e-5, "openvino_bf16": 0.02, "onnx_int8": 0.05, "openvino_int8": 0.05}
TOLERANCE |= {"onnx+padded": 1e-5, "openvino_int8+padded": 0.05}
INT8_MARKERS = {"onnx_int8": b"DynamicQuantizeLinear", "openvino_int8": b"FakeQuantize"}


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    from omegaconf import OmegaConf

    model, tokenizer = tiny
    root = tmp_path_factory.mktemp("runtimes")
    built = {}
    for name in TOLERANCE:
        choice, _, inputs = name.partition("+")
        settings = OmegaConf.create({"inputs": inputs or "packed"})
        built[name] = export_runtime(model, tokenizer, choice, root / name, TEXTS, 64, settings)
    return built


def _torch_logits(tiny, texts):
    model, tokenizer = tiny
    enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


@pytest.mark.parametrize("choice", list(TOLERANCE))
def test_the_readme_snippet_runs_with_the_runtime_alone(folders, tiny, choice):
    folder = folders[choice]
    code = snippet_code((folder / "README.md").read_text())
    code = code.replace(
        "print(", "import sys; assert 'llm_lightning' not in sys.modules; print(logits.tolist()); print("
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=folder, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    logits = np.array(json.loads(lines[-2]))
    reference = _torch_logits(tiny, SNIPPET_TEXTS)
    assert np.abs(logits - reference).max() <= TOLERANCE[choice]
    labels = json.loads((folder / "config.json").read_text())["id2label"]
    assert lines[-1] == str([labels[str(i)] for i in logits.argmax(-1)])


@pytest.mark.parametrize("choice", list(TOLERANCE))
def test_load_saved_gives_a_classifier_within_tolerance(folders, tiny, choice):
    model, tokenizer, names = load_saved(folders[choice])
    assert names == ["negative", "positive"]
    enc = tokenizer(TEXTS[:12], padding=True, truncation=True, max_length=64, return_tensors="pt")
    got = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    reference = _torch_logits(tiny, TEXTS[:12])
    assert np.abs(got - reference).max() <= TOLERANCE[choice]
    assert model.parameter_count > 0.9 * sum(p.numel() for p in tiny[0].parameters())


@pytest.mark.parametrize("choice", list(INT8_MARKERS))
def test_int8_folders_hold_quantized_graphs(folders, choice):
    model_file = folders[choice] / json.loads((folders[choice] / "runtime.json").read_text())["model"]
    assert INT8_MARKERS[choice] in model_file.read_bytes()


@pytest.mark.parametrize("choice", ["onnx_int8", "onnx+padded"])
def test_onnx_runtime_fuses_each_rms_norm_into_one_kernel(folders, tiny, choice, tmp_path):
    # transformers' x * rsqrt(...) exports as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul, which
    # ORT leaves unfused; the export writes the division form ORT fuses (checked: 0 fused without it)
    import onnx
    import onnxruntime as ort

    folder = folders[choice]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    model_file = folder / json.loads((folder / "runtime.json").read_text())["model"]
    ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    norms = 2 * tiny[0].config.num_hidden_layers + 1  # two a layer and the final one
    # ORT's int8 keeps the embedding table in int8 (a quarter of its disk) and dequantizes the rows
    # it gathers: the first norm, fed by that DequantizeLinear, is not fused
    unfused = 1 if choice == "onnx_int8" else 0
    fused = ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization")
    assert (fused, ops.count("Pow"), ops.count("Reciprocal")) == (norms - unfused, unfused, 0)


def test_a_missing_runtime_names_the_extra_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a)
    )
    with pytest.raises(UnsupportedError, match=r"openvino_int8 needs nncf.*pip install -e \"\.\[deploy\]\""):
        require("openvino_int8")
    require("openvino_bf16")  # bf16 needs only openvino itself


@pytest.mark.parametrize("choice", ["onnx_int8", "openvino_int8", "openvino_bf16"])
def test_predict_and_evaluate_take_a_runtime_folder(folders, tiny, choice, tmp_path):
    from conftest import CONF
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from llm_lightning.evaluate import evaluate
    from llm_lightning.predict import predict

    model, tokenizer, names = load_saved(folders[choice])
    rows = list(predict(model, tokenizer, names, TEXTS[:6]))
    expected = list(predict(tiny[0], tiny[1], ["negative", "positive"], TEXTS[:6]))
    assert [r["text"] for r in rows] == TEXTS[:6]
    for got, want in zip(rows, expected, strict=True):  # probabilities of the same logits, within tolerance
        assert abs(got["probs"]["positive"] - want["probs"]["positive"]) <= TOLERANCE[choice]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[f"model_path={folders[choice]}", "task.limit=24"])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    metrics = evaluate(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["model_path"] == str(folders[choice])
    assert (tmp_path / "metrics.json").exists()


def test_quantize_writes_a_runtime_folder_and_reports_it(tmp_path):
    """`train ... quantize=onnx_int8`: the export is the run's quantized/ stage, checked and
    measured like torchao's (report rows for fp32 and the export, the export's data record)."""
    from conftest import run_module

    done = run_module(
        "llm_lightning.train",
        "model=tiny",
        "debug=smoke",
        "quantize=onnx_int8",
        "bench=quick",
        "quantize.calibration_texts=16",
        f"hydra.run.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "quantized" / "runtime.json").read_text())["runtime"] == "onnxruntime"
    assert (tmp_path / "quantized" / "training.json").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["fp32", "onnx_int8"]
    assert report["stages"][1]["params"] > 0
    # its graph takes packed rows (the default): the report says its batches ran padding-free
    assert report["stages"][1]["padding_free"] is True
    # the model file is the folder's size on disk (it once read 0: .onnx files were not counted)
    onnx_mb = (tmp_path / "quantized" / "model.onnx").stat().st_size / 1e6
    assert report["stages"][1]["size_mb"] == pytest.approx(onnx_mb) and onnx_mb > 0
    # `python -m llm_lightning.report run_dir=...` finds the export among the run's stages too
    from llm_lightning.measure.stage_report import report_for_run

    again = report_for_run(tmp_path)
    assert [(s["stage"], s["input"]) for s in again["stages"]] == [("fp32", None), ("onnx_int8", "fp32")]


def test_runtime_settings_are_checked_with_the_others():
    from omegaconf import OmegaConf

    from llm_lightning.errors import UserError
    from llm_lightning.quantization.settings import check_settings

    bad = OmegaConf.create(
        {"method": "onnx_int8", "onnx_mode": "fast", "calibration_texts": 0, "inputs": "ragged"}
    )
    with pytest.raises(UserError) as err:
        check_settings(bad)
    assert "quantize.onnx_mode='fast' is not one of ('dynamic', 'static')" in str(err.value)
    assert "quantize.inputs='ragged' is not one of ('packed', 'padded')" in str(err.value)
    assert "quantize.calibration_texts=0 must be >= 1" in str(err.value)
    check_settings(OmegaConf.create({"method": "openvino_bf16"}))  # no calibration: nothing to check
    alphas = {"method": "openvino_int8", "smooth_quant_alpha": 1.5}
    with pytest.raises(UserError, match=r"quantize.smooth_quant_alpha=1.5 must be in \[0, 1\]"):
        check_settings(OmegaConf.create(alphas))
    alphas = {"method": "openvino_int8", "smooth_quant_alpha": "auto", "smooth_quant_candidates": [0.5, 2]}
    with pytest.raises(UserError, match=r"quantize.smooth_quant_candidates=\[0.5, 2\]: give one or more"):
        check_settings(OmegaConf.create(alphas))
    with pytest.raises(
        UserError,
        match="smooth_quant_alpha=0.5 is SmoothQuant's alpha for quantize=openvino_int8 .* or quantize=onnx_int8",
    ):
        check_settings(OmegaConf.create({"method": "openvino_bf16", "smooth_quant_alpha": 0.5}))
    check_settings(OmegaConf.create({"method": "onnx_int8", "smooth_quant_alpha": 0.5}))
    with pytest.raises(
        UserError, match=r"quantize.smooth_quant_alpha=2 must be in \[0, 1\] \(0.5 is the SmoothQuant"
    ):
        check_settings(OmegaConf.create({"method": "onnx_int8", "smooth_quant_alpha": 2}))


def test_a_runtime_folder_with_an_unknown_precision_is_refused(folders, tmp_path):
    import shutil

    from llm_lightning.errors import UserError
    from llm_lightning.runtimes import RUNTIME_FILE, load_runtime_dir

    copy = shutil.copytree(folders["openvino"], tmp_path / "copy")
    meta = json.loads((copy / RUNTIME_FILE).read_text())
    (copy / RUNTIME_FILE).write_text(json.dumps({**meta, "precision": "int4"}))
    with pytest.raises(UserError, match=r"precision='int4' is not one of \['bf16', 'fp32', 'int8'\]"):
        load_runtime_dir(copy)


def test_a_packed_graph_computes_fewer_rows_and_the_padded_logits(folders, tiny):
    """The packed graph's rows hold several texts (fewer rows than texts, no padding between them),
    and each text's logits are the padded torch model's: texts packed together do not see each other."""
    from llm_lightning.runtimes.inputs import feed

    model, tokenizer = tiny
    enc = tokenizer(TEXTS[:16], padding=True, truncation=True, max_length=64, return_tensors="np")
    fed = feed(enc["input_ids"], enc["attention_mask"], "packed", tokenizer.pad_token_id)
    assert fed["input_ids"].shape[0] < 16 and fed["input_ids"].shape[1] == enc["input_ids"].shape[1]
    assert fed["input_ids"].size < enc["input_ids"].size
    assert sorted(fed["last"].tolist()) == sorted(set(fed["last"].tolist()))  # one token a text
    reference = _torch_logits(tiny, TEXTS[:16])
    for name in ("openvino", "onnx+padded"):  # fp32 graphs: rounding only
        runtime_model, *_ = load_saved(folders[name])
        assert runtime_model.inputs == ("padded" if "padded" in name else "packed")
        got = runtime_model(
            torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
        ).logits
        assert np.abs(got.numpy() - reference).max() <= 1e-5
    # a padded batch fed to the packed graph as it is (one text a row) gives the same logits
    from llm_lightning.runtimes.openvino import load

    packed_model, _ = load(
        folders["openvino"], json.loads((folders["openvino"] / "runtime.json").read_text())
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    width = ids.shape[1]
    one_a_row = {
        "input_ids": ids,
        "position_ids": np.broadcast_to(np.arange(width), ids.shape).copy(),
        "last": np.arange(len(ids)) * width + mask.sum(1) - 1,
    }
    assert np.abs(packed_model.run(one_a_row) - reference).max() <= 1e-5
    # rows wider than the longest text (a small pair cost), as the folder's classifier may pack them
    wide = feed(enc["input_ids"], enc["attention_mask"], "packed", tokenizer.pad_token_id, pair_cost=1e-4)
    assert wide["input_ids"].shape[1] > width and wide["input_ids"].size < fed["input_ids"].size
    assert np.abs(packed_model.run(wide) - reference).max() <= 1e-5


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: OpenVINO makes one stream")
def test_a_batch_cut_over_streams_gives_the_logits_of_one_request(folders, tiny, monkeypatch):
    """An OpenVINO folder's classifier cuts a batch into whole rows, one piece per THROUGHPUT
    stream, and puts each text's logits back in place: the same as the batch in one request, for
    the packed and the padded graph; one text is one request."""
    import openvino as ov

    from llm_lightning.runtimes import inputs, openvino

    model, tokenizer = tiny
    enc = tokenizer(TEXTS[:16], padding=True, truncation=True, max_length=64, return_tensors="np")
    cuts = []
    monkeypatch.setattr(openvino, "split_rows", lambda *a: cuts.append(inputs.split_rows(*a)) or cuts[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two streams of one thread each
    try:
        for name in ("openvino", "openvino_int8+padded"):
            meta = json.loads((folders[name] / "runtime.json").read_text())
            runtime_model, _ = openvino.load(folders[name], meta)
            fed = runtime_model.feed(
                torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
            )
            hint = meta["inference_precision_hint"]  # f32 for fp32 folders, where the default may be bf16
            config = {"INFERENCE_PRECISION_HINT": hint} if hint else {}
            whole = ov.Core().compile_model(str(folders[name] / meta["model"]), "CPU", config)(fed)[0]
            got = runtime_model.run(fed)
            pieces = cuts.pop()
            assert len(pieces) == 2 and all(len(rows) for _, rows in pieces)
            assert sorted(np.concatenate([rows for _, rows in pieces]).tolist()) == list(range(16))
            assert np.abs(got - whole).max() <= 1e-6
            one = runtime_model.feed(
                torch.from_numpy(enc["input_ids"][:1]), torch.from_numpy(enc["attention_mask"][:1])
            )
            assert np.abs(runtime_model.run(one) - whole[:1]).max() <= 1e-6 and not cuts
            assert "PERFORMANCE_HINT" in (folders[name] / "README.md").read_text()  # the README says how
    finally:
        torch.set_num_threads(threads)


def test_onnx_int8_keeps_the_smoothquant_alpha_that_changes_fewest_validation_predictions(tiny, tmp_path):
    """`quantize=onnx_int8` folds SmoothQuant in before ORT's quantizer; with `auto` each candidate
    is exported, and the folder keeps the one its runtime.json shows changed fewest predictions."""
    from omegaconf import OmegaConf

    model, tokenizer = tiny
    settings = OmegaConf.create({"smooth_quant_alpha": "auto", "smooth_quant_candidates": [0.5, 0.9]})
    validation = [*TEXTS, "an utter mess", "warm and witty", "I wanted my evening back"]
    path = export_runtime(
        model, tokenizer, "onnx_int8", tmp_path / "sq", TEXTS, 64, settings, None, validation
    )
    meta = json.loads((path / "runtime.json").read_text())
    rows = meta["smooth_quant_choice"]["candidates"]
    assert [r["alpha"] for r in rows] == [0.5, 0.9] and meta["smooth_quant_choice"][
        "validation_texts"
    ] == len(validation)
    best = min(rows, key=lambda r: (r["flips"], r["margin_mae"]))
    assert meta["smooth_quant_alpha"] == best["alpha"]
    assert INT8_MARKERS["onnx_int8"] in (path / "model.onnx").read_bytes()
    got = load_saved(path)[0]
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        logits = got(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    assert np.abs(logits.numpy() - _torch_logits(tiny, TEXTS)).max() < TOLERANCE["onnx_int8"]
