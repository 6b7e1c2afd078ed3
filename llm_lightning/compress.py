"""One command from fine-tuning to a small, fast model, with a report comparing every stage.

    python -m llm_lightning.compress                                  # conf/compress.yaml: gradual_11_layers
    python -m llm_lightning.compress recipe=quick_15_layers          # conf/recipes/quick_15_layers.yaml
    python -m llm_lightning.compress out=/tmp/chain 'common=[model=tiny,debug=smoke]'

The stages come from a recipe (conf/recipes/): each in its own folder under `out`, each exporting
its model, run in the order written; `teacher` first. The default, `gradual_11_layers`:

    teacher/        fine-tune                                          -> teacher/model
    layers15/       depth-prune 30 -> 15 layers, distil from teacher   -> layers15/model
    layers15_more/  distil again on more texts                         -> ...
    layers12/, layers12_more/, layers11/   prune a little, distil, ...
    quantized/      quantize the last stage's model (torchao)          -> quantized/
    report.json, report.md, pareto.png, tensorboard/report   every stage measured the same way

`quick_15_layers` is `teacher -> pruned -> distilled`: one pruning, one distillation.
The training stages are `llm_lightning.train.train` runs composed from conf/train.yaml with
`common` and then the stage's own overrides (a later override of the same key wins); a stage
names an earlier one's model as `{name}`. A stage whose exported model exists is skipped, so
rerunning the command resumes at the first missing one. Stage names after `teacher`: lower case,
digits, `_`. The last training stage is the one quantized; a stage whose config prunes
(`prune.method` other than `none`) counts as a compression in the report's speed check.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from llm_lightning.quantized_dir import META_FILE

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIRST_STAGE = "teacher"  # fine-tuned first; its config gives the report its task, bench and runtime
QUANTIZED = "quantized"  # the last stage's folder, not a training stage


def training_stages(chain: DictConfig) -> list[str]:
    """The chain's training stages in the order they run, checked: `teacher` first, then folder-safe
    names, none of them `quantized`."""
    names = list(chain.get("stages") or [])
    bad = [n for n in names if n == QUANTIZED or not re.fullmatch(r"[a-z][a-z0-9_]*", n)]
    if not names or names[0] != FIRST_STAGE or bad:
        raise ValueError(
            f"compress stages {names}: the first must be {FIRST_STAGE!r} (the fine-tuned model the others "
            f"start from), and each name lower case letters, digits or '_', not {QUANTIZED!r}"
            + (f" (refused: {bad})" if bad else "")
            + " (key `stages` of the recipe, conf/recipes/; `recipe` picks one)."
        )
    return names


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

    paths = {name: str(out / name / "model") for name in training_stages(chain)}
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
    if stage == QUANTIZED:
        return (out / QUANTIZED / META_FILE).exists()
    return (out / stage / "model" / "config.json").exists()


def compress(chain: DictConfig) -> dict:
    """Run the missing stages, then measure every stage and write the report. Returns the report."""
    from llm_lightning.train import apply_runtime, train

    out = Path(chain.out)
    stages = training_stages(chain)
    for stage in stages:
        if done(out, stage):
            print(f"[compress] {stage}: {out / stage / 'model'} exists, skipped", flush=True)
            continue
        print(f"[compress] {stage}: training in {out / stage}", flush=True)
        train(stage_config(chain, stage, out))
    cfg = stage_config(chain, FIRST_STAGE, out)  # task, seed, bench and runtime for the report
    apply_runtime(cfg.runtime)
    with open_dict(cfg):
        cfg.quantize = OmegaConf.merge(cfg.quantize, chain.quantize)
    # a stage prunes when its composed config does (`prune=`, or an experiment that picks it)
    pruning = [s for s in stages if stage_config(chain, s, out).prune.method != "none"]
    return quantize_and_report(cfg, out, stages, pruning)


def quantize_and_report(cfg: DictConfig, out: Path, stages: list[str], pruning: list[str]) -> dict:
    """Quantize the last training stage's model (unless done), then measure every stage in order.
    `pruning`: the stages that must be faster than their input, besides the quantized one."""
    from llm_lightning.data import load_task
    from llm_lightning.models.saved import load_saved
    from llm_lightning.quantize import check_platform, quantize_with_config, saved_settings
    from llm_lightning.quantized_dir import save_quantized
    from llm_lightning.stages import bench_settings, measure_stage, require_test_split, write_report

    q = cfg.quantize
    check_platform(q.method, "cpu", q.get("group_size", 128))
    data = load_task(cfg.task, cfg.seed)
    require_test_split(data, str(out))
    if not done(out, QUANTIZED):
        model, tokenizer, _ = load_saved(out / stages[-1] / "model")
        quantized = quantize_with_config(model, tokenizer, q, data, cfg.task.max_length)
        save_quantized(quantized, tokenizer, out / QUANTIZED, q.method, q.compile, **saved_settings(q))
        print(f"[compress] quantized: {q.method} -> {out / QUANTIZED}", flush=True)
    settings, rows, previous = bench_settings(cfg), [], None
    for stage in (*stages, QUANTIZED):
        path = out / stage if stage == QUANTIZED else out / stage / "model"
        model, tokenizer, _ = load_saved(path)
        compile = stage == QUANTIZED and bool(q.compile)
        name = f"quantized ({q.method}{'+compile' if compile else ''})" if stage == QUANTIZED else stage
        # distillation retrains the pruned shape: only pruning and quantization must be faster
        compressed = stage in pruning or stage == QUANTIZED
        rows.append(
            measure_stage(name, model, tokenizer, data, cfg, path, settings, compile, previous, compressed)
        )
        previous = name
        del model
    return write_report(rows, out, cfg, require_speedup=bool(q.get("require_speedup", False)))


def load_chain(args: list[str]) -> DictConfig:
    """conf/compress.yaml, then its recipe (`recipe=<name or file>` among `args`, else the file's
    `recipe` key) whose `stages` are the chain's, then the other `key=value` arguments."""
    chain = OmegaConf.load(CONF / "compress.yaml")
    recipes = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
    recipe = recipes[-1] if recipes else chain.get("recipe")
    if recipe not in (None, "null", ""):
        path = Path(recipe) if recipe.endswith(".yaml") else CONF / "recipes" / f"{recipe}.yaml"
        if not path.exists():
            shipped = sorted(f.stem for f in (CONF / "recipes").glob("*.yaml"))
            raise FileNotFoundError(
                f"recipe={recipe!r}: no {path}; shipped recipes: {shipped}, or a .yaml path."
            )
        own = OmegaConf.load(path)
        if "stages" in own:
            chain.stages = own.stages  # replaced, not merged: a recipe names all of its stages
        chain = OmegaConf.merge(chain, {k: v for k, v in own.items() if k != "stages"})
        chain.recipe = recipe
    return OmegaConf.merge(chain, OmegaConf.from_dotlist([a for a in args if not a.startswith("recipe=")]))


def main(argv: list[str] | None = None) -> None:
    compress(load_chain(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
