"""Saved files are data, never instructions (issue 19).

A checkpoint is rebuilt from the model config and tokenizer stored in it, with transformers' own
classes; the run's `.hydra/config.yaml` (`model.trust_remote_code`, `model.name_or_path`) is never
followed, so a run folder someone sends cannot run code on `evaluate` or `predict`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llm_lightning.errors import UserError
from llm_lightning.models.saved import SAVED_MODEL_KEY, load_saved
from llm_lightning.predict import predict
from llm_lightning.train import train
from tests.conftest import make_cfg, run_module

NAMES = ["negative", "positive"]
TEXTS = ["a fine film", "dull and far too long", "ok"]
FAST = ["precision='32'", "~logger", "~callbacks.lr_monitor"]
# Runs whose checkpoint is only rebuilt: no test pass, no export, one validation (and checkpoint).
QUICK = [*FAST, "test=false", "export=false", "trainer.max_steps=2"]
RUNS = {
    "depth": ["model.num_layers=3", "prune=depth", "prune.remove_layers=1", "prune.batches=2"],
    "structured": ["prune=structured", "prune.mlp_sparsity=0.5", "prune.remove_heads=2", "prune.batches=2"],
    "lora": ["finetune=lora", "finetune.r=4"],
}
EVIL_CODE = """from pathlib import Path
Path({marker!r}).write_text("code from a run folder ran")

from transformers import LlamaConfig, LlamaForSequenceClassification


class EvilConfig(LlamaConfig):
    model_type = "evil"


class EvilModel(LlamaForSequenceClassification):
    config_class = EvilConfig
