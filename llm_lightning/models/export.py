"""The `model/` folder a run exports: plain transformers, safetensors, loadable anywhere."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llm_lightning.artifacts import atomic_dir, write_json
from llm_lightning.models.lora import merged


def export_model(
    model: nn.Module, tokenizer, target: Path, extra_json: dict[str, dict] | None = None
) -> Path:
    """`save_pretrained` (safetensors) + tokenizer, loadable with plain transformers.

    LoRA adapters are merged into the weights first; the labels travel in config.json
    (`id2label`/`label2id`). `extra_json`: more files, name -> content (e.g. training.json),
    written inside the same atomic swap.
    """
    plain = merged(model)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra_json or {}).items():
            write_json(tmp / name, content)

    return atomic_dir(target, write)
