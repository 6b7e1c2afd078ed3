"""`check_settings`: every problem of a `quantize=` config in one error, before anything runs."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from llm_lightning.data.tasks import Split, TaskData
from llm_lightning.errors import UserError
from llm_lightning.quantization.settings import (
    DEFAULT_GROUP_SIZE,
    METHODS,
    QuantizationUnsupportedError,
    check_settings,
    settings_as_used,
)
from tests.conftest import CONF


def int8_dynamic(**changes):
    return OmegaConf.merge(OmegaConf.load(CONF / "quantize" / "int8_dynamic.yaml"), changes)


def task(train: int, val: int) -> TaskData:
    def split(n: int) -> Split:
        return Split([f"text {i}" for i in range(n)], [i % 2 for i in range(n)])

    return TaskData(split(train), split(val), split(4), ["negative", "positive"])


def problems(qcfg, data=None, **kwargs) -> list[str]:
    with pytest.raises(UserError) as err:
        check_settings(qcfg, data, **kwargs)
    return str(err.value).splitlines()


def test_the_shipped_configs_pass():
    for method in METHODS:
        if method != "int4_weight_only" or torch.cuda.is_available():
            check_settings(OmegaConf.load(CONF / "quantize" / f"{method}.yaml"), task(8, 8))


def test_every_problem_is_listed_in_one_error_with_its_key_value_and_choices():
    qcfg = OmegaConf.create(
        {
            "method": "int8_weight_only",
            "smoothquant_alpha": 1.5,
            "calibration_texts": 0,
            "activations": "asymmetric",
            "attention": "flash",
        }
    )
    lines = problems(qcfg)
    assert len(lines) == 5, lines
    expected = (
        "quantize.smoothquant_alpha=1.5 needs quantize=int8_dynamic",
        "quantize.smoothquant_alpha=1.5 must be in [0, 1]",
        "SmoothQuant needs calibration texts, got 0 (quantize.calibration_texts >= 1",
        "quantize.activations='asymmetric' needs quantize=int8_dynamic",
        "quantize.attention='flash' is not one of ('eager', 'sdpa')",
    )
    for line, words in zip(lines, expected, strict=True):
        assert line.startswith(words), (line, words)
    assert "quantize.method is 'int8_weight_only'" in lines[0]


def test_an_unknown_method_is_named_with_the_choices_and_none_only_when_quantizing():
    assert problems(OmegaConf.create({"method": "int3", "attention": "flash"})) == [
        f"quantize.method='int3' is not one of {METHODS} (config group `quantize=`)."
    ]  # the other keys say how to quantize with a method: judged once the method is known
    check_settings(OmegaConf.create({"method": "none"}))  # nothing to check
    (line,) = problems(OmegaConf.create({"method": "none"}), require_method=True)
    assert line.startswith("quantize.method='none' leaves nothing to quantize; choose one of ('int8_dynamic'")


def test_with_the_task_smoothquant_needs_training_texts_and_auto_a_validation_split():
    check_settings(int8_dynamic(), task(8, 8))
    lines = problems(int8_dynamic(), task(0, 0))
    assert len(lines) == 2, lines
    assert lines[0].startswith("SmoothQuant needs calibration texts, got 0")
    assert lines[1].startswith("quantize.smoothquant_alpha=auto picks alpha on the validation split")
    check_settings(int8_dynamic(smoothquant_alpha=0.5), task(8, 0))  # a number needs no validation split


def test_bad_candidates_fail_before_anything_runs():
    (line,) = problems(int8_dynamic(smoothquant_candidates=[0.5, 1.5]))
    assert line == "quantize.smoothquant_candidates=[0.5, 1.5]: give one or more alphas in [0, 1]."
    check_settings(int8_dynamic(smoothquant_alpha=0.5, smoothquant_candidates=[1.5]))  # unused: no problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="int4 weight-only runs where CUDA is present")
def test_an_unsupported_platform_is_listed_with_the_other_problems():
    qcfg = OmegaConf.load(CONF / "quantize" / "int4_weight_only.yaml")
    qcfg.activations = "asymmetric"
    with pytest.raises(QuantizationUnsupportedError) as err:
        check_settings(qcfg)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and "cannot run on this platform (cpu" in lines[0], lines
    assert lines[1].startswith("quantize.activations='asymmetric' needs quantize=int8_dynamic")
    assert err.value.__cause__ is not None  # torchao's own error, for the traceback


def test_every_group_size_in_conf_is_the_one_default():
    for path in (CONF / "quantize").glob("*.yaml"):
        qcfg = OmegaConf.load(path)
        assert qcfg.get("group_size", DEFAULT_GROUP_SIZE) == DEFAULT_GROUP_SIZE, path.name


def test_settings_as_used_replace_auto_and_leave_the_config_alone():
    qcfg = int8_dynamic()
    used = settings_as_used(qcfg, 0.4)
    assert used == {**OmegaConf.to_container(qcfg), "smoothquant_alpha": 0.4}
    assert list(used) == list(qcfg) and qcfg.smoothquant_alpha == "auto"
    weight_only = OmegaConf.load(CONF / "quantize" / "int8_weight_only.yaml")
    assert settings_as_used(weight_only, None) == OmegaConf.to_container(weight_only)  # no key added


@pytest.mark.parametrize("codes", ["UNSIGNED_7", "SIGNED_8"])
def test_symmetric_activations_warn_where_torch_int_mm_is_a_scalar_loop(monkeypatch, caplog, codes):
    """Symmetric activations run torchao's own linear, so torch._int_mm: on a CPU without VNNI
    (where oneDNN takes 7-bit codes) that is tens of times slower than fp32, which the check says
    before any work; asymmetric, the default, and CPUs with VNNI or AMX get no warning."""
    from llm_lightning.quantization import onednn_int8

    monkeypatch.setattr(onednn_int8, "activation_codes", lambda: getattr(onednn_int8, codes))
    with caplog.at_level("WARNING"):
        check_settings(int8_dynamic(activations="asymmetric"))
        assert not caplog.records
        check_settings(int8_dynamic(activations="symmetric"))
    warned = [r.getMessage() for r in caplog.records]
    if codes == "UNSIGNED_7":
        assert len(warned) == 1 and "quantize.activations=symmetric" in warned[0] and "no VNNI" in warned[0]
    else:
        assert not warned
