"""Exports that the runtimes users deploy on load by themselves: ONNX Runtime and OpenVINO.

A runtime folder holds the model file (`model.onnx` or `model.xml`/`model.bin`), the tokenizer
(`tokenizer.json`), `config.json` (labels), `runtime.json` (what it is and how to feed it),
`training.json` (the data record) and a README.md whose ~15 lines run it with only the runtime and
`tokenizers` installed. `predict`, `evaluate` and the stage report load it like any saved model
(llm_lightning.models.saved.load_saved); the runtimes are the optional `deploy` extra.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from llm_lightning.errors import UnsupportedError, UserError

RUNTIME_FILE = "runtime.json"
EXTRA = 'pip install -e ".[deploy]"'
# quantize= choice -> (runtime, precision). fp32 exports are what the runtimes benchmark compares too.
CHOICES = {
    "onnx": ("onnxruntime", "fp32"),
    "onnx_int8": ("onnxruntime", "int8"),
    "openvino": ("openvino", "fp32"),
    "openvino_bf16": ("openvino", "bf16"),
    "openvino_int8": ("openvino", "int8"),
}
MODULES = {"onnxruntime": ("onnxruntime", "onnx", "onnxscript"), "openvino": ("openvino", "nncf")}


def require(choice: str) -> str:
    """The runtime of a `quantize=` choice, after checking its packages import; else a clear error."""
    if choice not in CHOICES:
        raise UserError(
            f"quantize.method={choice!r} is not a runtime export; choose one of {tuple(CHOICES)}."
        )
    runtime = CHOICES[choice][0]
    needed = MODULES[runtime] if CHOICES[choice][1] == "int8" or runtime == "onnxruntime" else ("openvino",)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise UnsupportedError(
            f"quantize={choice} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            f"not installed: {EXTRA} installs the deploy extra (openvino, nncf, onnxruntime, onnx, onnxscript)."
        )
    return runtime


def is_runtime_dir(path: Path) -> bool:
    return (Path(path) / RUNTIME_FILE).is_file()


def choice_of(path: Path) -> str:
    """The `quantize=` choice that wrote a runtime folder, from its runtime.json."""
    return _read(Path(path))[1]


def used_settings(qcfg, path: Path) -> dict:
    """A runtime export's `quantize=` config as a plain dict, with the SmoothQuant alpha its folder
    was made with (`auto` replaced by the number chosen): what the report records."""
    from omegaconf import DictConfig, OmegaConf

    used = OmegaConf.to_container(qcfg, resolve=True) if isinstance(qcfg, DictConfig) else dict(qcfg)
    meta = _read(Path(path))[0]
    if meta.get("smooth_quant_alpha") is not None:
        used["smooth_quant_alpha"] = meta["smooth_quant_alpha"]
    return used


def _read(path: Path) -> tuple[dict, str]:
    meta = json.loads((path / RUNTIME_FILE).read_text())
    runtime = meta.get("runtime")
    if runtime not in MODULES:
        raise UserError(f"{path / RUNTIME_FILE}: runtime={runtime!r} is not one of {tuple(MODULES)}.")
    found = [c for c, (r, p) in CHOICES.items() if r == runtime and p == meta.get("precision")]
    if not found:
        precisions = sorted(p for r, p in CHOICES.values() if r == runtime)
        raise UserError(
            f"{path / RUNTIME_FILE}: precision={meta.get('precision')!r} is not one of {precisions} for {runtime}."
        )
    return meta, found[0]


def load_runtime_dir(path: Path):
    """(model, tokenizer) of a runtime folder: the model a torch-like classifier (`model(input_ids=,
    attention_mask=).logits`) that runs in the folder's own runtime."""
    path = Path(path)
    meta, choice = _read(path)
    runtime = meta["runtime"]
    require(choice)
    module = importlib.import_module(
        f"llm_lightning.runtimes.{'onnx' if runtime == 'onnxruntime' else 'openvino'}"
    )
    return module.load(path, meta)
