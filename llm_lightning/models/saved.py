"""Load what a run saved, for evaluation and prediction: an exported `model/` folder, or a
Lightning checkpoint.

A saved file is data, never an instruction. A checkpoint is read with `weights_only=True`, and the
model is rebuilt from what the checkpoint itself holds (`checkpoint[SAVED_MODEL_KEY]`, written by
`SequenceClassifier.on_save_checkpoint` through `checkpoint_entry`):

    {"format": 1,
     "config": model.config.to_dict(),        # the plain transformers model, as trained: already
                                              # pruned (structured/depth) or cut down (a student)
     "attn_implementation": "eager" | ...,    # one of BUILTIN_ATTENTION, else None
     "tokenizer": {filename: str | bytes},    # tokenizer.save_pretrained's files
     "lora": {"r", "alpha", "dropout", "target_modules"} | None}

only with transformers' own classes: the config class of a `model_type` transformers knows, and
`AutoModelForSequenceClassification.from_config`. Nothing is read from the run's
`.hydra/config.yaml`: its `model.trust_remote_code`, `model.name_or_path` (a hub id, a folder with
custom code) could otherwise make `evaluate` or `predict` run code from a run folder someone sent.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llm_lightning.artifacts import safe_load
from llm_lightning.data.batching import with_pad_token
from llm_lightning.errors import MissingFileError, UserError
from llm_lightning.models import load_exported

SAVED_MODEL_KEY = "llm_lightning_model"
FORMAT = 1
# Attention kernels that ship inside transformers/torch. Anything else (a hub kernel id such as
# "kernels-community/flash-attn") would download and run code, so it is never taken from a file.
BUILTIN_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")
# Config keys that make transformers load code or weights from elsewhere; a training checkpoint
# never needs them.
REFUSED_CONFIG_KEYS = ("auto_map", "quantization_config")


def load_saved(path: str | Path):
    """Return (model, tokenizer, label_names) from a `model/`, `quantized/` or runtime (ONNX Runtime,
    OpenVINO) folder, or a `.ckpt` file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"No model at {path}: pass a run's `model/` folder or a checkpoint (.ckpt).")
    if path.is_dir():
        from llm_lightning.quantization.saved import is_quantized_dir, load_quantized
        from llm_lightning.runtimes import is_runtime_dir, load_runtime_dir

        if is_runtime_dir(path):  # an ONNX Runtime or OpenVINO export (llm_lightning/runtimes/)
            model, tokenizer = load_runtime_dir(path)
        # quantization.json + torchao (or bf16) weights (llm_lightning/quantization/saved.py)
        elif is_quantized_dir(path):
            model, tokenizer = load_quantized(path)
        else:
            model, tokenizer = load_exported(path)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return model, tokenizer, names
    return _from_checkpoint(path)


