"""One command from fine-tuning to a small, fast model, with a report comparing every stage.

    python -m llm_lightning.compress                                  # recipe=gradual_11_layers_twice (the default)
    python -m llm_lightning.compress recipe=quick_15_layers          # conf/recipe/quick_15_layers.yaml
    python -m llm_lightning.compress out=/tmp/chain 'common=["model=tiny","debug=smoke"]'
    python -m llm_lightning.compress --config-dir my_conf recipe=mine   # my_conf/recipe/mine.yaml

The config is conf/compress.yaml, composed by Hydra with a recipe (the `recipe` group, conf/recipe/):
the stages, each in its own folder under `out`, each exporting its model, run in the order
written; `teacher` first. The default, `gradual_11_layers_twice`:

    teacher/        fine-tune                                          -> teacher/model
    layers15/       depth-prune 30 -> 15 layers, distil from teacher   -> layers15/model
    layers15_more/  distil again on more texts                         -> ...
    layers12/, layers12_more/, layers11/, layers11_more/   prune a little, distil, ...
    quantized/      quantize layers11 or layers11_more, the better on validation (torchao)
    deploy/<choice>/  with `deploy=[openvino_int8,...]`: more forms of that model
    report.json, report.md, pareto.png, tensorboard/report   every stage measured the same way

`gradual_11_layers` stops at layers11; `quick_15_layers` is `teacher -> pruned -> distilled`: one
pruning, one distillation.
The training stages are `llm_lightning.train.train` runs composed from conf/train.yaml with
`common` and then the stage's own overrides (llm_lightning.chain.compose); a stage names an earlier
one's model as `{name}` and splices in overrides several stages share as `${steps.<name>}`. The
last training stage is the one quantized; a stage whose config prunes (`prune.method` other than
`none`) counts as a compression in the report's speed check.

Every stage is composed and checked before the first one trains, so a typo in the last stage fails
at once. Each stage records what it was made from in `<stage>/stage.json` (llm_lightning.chain.record):
a rerun reuses a stage whose settings and inputs are unchanged, resumes an interrupted one from its
last.ckpt when its settings are the same, and retrains a changed one and every stage that reads
from it; it measures every stage again. Unknown keys are errors. `reuse.teacher=<run folder>` takes
a finished `train` run (`make train`'s) in as the teacher stage when its settings are the stage's
(llm_lightning.chain.adopt), instead of training it again. `final_among: [a, b]` makes the
quantized and deploy forms from whichever of those stages reached the best validation accuracy
(llm_lightning.chain.final), not from the last one.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from llm_lightning.chain.adopt import check_reused, check_same_settings, take_in
from llm_lightning.chain.checks import chain_keys, check_keys, check_quantize, check_stage
from llm_lightning.chain.compose import (
    FIRST_STAGE,
    QUANTIZED,
    stage_config,
    stage_inputs,
    training_stages,
)
from llm_lightning.chain.deploy import DEPLOY, deploy_configs, made_file, stage_name
from llm_lightning.chain.final import check_final_among, choose_final
from llm_lightning.chain.record import (
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
from llm_lightning.quantization.settings import compiles
from llm_lightning.runtime import conf_dir, run_entry, user_errors

log = logging.getLogger(__name__)

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
    deploy: dict[str, DictConfig]  # `deploy`: quantize choice -> its shipped settings (chain.deploy)
    deployed: dict[str, Fingerprint]
    reused: dict[str, Path]  # `reuse`: stage -> a finished train run with its settings (chain.adopt)
    final_among: list[str]  # the stages the final model is chosen among on validation (chain.final)

    def made_from(self, final: str) -> Chain:
        """The chain with its quantized and deploy forms made from training stage `final`."""
        inputs = {final: self.fingerprints[final].value}
        return dataclasses.replace(
            self,
            quantized=dataclasses.replace(self.quantized, inputs=inputs),
            deployed={c: dataclasses.replace(f, inputs=inputs) for c, f in self.deployed.items()},
        )


def prepare(chain: DictConfig) -> Chain:
    """Compose every stage, check all that can be checked without models, fingerprint each stage."""
    check_keys(chain, chain_keys(conf_dir() / "compress.yaml", conf_dir() / "quantize"))
    out = Path(chain.out)
    stages = training_stages(chain)
    inputs = {s: stage_inputs(chain, s, stages) for s in stages}
    configs = {s: stage_config(chain, s, out) for s in stages}
    first = configs[FIRST_STAGE]
    with open_dict(first):
        quantize = OmegaConf.merge(first.quantize, chain.quantize)
    check_quantize(quantize)
    deploy = deploy_configs(chain, conf_dir() / "quantize")
    models = {str(out / s / "model") for s in stages}
    for stage in stages:
        check_stage(configs[stage], stage, first, models)
    fingerprints: dict[str, Fingerprint] = {}
    for s in stages:  # in order: a stage's inputs are fingerprinted before it
        fingerprints[s] = Fingerprint(
            settings_of(configs[s], out), {n: fingerprints[n].value for n in inputs[s]}
        )
    reused = check_reused(chain.get("reuse"), stages, inputs)
    final_among = check_final_among(chain.get("final_among"), stages)
    for stage, run in reused.items():
        check_same_settings(run, stage, out / stage, fingerprints[stage], out)
    last = stages[-1]
    made_from = {last: fingerprints[last].value}
    quantized = Fingerprint(settings_of(quantize, out, QUANTIZE_UNFINGERPRINTED), made_from)
    deployed = {
        c: Fingerprint(settings_of(q, out, QUANTIZE_UNFINGERPRINTED), made_from) for c, q in deploy.items()
    }
    return Chain(
        out, stages, configs, inputs, fingerprints, quantize, quantized, deploy, deployed, reused, final_among
    )


def plan(prepared: Chain) -> dict[str, Decision]:
    """What each training stage will do (reuse, resume, train) and why; printed before it starts."""
    from llm_lightning.artifacts import checkpoint_dir

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
        if stage in prepared.reused and d.action != REUSE:
            print(f"[compress] {stage}: taken in from {prepared.reused[stage]} (reuse.{stage})", flush=True)
            continue
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
        if stage in prepared.reused:  # its settings were checked in prepare, before anything ran
            set_aside(out / stage)
            take_in(prepared.reused[stage], out / stage)
            write_record(out / stage, DONE, prepared.fingerprints[stage])
            discard_aside(out / stage)
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
    final, choice = choose_final(prepared.out, prepared.stages, prepared.final_among)
    cfg = prepared.configs[FIRST_STAGE]  # task, seed, bench and runtime for the report
    apply_runtime(cfg.runtime)
    with open_dict(cfg):
        cfg.quantize = prepared.quantize
    return quantize_and_report(cfg, prepared.made_from(final), final, choice)


def quantize_and_report(cfg: DictConfig, prepared: Chain, final: str, choice: dict | None = None) -> dict:
    """Quantize training stage `final`'s model (the last one, or the one `choice` records), and build
    each `deploy` form of it (each unless made with the same fingerprint), then measure every stage
    in order. Only the stages that prune, quantize or export must be faster than their input;
    distillation retrains the same shape."""
    from llm_lightning.data import load_task
    from llm_lightning.data.provenance import check_split
    from llm_lightning.measure.stage_report import Stage, report_stages, require_test_split

    out, stages, q = prepared.out, prepared.stages, cfg.quantize  # all checked before stage 1 trained
    data = load_task(cfg.task, cfg.seed)
    require_test_split(data, str(out))
    for stage in stages:  # each stage is scored on the texts it was trained against
        check_split(
            out / stage / "model", cfg.task, cfg.seed, data, allow=bool(cfg.get("allow_split_mismatch"))
        )
    chosen = out / final / "model"
    used = build(out, QUANTIZED, q, prepared.quantized, chosen, data, cfg.task.max_length)
    for method, settings in prepared.deploy.items():
        build(
            out, f"{DEPLOY}/{method}", settings, prepared.deployed[method], chosen, data, cfg.task.max_length
        )
    pruning = {s for s in stages if prepared.configs[s].prune.method != "none"}  # as composed
    specs = [
        Stage(s, out / s / "model", stages[i - 1] if i else None, False, s in pruning)
        for i, s in enumerate(stages)
    ]
    specs.append(Stage(stage_name(q.method, compiles(q), QUANTIZED), out / QUANTIZED, final, compiles(q)))
    for method, settings in prepared.deploy.items():
        name = stage_name(method, compiles(settings), DEPLOY)
        specs.append(Stage(name, out / DEPLOY / method, final, compiles(settings)))
    forms = [final, *(spec.name for spec in specs[len(stages) :])]  # the final student in each of its forms
    gate = bool(q.get("require_speedup", False))
    return report_stages(specs, data, cfg, out, used, gate, forms, choice)


def build(
    out: Path, name: str, qcfg: DictConfig, fingerprint: Fingerprint, model_dir: Path, data, max_length: int
) -> dict:
    """Quantize or export `model_dir` into `out/name` with `qcfg`, unless it was made with the same
    `fingerprint`. Returns the settings as used (`auto`'s alpha as its folder records it)."""
    from llm_lightning.quantization.saved import is_quantized_dir, used_settings
    from llm_lightning.quantize import quantize_folder
    from llm_lightning.runtimes import is_runtime_dir
    from llm_lightning.runtimes import used_settings as runtime_settings

    folder = out / name
    decision = decide(folder, fingerprint, made_file(folder, qcfg.method))
    print(f"[compress] {name}: {decision.reason}", flush=True)
    if decision.action == REUSE:
        if is_quantized_dir(folder):
            return used_settings(qcfg, folder)
        if is_runtime_dir(folder):
            return runtime_settings(qcfg, folder)
        return OmegaConf.to_container(qcfg, resolve=True)
    used = quantize_folder(model_dir, folder, qcfg, data, max_length)
    write_record(folder, DONE, fingerprint)  # after the atomic save: it replaces the folder
    print(f"[compress] {name}: {qcfg.method} -> {folder}", flush=True)
    return used


@hydra.main(version_base="1.3", config_path="../conf", config_name="compress")
@user_errors
def main(chain: DictConfig) -> None:
    compress(chain)


if __name__ == "__main__":
    run_entry(main)
