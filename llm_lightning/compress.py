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
names an earlier one's model as `{name}`. Stage names after `teacher`: lower case, digits, `_`.
The last training stage is the one quantized; a stage whose config prunes (`prune.method` other
than `none`) counts as a compression in the report's speed check.

Every stage is composed and checked before the first one trains, so a typo in the last stage fails
at once. Each stage records what it was made from in `<stage>/stage.json` (llm_lightning.stage_record):
a rerun reuses a stage whose settings and inputs are unchanged, resumes an interrupted one from its
last.ckpt when its settings are the same, and retrains a changed one and every stage that reads
from it. Unknown command-line keys are errors.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from llm_lightning.chain_checks import check_arguments, check_quantize, check_stage, valid_keys
from llm_lightning.errors import MissingFileError, UserError
from llm_lightning.quantized_dir import META_FILE
from llm_lightning.runtime import user_errors
from llm_lightning.stage_record import (
    DONE,
    RESUME,
    REUSE,
    RUNNING,
    STALE,
    TRAIN,
    Decision,
    Fingerprint,
    decide,
    discard_aside,
    set_aside,
    settings_of,
    write_record,
)

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIRST_STAGE = "teacher"  # fine-tuned first; its config gives the report its task, bench and runtime
QUANTIZED = "quantized"  # the last stage's folder, not a training stage
STAGE_REF = re.compile(r"\{([a-z][a-z0-9_]*)\}")  # `{name}`; a Hydra dict override `{k: v}` never matches
# the quantized stage's settings that only the report reads
QUANTIZE_UNFINGERPRINTED = ("require_speedup",)


@dataclass
class Chain:
    """A chain composed and checked, before anything runs."""

    out: Path
    stages: list[str]
    configs: dict[str, DictConfig]  # each training stage's composed train config
    inputs: dict[str, list[str]]  # the earlier stages each one reads (`{name}`)
    fingerprints: dict[str, Fingerprint]
    quantize: DictConfig  # the quantized stage's settings: conf/quantize/none + the chain's `quantize`
    quantized: Fingerprint


