"""Shared fixtures: Hydra configs composed for the tiny random Llama, and small data files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Keep test runs off the user's real cache and quiet about optional hub access.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_model_cfg(**overrides) -> DictConfig:
    """conf/model/tiny.yaml, with overrides (e.g. num_layers=3)."""
    cfg = OmegaConf.load(CONF / "model" / "tiny.yaml")
    cfg.update(overrides)
    return cfg


def make_cfg(tmp_path: Path, overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` like the command line does, writing into tmp_path."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=["model=tiny", "debug=smoke", *(overrides or [])])
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda overrides=None: make_cfg(tmp_path, overrides)


def run_module(
    module: str, *args: str, cwd: Path | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` as a user would; fail with its output if it fails."""
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return done


@pytest.fixture
def reviews_csv(tmp_path) -> Path:
    """A small labelled CSV with string labels, 3 classes."""
    rows = ["text,sentiment"]
    words = {"pos": "great wonderful moving", "neg": "dull boring awful", "neu": "a film with actors"}
    for i in range(60):
        label = ("pos", "neg", "neu")[i % 3]
        rows.append(f'"{words[label]} number {i}",{label}')
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny():
    """The tiny classifier of conf/model/tiny.yaml, in eval mode, and its tokenizer (one per test module)."""
    from llm_lightning.models import load_classifier

    model, tokenizer = load_classifier(OmegaConf.load(CONF / "model" / "tiny.yaml"), ["negative", "positive"])
    return model.eval(), tokenizer


@pytest.fixture
def chain(tmp_path):
    """The quick_15_layers chain on the tiny model, cut to seconds a stage (tests/test_compress*.py)."""
    from llm_lightning.chain.compose import load_chain

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
