"""Load what a run saved, for evaluation and prediction: an exported `model/` folder, or a
Lightning checkpoint (rebuilt from the run's `.hydra/config.yaml`, read with weights_only=True).

A checkpoint of a structured- or depth-pruned run is cut to the pruning plan stored in the
checkpoint itself before its weights load: the config describes the model before pruning."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from llm_lightning.checkpoint_io import safe_load
from llm_lightning.models import load_classifier, load_exported


def load_saved(path: str | Path):
    """Return (model, tokenizer, label_names) from a `model/` folder or a `.ckpt` file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"No model at {path}: pass a run's `model/` folder or a checkpoint (.ckpt).")
    if path.is_dir():
        from llm_lightning.quantized_dir import is_quantized_dir, load_quantized

        # a quantized/ folder (quantization.json + torchao weights), see llm_lightning/quantized_dir.py
        model, tokenizer = load_quantized(path) if is_quantized_dir(path) else load_exported(path)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return model, tokenizer, names
    return _from_checkpoint(path)


def _from_checkpoint(ckpt: Path):
    run_cfg = _run_config(ckpt)
    # weights_only: a checkpoint is data; no pickled code from it ever runs.
    state = safe_load(ckpt)
    names = list(state["hyper_parameters"]["label_names"])
    if run_cfg.get("distill") and run_cfg.distill.method != "none":  # a student: rebuilt as its run built it
        from llm_lightning.models.student import build_student

        model, tokenizer = build_student(run_cfg, names)
    else:
        model, tokenizer = load_classifier(run_cfg.model, names)
    if run_cfg.get("prune"):  # structured/depth pruning: the run's plan is in the checkpoint
        from llm_lightning.callbacks.prune import prune_like_checkpoint

        prune_like_checkpoint(model, run_cfg, state)
    if run_cfg.finetune.method == "lora":
        from llm_lightning.models.lora import add_lora, merged

        model = add_lora(model, run_cfg.finetune)
        _load_weights(model, state["state_dict"], ckpt)
        return merged(model), tokenizer, names
    _load_weights(model, state["state_dict"], ckpt)
    return model, tokenizer, names


def _load_weights(model, state_dict: dict, ckpt: Path) -> None:
    weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # torch raises on shape mismatches even with strict=False
        lines = str(err).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()
        raise ValueError(
            f"{ckpt} does not fit the model rebuilt from its run's .hydra/config.yaml "
            f"({len(lines) - 1} mismatches; first: {first}). Was the config edited after training? "
            "Evaluate the run's exported model/ folder instead."
        ) from err
    if missing or unexpected:
        raise ValueError(
            f"{ckpt} does not fit the model rebuilt from its run's .hydra/config.yaml: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}. Was the config edited after "
            "training? Evaluate the run's exported model/ folder instead."
        )


def _run_config(ckpt: Path):
    for parent in ckpt.parents:
        cfg = parent / ".hydra" / "config.yaml"
        if cfg.exists():
            return OmegaConf.load(cfg)
    raise FileNotFoundError(
        f"No .hydra/config.yaml above {ckpt}: a checkpoint is rebuilt from its run's config. "
        "Keep the checkpoint inside its run directory, or evaluate the run's exported model/ folder."
    )
