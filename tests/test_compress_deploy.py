"""compress's `deploy` entries: each checked before the first stage trains (the built forms are
tested in tests/test_compress.py, on a chain that has trained)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_lightning.compress import compress
from llm_lightning.errors import UserError


@pytest.mark.parametrize(
    "deploy, error",
    [
        (
            ["openvino_int8", "int3"],
            r"deploy=\['openvino_int8', 'int3'\]: \['int3'\] are not quantize choices",
        ),
        (["bf16", "bf16"], r"deploy=\[.bf16., .bf16.\]: give each choice once"),
        ({"bf16": {"calibration_text": 9}}, r"deploy entry 'bf16' has unknown keys \['calibration_text'\]"),
        ({"bf16": {"skip": ["score"]}}, r"deploy entry 'bf16' \(key `deploy`\): quantize.skip=\['score'\]"),
        ({"onnx_int8": {"onnx_mode": "fast"}}, r"deploy entry 'onnx_int8' .*onnx_mode='fast' is not one of"),
    ],
)
def test_bad_deploy_entries_fail_before_the_first_stage_trains(chain, deploy, error):
    chain.deploy = deploy
    with pytest.raises(UserError, match=r"compress: " + error):
        compress(chain)
    assert not Path(chain.out).exists()