def checkpoint_entry(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild `model` (a transformers classifier or a peft wrapper of
    it) without any config: plain containers only, so `torch.load(weights_only=True)` reads them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    attn = getattr(base.config, "_attn_implementation", None)
    return {
        "format": FORMAT,
        "config": base.config.to_dict(),
        "attn_implementation": attn if attn in BUILTIN_ATTENTION else None,
        "tokenizer": None if tokenizer is None else tokenizer_files(tokenizer),
        "lora": _lora_settings(model),
    }


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, str | bytes]:
    """`tokenizer.save_pretrained`'s files as {name: text}, or bytes for a binary file."""
    files: dict[str, str | bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            data = path.read_bytes()
            try:
                files[path.name] = data.decode("utf-8")
            except UnicodeDecodeError:  # e.g. a sentencepiece model
                files[path.name] = data
    return files


def _lora_settings(model: torch.nn.Module) -> dict | None:
    """The hyperparameters `add_lora` was called with, read back from peft's config."""
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        return None
    lora = peft_config["default"]
    return {
        "r": int(lora.r),
        "alpha": lora.lora_alpha,
        "dropout": float(lora.lora_dropout),
        "target_modules": sorted(lora.target_modules),
    }


def _from_checkpoint(ckpt: Path):
    state = safe_load(ckpt)  # weights_only: no pickled code from the file ever runs
    entry = state.get(SAVED_MODEL_KEY)
    if entry is None:
        raise UserError(
            f"{ckpt} holds no model config of its own (it was written before checkpoints stored "
            f"`{SAVED_MODEL_KEY}`). A checkpoint is no longer rebuilt from its run's "
            ".hydra/config.yaml, because that config can name remote code or a hub id to load. "
            f"Evaluate the run's exported model/ folder instead{_exported_hint(ckpt)}, or retrain."
        )
    if entry.get("format") != FORMAT:
        raise UserError(f"{ckpt}: saved model format {entry.get('format')!r}; this version reads {FORMAT}.")
    names = list(state["hyper_parameters"]["label_names"])
    tokenizer = _tokenizer(entry.get("tokenizer"), ckpt)
    model = _model(entry, ckpt)
    if entry.get("lora"):
        from llm_lightning.models.lora import add_lora, merged

        model = add_lora(model, SimpleNamespace(**entry["lora"]))
        _load_weights(model, state["state_dict"], ckpt)
        model = merged(model)
    else:
        _load_weights(model, state["state_dict"], ckpt)
    model, tokenizer = with_pad_token(model, tokenizer)
    return model.eval(), tokenizer, names


def _model(entry: dict, ckpt: Path) -> PreTrainedModel:
    """The classifier described by the checkpoint's config, with transformers' own classes only."""
    values = dict(entry["config"])
    model_type = values.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise UserError(
            f"{ckpt}: model_type={model_type!r} is not a model transformers knows, and a checkpoint "
            "never loads custom model code. Evaluate the run's exported model/ folder, or retrain "
            "with a model transformers supports."
        )
    refused = [key for key in REFUSED_CONFIG_KEYS if values.get(key)]
    if refused:
        raise UserError(
            f"{ckpt}: the saved model config has {refused}, which would make transformers load code "
            "or weights from elsewhere; a checkpoint never does. Evaluate the run's exported model/ "
            "folder, or retrain."
        )
    values.pop("_name_or_path", None)  # where the weights once came from: nothing is loaded from it
    config = AutoConfig.for_model(model_type, **values)
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():  # every weight is replaced by the checkpoint's (strictly checked)
            return AutoModelForSequenceClassification.from_config(
                config,
                dtype=torch.float32,
                attn_implementation=_attention(entry.get("attn_implementation")),
                trust_remote_code=False,
            )
    except ValueError as err:  # transformers has no sequence classifier for this model type
        raise UserError(f"{ckpt}: cannot build a {model_type} sequence classifier: {err}") from err


def _attention(name: str | None) -> str | None:
    return name if name in BUILTIN_ATTENTION else None  # None: transformers' default


def _tokenizer(files: dict | None, ckpt: Path) -> PreTrainedTokenizerBase:
    if not files:
        raise UserError(
            f"{ckpt} was saved without its tokenizer (the module had none: SequenceClassifier(..., "
            f"tokenizer=...)). Evaluate the run's exported model/ folder instead{_exported_hint(ckpt)}."
        )
    bad = [
        name
        for name in files
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..")
    ]
    if bad:  # names come from the file: none may write outside the temporary folder
        raise UserError(f"{ckpt}: tokenizer file names {bad} are not plain file names.")
    config = files.get("tokenizer_config.json")
    if config and "auto_map" in json.loads(config):
        raise UserError(
            f"{ckpt}: the saved tokenizer_config.json has `auto_map` (custom tokenizer code); "
            "a checkpoint never loads code. Evaluate the run's exported model/ folder instead."
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        try:
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        except (OSError, ValueError) as err:
            raise UserError(f"{ckpt}: its saved tokenizer does not load: {err}") from err


def _exported_hint(ckpt: Path) -> str:
    for parent in list(ckpt.parents)[:2]:  # <run>/checkpoints/<name>.ckpt, or <run>/<name>.ckpt
        if (parent / "model" / "config.json").exists():
            return f" ({parent / 'model'})"
    return ""


def _load_weights(model, state_dict: dict, ckpt: Path) -> None:
    weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # torch raises on shape mismatches even with strict=False
        lines = str(err).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise UserError(
            f"{ckpt}: its weights do not fit the model config stored beside them "
            f"({len(lines) - 1} mismatches; first: {first}). Was the checkpoint edited? "
            "Evaluate the run's exported model/ folder instead."
        ) from err
    if missing or unexpected:
        raise UserError(
            f"{ckpt}: its weights do not fit the model config stored beside them: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}. Was the checkpoint edited? "
            "Evaluate the run's exported model/ folder instead."
        )
