"""The one-command chain on the tiny model: fine-tune, prune, distil, quantize, report; then resume."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import llm_lightning.train
from llm_lightning.artifacts import safe_load
from llm_lightning.chain.compose import load_chain, merged_overrides
from llm_lightning.compress import compress, prepare, train_stages
from llm_lightning.errors import UserError
from tests.conftest import run_module


def test_later_overrides_of_the_same_key_win():
    merged = merged_overrides(
        ["model=tiny", "debug=smoke", "trainer.max_steps=4"], ["model=hf", "+extra=1", "trainer.max_steps=9"]
    )
    assert merged == ["debug=smoke", "model=hf", "+extra=1", "trainer.max_steps=9"]


def test_chain_exports_every_stage_reports_them_and_resumes(chain, monkeypatch):
    report = compress(chain)
    out = chain.out
    for path in (
        "teacher/model/config.json",
        "pruned/model/config.json",
        "distilled/model/config.json",
        "quantized/quantization.json",
        "report.json",
        "report.md",
        "pareto.png",
    ):
        assert (Path(out) / path).exists(), path
    stages = [(r["stage"], r["input"], r["compressed"]) for r in report["stages"]]
    assert stages == [
        ("teacher", None, False),
        ("pruned", "teacher", True),
        ("distilled", "pruned", False),
        ("quantized (int8_dynamic)", "distilled", True),
    ]
    # each training stage carries its run's val/acc_best, the figure to choose a stage by
    assert ["val_acc_best" in r for r in report["stages"]] == [True, True, True, False]
    params = [r["params"] for r in report["stages"]]
    assert params[1] < params[0] and params[2] == params[1] == params[3]  # one of two layers removed
    # The distilled stage trained from the pruned model, with the teacher's soft labels.
    distilled = OmegaConf.load(f"{out}/distilled/.hydra/config.yaml")
    assert distilled.distill.method == "kd" and distilled.distill.teacher.endswith("teacher/model")
    assert distilled.model.name_or_path.endswith("pruned/model")
    assert distilled.distill.transfer.source == "imdb_sentences" and distilled.distill.transfer.limit == 48
    assert json.loads(open(f"{out}/report.json").read())["runtime"] == {"threads": 1}
    records = {s: record(out, s) for s in ("teacher", "pruned", "distilled", "quantized")}
    assert {r["status"] for r in records.values()} == {"done"}
    fingerprint = {s: r["fingerprint"] for s, r in records.items()}
    assert records["pruned"]["inputs"] == {"teacher": fingerprint["teacher"]}
    assert records["distilled"]["inputs"] == {
        "pruned": fingerprint["pruned"],
        "teacher": fingerprint["teacher"],
    }
    assert records["quantized"]["inputs"] == {"distilled": fingerprint["distilled"]}

    def no_training(cfg):
        raise AssertionError(f"stage in {cfg.output_dir} ran again")

    monkeypatch.setattr(llm_lightning.train, "train", no_training)
    # Every training stage is unchanged: none is retrained; the quantized one is redone with the new
    # setting, and the report is measured again.
    chain.quantize.skip = ["score"]
    again = compress(chain)
    assert [r["stage"] for r in again["stages"]] == [s for s, _, _ in stages]
    assert {s: record(out, s)["fingerprint"] for s in ("teacher", "pruned", "distilled")} == {
        s: fingerprint[s] for s in ("teacher", "pruned", "distilled")
    }
    assert record(out, "quantized")["fingerprint"] != fingerprint["quantized"]
    assert json.loads((Path(out) / "quantized/quantization.json").read_text())["skip"] == ["score"]

    # The final stage's runtime comes from config, and `deploy` adds more forms of the final
    # student: each built once, measured in the same report, the fastest named.
    chain.quantize.method = "openvino_int8"
    chain.deploy = {"onnx_int8": {}, "bf16": {"compile": False}}  # compiling: minutes on 2 cores
    deployed = compress(chain)
    names = [r["stage"] for r in deployed["stages"]]
    assert names[3:] == ["quantized (openvino_int8)", "deploy (onnx_int8)", "deploy (bf16)"]
    assert all(r["input"] == "distilled" and r["compressed"] for r in deployed["stages"][3:])
    assert all("vs_first_acc_diff_low" in r for r in deployed["stages"][1:])  # paired with the teacher
    for folder in ("quantized/runtime.json", "deploy/onnx_int8/model.onnx", "deploy/bf16/model.safetensors"):
        assert (Path(out) / folder).exists(), folder
    fastest = deployed["fastest_final"]
    assert fastest["among"] == ["distilled", *names[3:]]
    # the final forms are timed again in turns, and the fastest is named on those figures
    in_turns = {r["stage"]: r.get("tokens_per_s_b16_turns") for r in deployed["stages"]}
    assert all(in_turns[n] > 0 for n in fastest["among"])
    assert in_turns["teacher"] is None  # not a form of the final model
    assert fastest["by"] == "tokens_per_s_b16_turns"
    assert fastest["tokens_per_s_b16_turns"] == max(in_turns[n] for n in fastest["among"])
    assert f"Fastest form of the final model: **{fastest['stage']}**" in (Path(out) / "report.md").read_text()
    built = (Path(out) / "deploy/bf16/model.safetensors").stat().st_mtime_ns
    chain.deploy = {"bf16": {"compile": False}}
    assert compress(chain)["stages"][-1]["stage"] == "deploy (bf16)"
    assert (Path(out) / "deploy/bf16/model.safetensors").stat().st_mtime_ns == built  # reused

    # `python -m llm_lightning.report` measures a run folder again: the teacher's, on its own
    remeasured = run_module("llm_lightning.report", f"run_dir={out}/teacher")
    assert remeasured.returncode == 0, remeasured.stderr[-3000:]
    row = json.loads((Path(out) / "teacher/report.json").read_text())["stages"][0]
    assert (row["stage"], row["acc"]) == ("fp32", report["stages"][0]["acc"])


def record(out, stage: str) -> dict:
    return json.loads((Path(out) / stage / "stage.json").read_text())


def test_more_stages_run_in_order_each_from_the_one_it_names(chain, monkeypatch):
    """Pruning twice: each stage starts from the model it names, the last one is quantized, and
    only stages that prune (and the quantized one) must be faster than their input."""
    prune_one = ["model=hf", "prune=depth", "prune.remove_layers=1", "trainer.max_steps=0"]
    chain.stages = {
        "teacher": ["model.num_layers=3"],
        "pruned": [*prune_one, "model.name_or_path={teacher}"],
        "retrained": ["model=hf", "model.name_or_path={pruned}"],
        "pruned_again": [*prune_one, "model.name_or_path={retrained}"],
    }
    chain.quantize = {**chain.quantize, "smoothquant_alpha": None, "fuse_projections": False}
    report = compress(chain)
    out = Path(chain.out)
    assert OmegaConf.load(out / "pruned_again/.hydra/config.yaml").model.name_or_path == str(
        out / "retrained/model"
    )
    stages = [(r["stage"], r["input"], r["compressed"], r["params"]) for r in report["stages"]]
    assert [s[:3] for s in stages] == [
        ("teacher", None, False),
        ("pruned", "teacher", True),
        ("retrained", "pruned", False),
        ("pruned_again", "retrained", True),
        ("quantized (int8_dynamic)", "pruned_again", True),
    ]
    params = [s[3] for s in stages]
    assert params[0] > params[1] == params[2] > params[3] == params[4]  # 3 layers, then 2, then 1


@pytest.mark.parametrize(
    "stages",
    [
        {"pruned": [], "teacher": []},  # teacher not first
        {"teacher": [], "quantized": []},  # the quantized stage's folder
        {"teacher": [], "Pruned/2": []},  # not a plain folder name
    ],
)
def test_a_chain_that_does_not_start_from_the_teacher_or_names_a_stage_badly_is_refused(chain, stages):
    chain.stages = stages
    with pytest.raises(ValueError, match=r"compress stages .*: the first must be 'teacher'.*key `stages`"):
        compress(chain)
    assert not Path(chain.out).exists()  # refused before anything ran


def test_the_default_gradual_recipe_runs_its_stages_in_order(tmp_path):
    """The default recipe, conf/recipe/gradual_11_layers_twice.yaml, wired end to end on a 20-layer
    tiny model: 15, 3 and 1 layers pruned in turn, each step distilled from the teacher (on 48
    transfer texts, not 30,000), and the better of the two 11-layer stages on validation quantized."""
    common = 'common=["model=tiny","debug=smoke","bench=quick","runtime.threads=1"]'
    chain = load_chain([f"out={tmp_path / 'chain'}", common])
    assert list(chain.stages) == [  # the default recipe's
        "teacher",
        "layers15",
        "layers15_more",
        "layers12",
        "layers12_more",
        "layers11",
        "layers11_more",
    ]
    assert list(chain.final_among) == ["layers11", "layers11_more"]
    assert chain.quantize.method == "int8_dynamic"  # the shipped quantize settings stay
    chain.stages.teacher = ["model.num_layers=20"]
    for stage in list(chain.stages)[1:]:
        chain.stages[stage] = [*chain.stages[stage], "distill.transfer.limit=48"]
    chain.quantize = {**chain.quantize, "compile": False, "smoothquant_alpha": None}
    report = compress(chain)
    layers = {
        s: OmegaConf.load(tmp_path / "chain" / s / "model" / "config.json").num_hidden_layers
        for s in chain.stages
    }
    assert layers == {
        "teacher": 20,
        "layers15": 5,
        "layers15_more": 5,
        "layers12": 2,
        "layers12_more": 2,
        "layers11": 1,
        "layers11_more": 1,
    }
    assert [(r["stage"], r["compressed"]) for r in report["stages"]] == [
        ("teacher", False),
        ("layers15", True),
        ("layers15_more", False),
        ("layers12", True),
        ("layers12_more", False),
        ("layers11", True),
        ("layers11_more", False),
        ("quantized (int8_dynamic)", True),
    ]
    assert set(report["final_choice"]["among"]) == {"layers11", "layers11_more"}


def test_the_default_recipe_is_gradual_11_layers_plus_one_stage_and_reuses_its_stages(tmp_path):
    """The default, gradual_11_layers_twice, chooses one or two distillations at 11 layers on
    validation: it must write where recipe=gradual_11_layers writes, with the same fingerprints, so a
    chain that ran that one trains only layers11_more."""
    once = prepare(load_chain(["recipe=gradual_11_layers"]))
    twice = prepare(load_chain([]))
    assert twice.out == once.out
    assert twice.stages == [*once.stages, "layers11_more"]
    assert {s: twice.fingerprints[s].value for s in once.stages} == {
        s: once.fingerprints[s].value for s in once.stages
    }
    assert twice.inputs["layers11_more"] == ["teacher", "layers11"]
    assert twice.quantized.inputs == {"layers11_more": twice.fingerprints["layers11_more"].value}


def test_an_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(UserError) as refused:
        load_chain(["recipe=gradual"])
    assert re.search(
        r"Could not find 'recipe/gradual'\s+Available options in 'recipe':\s+gradual_11_layers\s+gradual_11_layers_twice\s+quick_15_layers$",
        str(refused.value),
    ), str(refused.value)  # and not Hydra's config search path


def test_no_recipe_and_no_stages_is_refused_before_anything_runs(tmp_path):
    chain = load_chain(["~recipe", f"out={tmp_path / 'chain'}"])
    with pytest.raises(ValueError, match=r"compress stages \[\]: .*key `stages` of the recipe"):
        compress(chain)
    assert not (tmp_path / "chain").exists()


@pytest.mark.parametrize(
    "override, error",
    [
        (
            "distill.temprature=3",
            r"stage 'distilled' .*does not compose: Could not override 'distill.temprature'",
        ),
        ("prune=depht", r"stage 'distilled' .*does not compose: In 'train': Could not find 'prune/depht'"),
        ("distill.alpha=2", r"stage 'distilled': distill.alpha must be in \[0, 1\], got 2"),
        (
            "prune=depth prune.remove_layers=-1",
            r"stage 'distilled': .*prune.remove_layers=-1 must be an integer >= 0",
        ),
        (
            "finetune=freeze finetune.trainable_layers=-2",
            r"stage 'distilled': finetune.trainable_layers must be >= 0, got -2",
        ),
        (
            "model.name_or_path={distilled}",
            r"stage 'distilled' reads \{distilled\}, which is not a stage that",
        ),
        (
            "distill.teacher=/no/such/teacher",
            r"stage 'distilled': distill.teacher=/no/such/teacher does not exist",
        ),
        ("task=imdb", r"stage 'distilled' trains on task 'imdb' .* but the teacher on 'sentiment'"),
        ("model.name_or_path=???", r"stage 'distilled' .*leaves \['model.name_or_path'\] unset"),
        (
            "${steps.distill}",
            r"stage 'distilled': .*steps.distill.*the steps of conf/compress.yaml are \['distil'\]",
        ),
    ],
)
def test_a_bad_override_in_the_last_stage_fails_before_the_first_stage_trains(chain, override, error):
    chain.stages.distilled = [*chain.stages.distilled, *override.split()]
    with pytest.raises(UserError, match=r"compress " + error):
        compress(chain)
    assert not Path(chain.out).exists()  # not even teacher/


@pytest.mark.parametrize(
    "setting, error",
    [
        ({"activations": "bogus"}, r"quantize.activations='bogus' is not one of"),
        ({"method": "int8_weight_only"}, r"quantize.smoothquant_alpha=auto needs quantize=int8_dynamic"),
        ({"method": "none"}, r"quantize.method='none' leaves nothing to quantize"),
        ({"attention": "flash"}, r"quantize.attention='flash' is not one of"),
    ],
)
def test_bad_quantize_settings_fail_before_the_first_stage_trains(chain, setting, error):
    chain.quantize = {**chain.quantize, **setting}
    with pytest.raises(UserError, match=r"compress stage 'quantized' \(key `quantize` .*\): " + error):
        compress(chain)
    assert not Path(chain.out).exists()


def test_an_unknown_key_on_the_command_line_exits_2_naming_the_nearest_key(tmp_path):
    """Hydra refuses a key conf/compress.yaml lacks; one added with `+key=` (or written in a recipe)
    is refused by compress before anything runs, naming the nearest valid key."""
    done = run_module("llm_lightning.compress", "reciep=x", f"out={tmp_path / 'chain'}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Could not override 'reciep'" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_module("llm_lightning.compress", "+quantize.compil=false", f"out={tmp_path / 'chain'}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        "error: compress: unknown key 'quantize.compil' (did you mean 'quantize.compile'?); valid keys: "
        "quantize.activations, quantize.attention," in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "chain").exists()
    with pytest.raises(UserError, match=r"Could not override 'quantize.compil'"):
        load_chain(["quantize.compil=false"])
    with pytest.raises(
        UserError,
        match=r"unknown key 'stagse' \(did you mean 'stages'\?\); valid keys: common, deploy, final_among, out, quantize, reuse, ",
    ):
        compress(load_chain(["+stagse.extra=[]", f"out={tmp_path / 'chain'}"]))
    assert not (tmp_path / "chain").exists()


def with_recipe(conf: Path, name: str, chain) -> list[str]:
    """`chain` written as a recipe of a user's own config folder, and the overrides that pick it."""
    (conf / "recipe").mkdir(parents=True, exist_ok=True)
    body = OmegaConf.to_yaml({k: chain[k] for k in ("out", "common", "quantize", "stages")})
    (conf / "recipe" / f"{name}.yaml").write_text("# @package _global_\n" + body)
    return [f"hydra.searchpath=[file://{conf}]", f"recipe={name}"]


