"""benchmarks/compare.py scores the split it is asked for: validation to choose between models, test
(the default) to report the one chosen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    model, tokenizer = tiny
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize(("split", "texts"), [("validation", 852), ("test", 854)])
def test_compare_scores_the_split_it_is_asked_for(saved, split, texts):
    args = [f"a={saved}", f"b={saved}", "--texts", "16", "--rounds", "1"]
    args += ["--split", split] if split != "test" else []  # test is the default
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the sentiment task's seeded split: 852 validation and 854 test texts (shared/MEASURED.md)
    assert f"{texts} {split} texts" in done.stdout
    assert f"| model | compiled | params | {split} acc |" in done.stdout
    # the same model twice agrees with itself on every text of that split
    assert "| b | no |" in done.stdout and "100.00%" in done.stdout.split("| b | no |")[1]
