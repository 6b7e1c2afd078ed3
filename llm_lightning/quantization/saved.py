"""The folder a quantized model is saved to, and how it loads.

    quantized/
      config.json, tokenizer files    as in model/ (save_pretrained)
      quantization.json               {"format": 3, "method", "compile", "skip",
                                      "smoothquant_alpha", "activations", "centered",
                                      "built_with_activations", "fused_projections", "torch",
                                      "torchao", "weights", "attn_implementation"}; formats 1 (no "centered") and 2 (no
                                      "fused_projections") load too
      training.json                   the input model's data record (llm_lightning.data.provenance)
      model.safetensors               quantize=bf16 only: save_pretrained's bf16 weights, which
                                      transformers loads alone (`from_pretrained(path, dtype=torch.bfloat16)`)
      quantized_weights.pt            torch.save(state_dict): the quantized linear weights are torchao
                                      tensor subclasses (Int8Tensor), everything else (embeddings,
                                      the `quantize.skip` layers) plain tensors. With
                                      "fused_projections", a Llama layer's q/k/v weights are one
                                      `self_attn.qkv_proj` (rows q, k, v) and gate/up one
                                      `mlp.gate_up_proj` (llm_lightning.quantization.fused_projections)

`quantized_weights.pt` loads with `torch.load(weights_only=True)`: torchao registers its tensor
classes as safe globals, so no pickled code runs. The weights need the same minor torchao version (`check_torchao_version`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from llm_lightning.artifacts import atomic_dir, write_json
from llm_lightning.errors import UserError
from llm_lightning.quantization.centering import CENTERED, center_activations
from llm_lightning.quantization.fused_projections import fuse_projections, is_fused
from llm_lightning.quantization.onednn_int8 import int8_codes_name
from llm_lightning.quantization.settings import FLOAT_METHODS, settings_as_used

log = logging.getLogger(__name__)

WEIGHTS_FILE = "quantized_weights.pt"
META_FILE = "quantization.json"
FORMAT_VERSION = 3
READABLE_FORMATS = (
    1,
    2,
    3,
)  # 2 added "centered" (llm_lightning.quantization.centering), 3 "fused_projections"


def save_quantized(
    model: nn.Module,
    tokenizer,
    target: Path,
    method: str,
    compile: bool = False,
    skip: Sequence[str] = (),
    smoothquant_alpha: float | None = None,
    activations: str = "symmetric",
    training: dict | None = None,
) -> Path:
    """Write the quantized model in the format described at the top of this file; `training`, the
    input model's training.json (llm_lightning.data.provenance), travels with it."""
    import torchao

    def write(tmp: Path) -> None:
        tokenizer.save_pretrained(tmp)
        if method in FLOAT_METHODS:  # plain transformers weights: no torchao needed to load them
            model.save_pretrained(tmp)
        else:
            model.config.save_pretrained(tmp)
            torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
        meta = {
            "format": FORMAT_VERSION,
            "method": method,
            "compile": bool(compile),
            "skip": list(skip),  # fnmatch patterns of the linear layers left in float
            "smoothquant_alpha": smoothquant_alpha,  # the smoothing is inside the weights (act_pre_scale)
            "activations": activations if method == "int8_dynamic" else None,
            # asymmetric by centring: the loader must centre again (llm_lightning.quantization.centering)
            "centered": (centered := any(getattr(m, CENTERED, False) for m in model.modules())),
            # the activation codes of this CPU, under which the folder was built and its alpha chosen;
            # a CPU that loads it uses its own (7-bit without VNNI: llm_lightning.quantization.onednn_int8)
            "built_with_activations": int8_codes_name() if centered else None,
            # the loader must stack the same layers before the weights fit
            "fused_projections": is_fused(model),
            "torch": torch.__version__,
            "torchao": None if method in FLOAT_METHODS else torchao.__version__,
            "weights": "model.safetensors" if method in FLOAT_METHODS else WEIGHTS_FILE,
            # not in config.json; eager attention is the faster one on CPU for short texts
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if training is not None:
            write_json(tmp / "training.json", training)

    return atomic_dir(target, write)


def is_quantized_dir(path: Path) -> bool:
    return (Path(path) / META_FILE).exists()


def read_meta(path: Path) -> dict:
    """The quantization.json of a folder written by `save_quantized`."""
    return json.loads((Path(path) / META_FILE).read_text())


def used_settings(qcfg, path: Path) -> dict:
    """`qcfg` as the quantized model in `path` was made with it (`settings_as_used`), with the
    SmoothQuant alpha its quantization.json records: the config may say `auto`."""
    return settings_as_used(qcfg, read_meta(path).get("smoothquant_alpha"))


def load_quantized(path: Path):
    """Return (model, tokenizer) from a folder written by `save_quantized`, in eval mode, not compiled."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from llm_lightning.data.batching import with_pad_token

    path = Path(path)
    meta = read_meta(path)
    if meta.get("format") not in READABLE_FORMATS:
        raise UserError(
            f"{path / META_FILE}: format {meta.get('format')!r}; this version reads {READABLE_FORMATS}."
        )
    attention = meta.get("attn_implementation") or "eager"
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)  # a folder is data, never code
    if meta.get("method") in FLOAT_METHODS:
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            dtype=torch.bfloat16,
            attn_implementation=attention,
            use_safetensors=True,
            trust_remote_code=False,
        )
        return with_pad_token(model.eval(), tokenizer)
    check_torchao_version(meta, path)
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # a folder is data, never code
    with no_init_weights():  # the placeholders are replaced below; untouched pages cost no memory
        model = AutoModelForSequenceClassification.from_config(
            config, dtype=torch.float32, attn_implementation=attention
        )
    if meta.get("fused_projections"):
        fuse_projections(model, empty=True)  # the saved weights are the stacked ones
    state = torch.load(path / meta["weights"], map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _tied(model, k)]
    if missing or unexpected:
        raise UserError(
            f"{path / meta['weights']} does not fit {path / 'config.json'}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    model.tie_weights()
    if meta.get("centered"):
        center_activations(model)
    return with_pad_token(model.eval(), tokenizer)


def check_torchao_version(meta: dict, path: Path) -> None:
    """The weights are torchao tensor subclasses, pickled by class and field: another minor version
    may rename a field and load wrong or not at all, so a different minor version is refused."""
    import torchao

    saved, installed = meta.get("torchao"), torchao.__version__
    if saved is None or saved == installed:
        return
    if saved.split(".")[:2] != installed.split(".")[:2]:
        raise UserError(
            f"{path / META_FILE} was written with torchao {saved}, and torchao {installed} is installed. "
            f"Install torchao=={saved} to load it, or quantize the model/ folder again with this version."
        )
    log.warning("%s was written with torchao %s; loading with %s.", path, saved, installed)


def _tied(model: nn.Module, key: str) -> bool:
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)