"""


def booby_trapped_folder(folder: Path, marker: Path, model_type: str = "evil") -> Path:
    """A model folder whose config.json sends transformers to `modeling_evil.py`, which writes
    `marker` when it is imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "modeling_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    config["model_type"] = model_type
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForSequenceClassification": "modeling_evil.EvilModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def logits(model, tokenizer) -> torch.Tensor:
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**enc).logits


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A whole smoke run (tested on its best checkpoint, exported): its folder and what train returned."""
    out = tmp_path_factory.mktemp("plain")
    metrics, objects = train(make_cfg(out, FAST))
    return out, metrics, objects


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, plain):
    """Trains the named run of RUNS on first use: (checkpoint, the trained module, its tokenizer)."""
    _, metrics, objects = plain  # after its test pass, the module holds the best checkpoint's weights
    done = {"plain": (Path(metrics["best_checkpoint"]), objects["module"], objects["tokenizer"])}

    def get(name: str):
        if name not in done:
            out = tmp_path_factory.mktemp(name)
            _, trained = train(make_cfg(out, [*QUICK, *RUNS[name]]))
            done[name] = (out / "checkpoints" / "last.ckpt", trained["module"], trained["tokenizer"])
        return done[name]

    return get


def test_checkpoint_stores_the_model_config_and_tokenizer_as_plain_data(plain):
    _, metrics, objects = plain
    entry = torch.load(metrics["best_checkpoint"], weights_only=True)[SAVED_MODEL_KEY]
    now = objects["module"].model.config.to_dict()
    for key in ("architectures", "dtype"):  # filled in by the export's save_pretrained, after the save
        now.pop(key), entry["config"].pop(key)
    assert entry["config"] == now
    assert entry["config"]["model_type"] == "llama" and entry["lora"] is None
    assert entry["attn_implementation"] == "eager"  # conf/model/tiny.yaml's, restored on rebuild
    assert isinstance(entry["tokenizer"]["tokenizer.json"], str)
    assert json.loads(entry["tokenizer"]["tokenizer.json"])["model"]["type"] == "BPE"


@pytest.mark.parametrize("name", ["plain", "depth", "structured", "lora"])
def test_rebuilt_checkpoint_gives_the_trained_modules_logits(quick_run, name):
    ckpt, module, tokenizer = quick_run(name)
    model, rebuilt_tokenizer, names = load_saved(ckpt)
    assert names == NAMES
    assert rebuilt_tokenizer(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]
    trained = module.model
    if name == "lora":  # the checkpoint's adapters, merged: the plain transformers model
        assert type(model).__name__ == "LlamaForSequenceClassification"
        assert torch.load(ckpt, weights_only=True)[SAVED_MODEL_KEY]["lora"]["r"] == 4
        torch.testing.assert_close(logits(model, tokenizer), logits(trained, tokenizer), atol=1e-5, rtol=1e-5)
        return
    # Same classes, same eager attention, same weights: the same numbers.
    assert torch.equal(logits(model, tokenizer), logits(trained, tokenizer))
    shapes = {k: v.shape for k, v in trained.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    if name == "depth":
        assert len(model.model.layers) == 2 and model.config.kept_layers == trained.config.kept_layers
    if name == "structured":
        assert (model.config.intermediate_size, model.config.num_attention_heads) == (64, 2)


def test_student_is_rebuilt_from_its_own_config_without_its_teacher(plain, tmp_path):
    teacher = shutil.copytree(plain[0] / "model", tmp_path / "teacher")
    overrides = [*QUICK, "distill=kd", f"distill.teacher={teacher}", "distill.student.num_layers=1"]
    _, objects = train(
        make_cfg(tmp_path / "student", [*overrides, f"distill.cache.dir={tmp_path / 'cache'}"])
    )
    shutil.rmtree(teacher)  # the run config names it; rebuilding the student must not need it
    model, tokenizer, _ = load_saved(tmp_path / "student" / "checkpoints" / "last.ckpt")
    assert len(model.model.layers) == 1 and model.config.distilled_from["keep_layers"] == [1]
    assert torch.equal(logits(model, tokenizer), logits(objects["module"].model, tokenizer))


def test_tampered_run_config_is_ignored_by_evaluate_and_predict(plain, tmp_path, monkeypatch):
    out, metrics, objects = plain
    run = tmp_path / "sent"
    shutil.copytree(out / ".hydra", run / ".hydra")
    ckpt = run / "checkpoints" / Path(metrics["best_checkpoint"]).name
    ckpt.parent.mkdir()
    shutil.copy(metrics["best_checkpoint"], ckpt)
    marker = tmp_path / "pwned"
    evil = booby_trapped_folder(tmp_path / "evil", marker)
    config = OmegaConf.load(run / ".hydra" / "config.yaml")
    config.model = {"source": "hf", "name_or_path": str(evil), "trust_remote_code": True}
    OmegaConf.save(config, run / ".hydra" / "config.yaml")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))  # where transformers copies remote code

    done = run_module(
        "llm_lightning.evaluate", f"model_path={ckpt}", "task.limit=32", f"hydra.run.dir={run / 'eval'}"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    evaluated = json.loads((run / "eval" / "metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert evaluated["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)

    done = run_module(
        "llm_lightning.predict", f"model_path={ckpt}", "text=[" + ",".join(f'"{t}"' for t in TEXTS) + "]"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    expected = list(predict(objects["module"].model, objects["tokenizer"], NAMES, TEXTS))
    assert [r["label"] for r in rows] == [r["label"] for r in expected]
    for row, want in zip(rows, expected, strict=True):
        assert row["probs"] == pytest.approx(want["probs"], abs=1e-6)
    assert not marker.exists(), "code named by the run's config ran"

    # The trap is real: following the run config's loading instructions, as loading did before, runs it.
    old_way = (
        "from omegaconf import OmegaConf\nfrom llm_lightning.models import load_classifier\n"
        f"try:\n    load_classifier(OmegaConf.load({str(run / '.hydra' / 'config.yaml')!r}).model, {NAMES})\n"
        "except Exception:\n    pass\n"
    )
    subprocess.run([sys.executable, "-c", old_way], check=True, capture_output=True, timeout=300)
    assert marker.exists()


def test_checkpoint_without_its_model_config_is_refused(plain, tmp_path):
    out, metrics, _ = plain
    shutil.copytree(out / ".hydra", tmp_path / ".hydra")  # the run config that used to be followed
    shutil.copytree(out / "model", tmp_path / "model")
    state = torch.load(metrics["best_checkpoint"], weights_only=True)
    del state[SAVED_MODEL_KEY]
    ckpt = tmp_path / "checkpoints" / "old.ckpt"
    ckpt.parent.mkdir()
    torch.save(state, ckpt)
    with pytest.raises(UserError, match=r"holds no model config of its own") as err:
        load_saved(ckpt)
    assert f"exported model/ folder instead ({tmp_path / 'model'}), or retrain" in str(err.value)


def _spoil(entry: dict, how: str, marker: Path) -> None:
    if how == "model_type":
        entry["config"]["model_type"] = "evil"
    elif how == "auto_map":
        entry["config"]["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    elif how == "tokenizer_auto_map":
        tok_config = json.loads(entry["tokenizer"]["tokenizer_config.json"])
        tok_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        entry["tokenizer"]["tokenizer_config.json"] = json.dumps(tok_config)
        entry["tokenizer"]["tokenization_evil.py"] = EVIL_CODE.format(marker=str(marker))
    elif how == "file_name":
        entry["tokenizer"][f"../../{marker.name}"] = "written outside the temporary folder"


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("model_type", r"model_type='evil' is not a model transformers knows"),
        ("auto_map", r"has \['auto_map'\], which would make transformers load code"),
        ("tokenizer_auto_map", r"tokenizer_config.json has `auto_map`"),
        ("file_name", r"tokenizer file names \['\.\./\.\./pwned'\] are not plain file names"),
    ],
)
def test_checkpoint_naming_code_is_refused(plain, tmp_path, how, message):
    state = torch.load(plain[1]["best_checkpoint"], weights_only=True)
    marker = tmp_path / "pwned"
    _spoil(state[SAVED_MODEL_KEY], how, marker)
    ckpt = tmp_path / "a" / "b" / "spoiled.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(state, ckpt)
    with pytest.raises(UserError, match=message):
        load_saved(ckpt)
    assert not marker.exists()


def test_hub_attention_kernel_in_a_checkpoint_is_not_used(plain, tmp_path):
    state = torch.load(plain[1]["best_checkpoint"], weights_only=True)
    state[SAVED_MODEL_KEY]["attn_implementation"] = "kernels-community/flash-attn"  # would download code
    ckpt = tmp_path / "kernel.ckpt"
    torch.save(state, ckpt)
    model, _, _ = load_saved(ckpt)
    assert model.config._attn_implementation == "sdpa"  # transformers' default


@pytest.mark.parametrize("model_type", ["llama", "evil"])
def test_exported_folder_naming_code_never_runs_it(plain, tmp_path, model_type):
    marker = tmp_path / "pwned"
    folder = booby_trapped_folder(shutil.copytree(plain[0] / "model", tmp_path / "model"), marker, model_type)
    if model_type == "llama":  # a type transformers knows: its own class, the custom one ignored
        model, _, _ = load_saved(folder)
        assert type(model).__name__ == "LlamaForSequenceClassification"
    else:
        with pytest.raises(UserError, match="custom code"):
            load_saved(folder)
    assert not marker.exists()
