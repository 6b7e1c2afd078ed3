"""Writing a run's results so that a crash never leaves half a file where a good one was."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)` and only then swap the folder into `target` (the old one goes last)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result should look like a plain mkdir
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def export_model(
    model: nn.Module, tokenizer, target: Path, extra_json: dict[str, dict] | None = None
) -> Path:
    """`save_pretrained` (safetensors) + tokenizer, loadable with plain transformers.

    LoRA adapters are merged into the weights first; the labels travel in config.json
    (`id2label`/`label2id`). `extra_json`: more files, name -> content (e.g. training.json),
    written inside the same atomic swap.
    """
    from llm_lightning.models.lora import merged

    plain = merged(model)

    def write(tmp: Path) -> None:
        with torch.no_grad():
            plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, content in (extra_json or {}).items():
            write_json(tmp / name, content)

    return atomic_dir(target, write)