def training_stages(chain: DictConfig) -> list[str]:
    """The chain's training stages in the order they run, checked: `teacher` first, then folder-safe
    names, none of them `quantized`."""
    names = list(chain.get("stages") or [])
    bad = [n for n in names if n == QUANTIZED or not re.fullmatch(r"[a-z][a-z0-9_]*", n)]
    if not names or names[0] != FIRST_STAGE or bad:
        raise UserError(
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


def stage_inputs(chain: DictConfig, stage: str, stages: list[str]) -> list[str]:
    """The stages whose model `stage` reads (`{name}` in its overrides): earlier ones only."""
    named = [n for o in chain.stages[stage] for n in STAGE_REF.findall(str(o))]
    earlier = stages[: stages.index(stage)]
    wrong = [n for n in named if n not in earlier]
    if wrong:
        raise UserError(
            f"compress stage {stage!r} reads {{{wrong[0]}}}, which is not a stage that runs before it; "
            f"it can read the model of {earlier} (key `stages.{stage}` of the recipe)."
        )
    return list(dict.fromkeys(named))


def stage_config(chain: DictConfig, stage: str, out: Path) -> DictConfig:
    """The composed train config of one training stage, writing into `<out>/<stage>`. A config that
    does not compose, leaves a `???` unset or does not resolve is a UserError naming the stage."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    paths = {name: str(out / name / "model") for name in training_stages(chain)}
    own = [STAGE_REF.sub(lambda m: paths.get(m[1], m[0]), str(o)) for o in chain.stages[stage]]
    overrides = merged_overrides(list(chain.common), own)
    where = f"compress stage {stage!r} (key `stages.{stage}` of the recipe, or `common`)"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        # Hydra lists its config search path after an unknown choice: not the user's business
        raise UserError(
            f"{where} does not compose: {str(err).split('Config search path')[0].strip()}"
        ) from err
    with open_dict(cfg):
        cfg.output_dir = str(out / stage)
        cfg.quantize.method = "none"  # the chain quantizes once, at the end
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(f"{where} leaves {missing} unset (`???` in conf/): give them a value.")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(f"{where} does not resolve: {err}") from err
    return cfg


def prepare(chain: DictConfig) -> Chain:
    """Compose every stage, check all that can be checked without models, fingerprint each stage."""
    out = Path(chain.out)
    stages = training_stages(chain)
    inputs = {s: stage_inputs(chain, s, stages) for s in stages}
    configs = {s: stage_config(chain, s, out) for s in stages}
    first = configs[FIRST_STAGE]
    with open_dict(first):
        quantize = OmegaConf.merge(first.quantize, chain.quantize)
    check_quantize(quantize)
    models = {str(out / s / "model") for s in stages}
    for stage in stages:
        check_stage(configs[stage], stage, first, models)
    fingerprints: dict[str, Fingerprint] = {}
    for s in stages:  # in order: a stage's inputs are fingerprinted before it
        fingerprints[s] = Fingerprint(
            settings_of(configs[s], out), {n: fingerprints[n].value for n in inputs[s]}
        )
    last = stages[-1]
    quantized = Fingerprint(
        settings_of(quantize, out, QUANTIZE_UNFINGERPRINTED), {last: fingerprints[last].value}
    )
    return Chain(out, stages, configs, inputs, fingerprints, quantize, quantized)


def plan(prepared: Chain) -> dict[str, Decision]:
    """What each training stage will do (reuse, resume, train) and why; printed before it starts."""
    from llm_lightning.resume import checkpoint_dir

    out, stages = prepared.out, prepared.stages
    decisions = {
        s: decide(
            out / s,
            prepared.fingerprints[s],
            out / s / "model" / "config.json",
            checkpoint_dir(prepared.configs[s]) / "last.ckpt",
        )
        for s in stages
    }
    for stage in stages:
        d = decisions[stage]
        line = f"[compress] {stage}: {d.reason}"
        if d.action == REUSE:
            line += f"; reused ({out / stage / 'model'})"
        if d.changed:
            line += (
                f"; retrained, and so are the later stages that read from it: {readers_of(stage, prepared)}"
            )
        if d.action == TRAIN and (out / stage).exists():
            line += (
                f"; starts afresh, its previous folder kept as {out / stage}{STALE} until the new one is done"
            )
        print(line, flush=True)
    return decisions


def readers_of(stage: str, prepared: Chain) -> list[str]:
    """The stages after `stage` that read its model, directly or through another stage."""
    found = {stage}
    for s in prepared.stages:
        if found & set(prepared.inputs[s]):
            found.add(s)
    later = [s for s in prepared.stages if s in found and s != stage]
    return [*later, QUANTIZED] if prepared.stages[-1] in found else later


def train_stages(chain: DictConfig) -> Chain:
    """Compose and check every stage, then train the ones that are new, interrupted or changed."""
    from llm_lightning.train import train

    prepared = prepare(chain)
    out = prepared.out
    for stage, decision in plan(prepared).items():
        if decision.action == REUSE:
            continue
        cfg = prepared.configs[stage]
        with open_dict(cfg):  # compress owns the resume: only its own last.ckpt, only when it matches
            cfg.ckpt_path = "last" if decision.action == RESUME else None
        if decision.action != RESUME:
            set_aside(out / stage)
        doing = "resuming" if decision.action == RESUME else "training"
        print(f"[compress] {stage}: {doing} in {out / stage}", flush=True)
        write_record(out / stage, RUNNING, prepared.fingerprints[stage])
        train(cfg)
        write_record(out / stage, DONE, prepared.fingerprints[stage])
        discard_aside(out / stage)
    return prepared


def compress(chain: DictConfig) -> dict:
    """Run the missing stages, then measure every stage and write the report. Returns the report."""
    from llm_lightning.runtime import apply_runtime

    prepared = train_stages(chain)
    cfg = prepared.configs[FIRST_STAGE]  # task, seed, bench and runtime for the report
    apply_runtime(cfg.runtime)
    with open_dict(cfg):
        cfg.quantize = prepared.quantize
    # a stage prunes when its composed config does (`prune=`, or an experiment that picks it)
    pruning = [s for s in prepared.stages if prepared.configs[s].prune.method != "none"]
    return quantize_and_report(cfg, prepared.out, prepared.stages, pruning, prepared.quantized)


def quantize_and_report(
    cfg: DictConfig, out: Path, stages: list[str], pruning: list[str], fingerprint: Fingerprint
) -> dict:
    """Quantize the last training stage's model (unless done with the same `fingerprint`), then
    measure every stage in order. `pruning`: the stages that must be faster than their input,
    besides the quantized one."""
    from llm_lightning.data import load_task
    from llm_lightning.data.provenance import check_split, read_provenance
    from llm_lightning.models.saved import load_saved
    from llm_lightning.quantize import quantize_with_config, saved_settings
    from llm_lightning.quantized_dir import save_quantized
    from llm_lightning.stages import bench_settings, measure_stage, require_test_split, write_report

    q = cfg.quantize  # checked before the first stage trained (chain_checks.check_quantize)
    data = load_task(cfg.task, cfg.seed)
    require_test_split(data, str(out))
    for stage in stages:  # each stage is scored on the texts it was trained against
        check_split(
            out / stage / "model", cfg.task, cfg.seed, data, allow=bool(cfg.get("allow_split_mismatch"))
        )
    decision = decide(out / QUANTIZED, fingerprint, out / QUANTIZED / META_FILE)
    print(f"[compress] {QUANTIZED}: {decision.reason}", flush=True)
    if decision.action != REUSE:
        model, tokenizer, _ = load_saved(out / stages[-1] / "model")
        quantized = quantize_with_config(model, tokenizer, q, data, cfg.task.max_length)
        training = read_provenance(out / stages[-1] / "model")[0]
        save_quantized(
            quantized, tokenizer, out / QUANTIZED, q.method, q.compile, **saved_settings(q), training=training
        )
        write_record(out / QUANTIZED, DONE, fingerprint)  # after the atomic save: it replaces the folder
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
    defaults = chain.copy()
    recipes = [a.split("=", 1)[1] for a in args if a.startswith("recipe=")]
    recipe = recipes[-1] if recipes else chain.get("recipe")
    own = OmegaConf.create({})
    if recipe not in (None, "null", ""):
        path = Path(recipe) if recipe.endswith(".yaml") else CONF / "recipes" / f"{recipe}.yaml"
        if not path.exists():
            shipped = sorted(f.stem for f in (CONF / "recipes").glob("*.yaml"))
            raise MissingFileError(
                f"recipe={recipe!r}: no {path}; shipped recipes: {shipped}, or a .yaml path."
            )
        own = OmegaConf.load(path)
        if "stages" in own:
            chain.stages = own.stages  # replaced, not merged: a recipe names all of its stages
        chain = OmegaConf.merge(chain, {k: v for k, v in own.items() if k != "stages"})
        chain.recipe = recipe
    rest = [a for a in args if not a.startswith("recipe=")]
    check_arguments(rest, valid_keys(defaults, own, CONF / "quantize"))
    try:
        return OmegaConf.merge(chain, OmegaConf.from_dotlist(rest))
    except OmegaConfBaseException as err:
        raise UserError(f"compress arguments {rest}: {err}") from err


@user_errors
def main(argv: list[str] | None = None) -> None:
    compress(load_chain(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
