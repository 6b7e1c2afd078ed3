"""task=hf_dataset against a local dataset directory (what `datasets.load_dataset` reads offline)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from llm_lightning.data import load_task

datasets = pytest.importorskip("datasets")


def test_local_dataset_directory_with_class_label_names(tmp_path):
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    ds = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"text": [f"{name} {i}" for i in range(n)], "label": [i % 2 for i in range(n)]},
                features=features,
            )
            for name, n in (("train", 20), ("validation", 4), ("test", 6))
        }
    )
    for name, split in ds.items():
        split.to_json(str(tmp_path / f"{name}.jsonl"))
    cfg = OmegaConf.load("conf/task/hf_dataset.yaml")
    cfg.path = str(tmp_path)
    data = load_task(cfg, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (20, 4, 6)
    assert sorted(set(data.train.labels)) == [0, 1]
