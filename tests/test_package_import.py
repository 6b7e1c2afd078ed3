"""What importing llm_lightning prints: torchao's import-time noise (its CUDA-only kernels on a CPU
build of torch, torch's deprecation note about its Enums) is dropped, and nothing else either
logger says."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm_lightning import CUDA_ONLY_KERNELS, TORCHAO_ENUM_NOTE


def _stderr(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr


def test_torchaos_cuda_only_kernel_warnings_are_dropped_on_a_cpu_build_and_nothing_else():
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch loads these kernels: nothing is dropped")
    folder = Path(importlib.util.find_spec("torchao").origin).parent
    if not any(k in p.name for p in folder.glob("_C*.so") for k in CUDA_ONLY_KERNELS):
        pytest.skip("this torchao wheel carries no CUDA-only kernels")
    assert "Failed to load" in _stderr("import torchao")  # the noise, without llm_lightning
    ours = _stderr(
        "import llm_lightning, torchao, logging; logging.getLogger('torchao').warning('Failed to load x.so')"
    )
    assert "_C_" not in ours
    assert "Failed to load x.so" in ours  # another file's failure still shows


def test_torchs_note_on_torchaos_enums_is_dropped_and_nothing_else():
    if TORCHAO_ENUM_NOTE not in _stderr("import torchao"):
        pytest.skip("this torch and torchao say nothing about Enums")
    ours = _stderr(
        "import llm_lightning, torchao, logging; logging.getLogger('torch.utils._pytree').warning('other')"
    )
    assert TORCHAO_ENUM_NOTE not in ours
    assert "other" in ours
