"""One command from fine-tuning to a small, fast model, with a report comparing every stage.

    python -m llm_lightning.compress                                  # conf/compress.yaml
    python -m llm_lightning.compress out=/tmp/chain 'common=[model=tiny,debug=smoke]'

Stages, each in its own folder under `out` and each exporting its model:

    teacher/    fine-tune                                   -> teacher/model
    pruned/     depth- or width-prune the teacher, recover  -> pruned/model
    distilled/  distil the teacher into the pruned model    -> distilled/model
    quantized/  quantize the distilled model (torchao)      -> quantized/
    report.json, report.md, pareto.png, tensorboard/report   every stage measured the same way

The training stages are `llm_lightning.train.train` runs composed from conf/train.yaml with
`common` and then the stage's own overrides (a later override of the same key wins). A stage
whose exported model exists is skipped, so rerunning the command resumes at the first missing one.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from llm_lightning.quantized_dir import META_FILE

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAINING_STAGES = ("teacher", "pruned", "distilled")


def merged_overrides(*groups: list[str]) -> list[str]:
    """Overrides in order, keeping only the last one for each key (Hydra refuses duplicates)."""
    last: dict[str, str] = {}
    for override in (o for group in groups for o in group):
        key = override.split("=", 1)[0].lstrip("+~")
        last.pop(key, None)
        last[key] = override
    return list(last.values())


def stage_config(chain: DictConfig, stage: str, out: Path) -> DictConfig:
    """The composed train config of one training stage, writing into `<out>/<stage>`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    paths = {name: str(out / name / "model") for name in TRAINING_STAGES}
    own = [o.format(**paths) for o in chain.stages[stage]]
    overrides = merged_overrides(list(chain.common), own)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out / stage)
        cfg.quantize.method = "none"  # the chain quantizes once, at the end
    return cfg


def done(out: Path, stage: str) -> bool:
    if stage == "quantized":
        return (out / "quantized" / META_FILE).exists()
    return (out / stage / "model" / "config.json").exists()


def compress(chain: DictConfig) -> dict:
    """Run the missing stages, then measure every stage and write the report. Returns the report."""
    from llm_lightning.train import apply_runtime, train

    out = Path(chain.out)
    unknown = sorted(set(chain.stages) - set(TRAINING_STAGES))
    if unknown:
        raise ValueError(
            f"compress stages {unknown} are not among {TRAINING_STAGES} (key `stages` in conf/compress.yaml)."
        )
    for stage in TRAINING_STAGES:
        if done(out, stage):
            print(f"[compress] {stage}: {out / stage / 'model'} exists, skipped", flush=True)
            continue
        print(f"[compress] {stage}: training in {out / stage}", flush=True)
        train(stage_config(chain, stage, out))
    cfg = stage_config(chain, "teacher", out)  # task, seed, bench and runtime for the report
    apply_runtime(cfg.runtime)
    with open_dict(cfg):
        cfg.quantize = OmegaConf.merge(cfg.quantize, chain.quantize)
    return quantize_and_report(cfg, out)


def quantize_and_report(cfg: DictConfig, out: Path) -> dict:
    from llm_lightning.data import load_task
    from llm_lightning.models.saved import load_saved
    from llm_lightning.quantize import check_platform, quantize_with_config, saved_settings
    from llm_lightning.quantized_dir import save_quantized
    from llm_lightning.stages import bench_settings, measure_stage, require_test_split, write_report

    q = cfg.quantize
    check_platform(q.method, "cpu", q.get("group_size", 128))
    data = load_task(cfg.task, cfg.seed)
    require_test_split(data, str(out))
    if not done(out, "quantized"):
        model, tokenizer, _ = load_saved(out / "distilled" / "model")
        quantized = quantize_with_config(model, tokenizer, q, data, cfg.task.max_length)
        save_quantized(quantized, tokenizer, out / "quantized", q.method, q.compile, **saved_settings(q))
        print(f"[compress] quantized: {q.method} -> {out / 'quantized'}", flush=True)
    settings, rows, previous = bench_settings(cfg), [], None
    for stage in (*TRAINING_STAGES, "quantized"):
        path = out / stage if stage == "quantized" else out / stage / "model"
        model, tokenizer, _ = load_saved(path)
        compile = stage == "quantized" and bool(q.compile)
        name = f"quantized ({q.method}{'+compile' if compile else ''})" if stage == "quantized" else stage
        # distillation retrains the pruned shape: only pruning and quantization must be faster
        compressed = stage in ("pruned", "quantized")
        rows.append(
            measure_stage(name, model, tokenizer, data, cfg, path, settings, compile, previous, compressed)
        )
        previous = name
        del model
    return write_report(rows, out, cfg, require_speedup=bool(q.get("require_speedup", False)))


def main(argv: list[str] | None = None) -> None:
    chain = OmegaConf.load(CONF / "compress.yaml")
    chain = OmegaConf.merge(chain, OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv)))
    compress(chain)


if __name__ == "__main__":
    main()
