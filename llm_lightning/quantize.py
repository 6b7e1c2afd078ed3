"""Post-training quantization of an exported classifier: torchao, or an export for ONNX Runtime or
OpenVINO (quantize=onnx_int8 | openvino_int8 | openvino_bf16, llm_lightning/runtimes/).

    python -m llm_lightning.quantize model_path=outputs/sentiment/<date>/<time>/model quantize=int8_dynamic
    python -m llm_lightning.train task=sentiment quantize=int8_dynamic     # after training, on model/

The quantized model is saved to `<run>/quantized/` in the format of
`llm_lightning.quantization.saved`, which `evaluate` and `predict` load; then it is evaluated on
the task's test split and benchmarked next to its fp32 input (llm_lightning.measure.stage_report).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from llm_lightning.errors import MissingFileError
from llm_lightning.quantization.saved import save_quantized
from llm_lightning.quantization.settings import RUNTIME_EXPORTS, check_settings, compiles, saved_settings
from llm_lightning.quantization.torchao_path import quantize_with_config
from llm_lightning.runtime import apply_runtime, run_entry, user_errors
from llm_lightning.runtimes import used_settings as runtime_settings
from llm_lightning.runtimes.build import export_runtime

log = logging.getLogger(__name__)


def quantize_run(cfg: DictConfig, out: Path, model_dir: Path | None = None) -> dict:
    """Quantize `model_dir` (default `<out>/model`) into `<out>/quantized/`, then measure both on
    the test split and write the per-stage report to `out`. Returns the quantized stage's
    measurements as `quantize/...` metrics."""
    from llm_lightning.data import load_task
    from llm_lightning.data.provenance import check_split
    from llm_lightning.measure.stage_report import Stage, report_stages, require_test_split

    out = Path(out)
    qcfg = cfg.quantize
    model_dir = Path(model_dir) if model_dir is not None else out / "model"
    data = load_task(cfg.task, cfg.seed)
    check_settings(qcfg, data, require_method=True)
    if not (model_dir / "config.json").exists():
        raise MissingFileError(
            f"quantize: no exported model at {model_dir} (set export=true, or pass "
            "model_path=<a run's model/ folder>)."
        )
    check_split(model_dir, cfg.task, cfg.seed, data, allow=bool(cfg.get("allow_split_mismatch")))
    require_test_split(data, str(model_dir))  # before quantizing, which can take minutes
    used = quantize_folder(model_dir, out / "quantized", qcfg, data, cfg.task.max_length)
    name = qcfg.method + ("+compile" if compiles(qcfg) else "")
    stages = [Stage("fp32", model_dir), Stage(name, out / "quantized", "fp32", compiles(qcfg))]
    report = report_stages(stages, data, cfg, out, used, bool(qcfg.get("require_speedup", False)))
    final = report["stages"][-1]
    return {f"quantize/{k}": v for k, v in final.items() if isinstance(v, float)}


def quantize_folder(model_dir: Path, target: Path, qcfg: DictConfig, data, max_length: int) -> dict:
    """Load the exported model in `model_dir`, quantize it with a checked `quantize=` config and
    save it to `target` with the input's training record. Returns the settings it was made with
    (`smoothquant_alpha: auto`, or a runtime export's `smooth_quant_alpha: auto`, replaced by the
    alpha chosen on the validation split), for the report."""
    from llm_lightning.data.provenance import read_provenance
    from llm_lightning.models.saved import load_saved

    model, tokenizer, _ = load_saved(model_dir)
    training = read_provenance(model_dir)[0]
    if qcfg.method in RUNTIME_EXPORTS:  # a folder for ONNX Runtime or OpenVINO (llm_lightning/runtimes/)
        export_runtime(
            model,
            tokenizer,
            qcfg.method,
            target,
            data.train.texts,
            max_length,
            qcfg,
            training,
            data.val.texts,
        )
        return runtime_settings(qcfg, target)
    quantized, used = quantize_with_config(model, tokenizer, qcfg, data, max_length)
    save_quantized(
        quantized, tokenizer, target, qcfg.method, qcfg.compile, **saved_settings(used), training=training
    )
    return used


@hydra.main(version_base="1.3", config_path="../conf", config_name="quantize_model")
@user_errors
def main(cfg: DictConfig) -> None:
    apply_runtime(cfg.runtime)
    metrics = quantize_run(cfg, Path(cfg.output_dir), Path(cfg.model_path).expanduser())
    print(json.dumps(metrics, indent=2, sort_keys=True), flush=True)


if __name__ == "__main__":
    run_entry(main)
