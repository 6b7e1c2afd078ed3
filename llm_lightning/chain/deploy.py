"""compress's `deploy` list: more forms of the final student, each built beside `quantized/` and
measured in the same report, so the report shows which one to deploy.

    python -m llm_lightning.compress 'deploy=[openvino_int8,onnx_int8,bf16]'
    python -m llm_lightning.compress 'deploy={openvino_int8:{calibration_texts:600},bf16:{}}'

Each entry is a `quantize=` choice (conf/quantize/<choice>.yaml; in the mapping form, with some of
its keys changed), built from the last training stage's model into `<out>/deploy/<choice>/` and
fingerprinted like the quantized stage: a rerun rebuilds only the ones whose settings or input
changed.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from llm_lightning.errors import UserError

DEPLOY = "deploy"  # <out>/deploy/<choice>/


def deploy_configs(chain: DictConfig, quantize_choices: Path) -> dict[str, DictConfig]:
    """Each `deploy` entry's settings, checked (packages installed, platform) before any stage
    trains: a missing runtime fails now, not after hours of training."""
    from llm_lightning.quantization.settings import METHODS, check_settings

    given = chain.get(DEPLOY) or {}
    if isinstance(given, str):  # deploy=bf16: one choice
        given = [given]
    collection = isinstance(given, ListConfig | list | DictConfig | dict)
    names = [str(c) for c in given] if collection else [str(given)]
    valid = [m for m in METHODS if m != "none"]
    bad = [c for c in names if c not in valid]
    if not collection or bad or len(set(names)) != len(names):
        problem = f"{bad} are not quantize choices" if bad else "give each choice once"
        raise UserError(
            f"compress: deploy={given}: {problem}; list choices of {valid}, e.g. [openvino_int8, bf16], "
            "or map each to the keys it changes, e.g. {openvino_int8: {calibration_texts: 600}} "
            "(key `deploy` of conf/compress.yaml)."
        )
    changes = given if isinstance(given, DictConfig | dict) else dict.fromkeys(names)
    configs = {}
    for choice in names:
        shipped = OmegaConf.load(Path(quantize_choices) / f"{choice}.yaml")
        changed = changes[choice] or {}
        unknown = sorted(set(map(str, changed)) - set(map(str, shipped)))
        if unknown:
            raise UserError(
                f"compress: deploy entry {choice!r} has unknown keys {unknown}; its keys are "
                f"{sorted(map(str, shipped))} (conf/quantize/{choice}.yaml)."
            )
        configs[choice] = OmegaConf.merge(shipped, changed)
        try:
            check_settings(configs[choice], require_method=True)
        except UserError as err:
            raise UserError(f"compress: deploy entry {choice!r} (key `deploy`): {err}") from err
    return configs


def made_file(folder: Path, method: str) -> Path:
    """The file a finished build of `method` leaves in `folder` (written last, atomically)."""
    from llm_lightning.quantization.saved import META_FILE
    from llm_lightning.runtimes import CHOICES, RUNTIME_FILE

    return Path(folder) / (RUNTIME_FILE if method in CHOICES else META_FILE)


def stage_name(method: str, compile: bool, prefix: str) -> str:
    """A report row's name, e.g. `quantized (int8_dynamic+compile)` or `deploy (openvino_int8)`."""
    return f"{prefix} ({method}{'+compile' if compile else ''})"
