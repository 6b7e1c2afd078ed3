"""benchmarks/runtime_profile.py: each runtime's profiler finds its int8 matmuls (and no float ones),
and the bound it prints is the hand computation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

from runtime_profile import profile_pass, report  # noqa: E402  (benchmarks/runtime_profile.py)

from llm_lightning.measure.bench import padded_batches  # noqa: E402
from llm_lightning.models.saved import load_saved  # noqa: E402
from llm_lightning.runtimes.build import export_runtime  # noqa: E402
from tests.test_fused_projections import int8  # noqa: E402

TEXTS = [f"review {i}: " + "a good film " * (i % 5) + "dull " * (i % 3) for i in range(32)]
CHOICES = ("openvino_int8", "onnx_int8", "openvino", "onnx")


@pytest.fixture(scope="module")
def folders(tiny, tmp_path_factory):
    model, tokenizer = tiny
    root = tmp_path_factory.mktemp("profiled")
    settings = OmegaConf.create({"inputs": "packed"})
    return {c: export_runtime(model, tokenizer, c, root / c, TEXTS, 64, settings) for c in CHOICES}


def _batches(tokenizer):
    return padded_batches(tokenizer(TEXTS)["input_ids"], 16, tokenizer.pad_token_id)


@pytest.mark.parametrize("choice", CHOICES)
def test_each_runtimes_profiler_counts_its_int8_matmuls_and_no_float_ones(folders, tiny, choice):
    model, tokenizer, _ = load_saved(folders[choice])
    matmuls, wall = profile_pass(model, _batches(tokenizer))
    assert wall > 0
    if choice.endswith("int8"):
        assert 0 < matmuls < wall  # the graph does more than its int8 matmuls
    else:
        assert matmuls == 0  # float matmuls are not counted as int8 ones


def test_the_torch_profile_counts_the_int8_linears_and_not_the_float_model(tiny):
    model, tokenizer = tiny
    batches = _batches(tokenizer)
    matmuls, wall = profile_pass(int8(model, tokenizer, True), batches)
    assert 0 < matmuls < wall
    assert profile_pass(model, batches)[0] == 0


def test_the_bound_and_the_rest_left_for_the_target_are_the_hand_computation():
    # 1,000 tokens; ours ran 2,000 tok/s in turns, its int8 matmuls took 0.4 s of a 0.6 s profiled
    # pass; the peer ran 1,000 and 800 tok/s: 1.0 and 1.25 s for the batches.
    rates = {"ours": [2000.0, 2000.0], "peer": [1000.0, 800.0]}
    profiled = {"ours": (0.4, 0.6), "peer": (0.5, 1.0)}
    row = report("peer", "ours", rates, profiled, 1000, 1.5)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "peer" and cells[2] == "50%"  # the peer's own split: 0.5 of 1.0 s
    assert cells[3] == "500.0" and cells[4] == "500.0"  # ms per 1,000 tokens
    # ours at most (1.0 or 1.25 s) / 0.4 s: median 2.81x, 2.50-3.12x
    assert cells[5] == "2.81x (2.50-3.12x)"
    # 1.5x the peer's median speed (900 tok/s): 1,000 tokens in 0.741 s, 0.4 s of them matmuls
    assert cells[6] == "340.7"
    assert report("ours", "ours", rates, profiled, 1000, 1.5).endswith("| — | — |")