def test_a_rerun_resumes_the_interrupted_stage_and_retrains_only_what_changed(chain, tmp_path, capsys):
    """Trained once; then `pruned` changed and killed mid-stage; then rerun with `distilled` changed:
    teacher is reused, pruned continues from its last.ckpt, distilled (and quantized) are made again."""
    out, conf, steps = Path(chain.out), tmp_path / "my_conf", tmp_path / "pruned_steps.log"

    def with_stages(**changed) -> list[str]:  # a recipe file, so the killed run reads the same chain
        return with_recipe(conf, "mine", {**chain, "stages": {**chain.stages, **changed}})

    # the progress bar stays on: off a terminal it is LogProgress, which the mid-epoch resume below
    # must not break (Lightning skips on_train_epoch_start there)
    chain.stages.distilled = [*chain.stages.distilled, "distill.transfer.source=null"]
    chain.quantize = {**chain.quantize, "smoothquant_alpha": None, "fuse_projections": False}  # quicker
    train_stages(chain)
    first = {s: record(out, s) for s in ("teacher", "pruned", "distilled")}
    teacher_written = (out / "teacher/model/model.safetensors").stat().st_mtime_ns
    distilled_written = (out / "distilled/model/model.safetensors").stat().st_mtime_ns

    # Kill `pruned` at step 3 of 4: its last.ckpt is the validation's after step 2.
    kill = ["+callbacks.kill._target_=tests.stage_faults.KillOnceAtStep", "+callbacks.kill.step=3"]
    pruned = [*chain.stages.pruned, *kill, f"+callbacks.kill.log={steps}"]
    with_stages(pruned=pruned)
    killed = run_module("llm_lightning.compress", "--config-dir", str(conf), "recipe=mine")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    interrupted = record(out, "pruned")
    assert interrupted["status"] == "running" and interrupted["fingerprint"] != first["pruned"]["fingerprint"]
    assert safe_load(out / "pruned/checkpoints/last.ckpt")["global_step"] == 2
    assert (out / "pruned.stale/model/config.json").exists()  # the previous model, kept until replaced
    assert record(out, "distilled") == first["distilled"]

    picked = with_stages(pruned=pruned, distilled=[*chain.stages.distilled, "distill.temperature=3.0"])
    report = compress(load_chain(picked))
    printed = capsys.readouterr().out
    assert steps.read_text().split() == ["0", "2"]  # the killed fit started at 0, the rerun at 2
    assert "[compress] teacher: unchanged since its last run; reused" in printed
    assert "[compress] pruned: interrupted with the same settings: resuming from " in printed
    assert f"[compress] pruned: resuming in {out / 'pruned'}" in printed
    assert (
        "[compress] distilled: changed since its last run (distill.temperature: 2.0 -> 3.0; its input pruned "
        "changed); retrained, and so are the later stages that read from it: ['quantized']"
    ) in printed
    assert record(out, "teacher") == first["teacher"]
    assert (out / "teacher/model/model.safetensors").stat().st_mtime_ns == teacher_written
    assert record(out, "pruned") == {**interrupted, "status": "done"}
    distilled = record(out, "distilled")
    assert distilled["status"] == "done" and distilled["settings"]["distill.temperature"] == 3.0
    assert distilled["inputs"] == {
        "pruned": interrupted["fingerprint"],
        "teacher": first["teacher"]["fingerprint"],
    }
    assert (out / "distilled/model/model.safetensors").stat().st_mtime_ns > distilled_written
    assert OmegaConf.load(out / "distilled/.hydra/config.yaml").distill.temperature == 3.0
    assert record(out, "quantized")["inputs"] == {"distilled": distilled["fingerprint"]}
    assert not list(out.glob("*.stale"))  # gone once their stage was made again
    assert [r["stage"] for r in report["stages"]] == [
        "teacher",
        "pruned",
        "distilled",
        "quantized (int8_dynamic)",
    ]
