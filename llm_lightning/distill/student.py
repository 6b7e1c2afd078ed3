"""Teacher and student for distillation: load the teacher, check it fits the task, and build a
student from a subset of its decoder layers (DistilBERT-style) or from any model source.

    teacher, tok = load_teacher("outputs/sentiment/<run>/model", ["negative", "positive"])
    student = student_from_teacher(teacher, evenly_spaced(30, 15))  # layers 0, 2, ..., 27, 29
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_lightning.errors import MissingFileError, UserError
from llm_lightning.models import load_classifier


def load_teacher(
    spec, label_names: Sequence[str], attn_implementation: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The teacher named by `distill.teacher`, frozen and in eval mode.

    Args:
        spec: a run's exported `model/` folder or a `.ckpt` inside a run directory (a string), or a
            model source mapping like `conf/model/*.yaml` (`{source: hf, name_or_path: ...}`).
        label_names: the task's labels; a saved teacher must have exactly these.
        attn_implementation: for a saved teacher (a mapping names its own); eager is the fast
            one on CPU for short texts, and a saved config does not keep it.
    """
    if isinstance(spec, (Mapping, DictConfig)):
        if "source" not in spec:
            raise UserError(
                f"distill.teacher={_show(spec)} is a mapping without `source`; give a model source "
                "like conf/model/*.yaml ({source: hf, name_or_path: ...}) or a path."
            )
        teacher, tokenizer = load_classifier(spec, label_names)
    else:
        if not spec or spec == "???":
            raise UserError(
                "distill=kd needs distill.teacher=<a run's model/ folder, a .ckpt, or a model source>."
            )
        path = Path(str(spec)).expanduser()
        if not path.exists():
            raise MissingFileError(
                f"distill.teacher={spec!r} does not exist. Pass a run's exported model/ folder "
                "(outputs/<task>/<run>/model), a checkpoint inside a run directory (.ckpt), "
                "or a model source mapping such as {source: hf, name_or_path: <hub id>}."
            )
        from llm_lightning.models.saved import load_saved

        teacher, tokenizer, names = load_saved(path)
        if list(names) != list(label_names):
            raise UserError(
                f"The teacher's labels {list(names)} differ from the task's labels {list(label_names)}: "
                f"distill.teacher={spec!r} was trained for another label set. Distil on the task the teacher "
                "was trained for (config group `task=`), or set task.labels to the teacher's labels."
            )
        if attn_implementation:
            teacher.set_attn_implementation(attn_implementation)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher, tokenizer


def check_same_tokenizer(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> None:
    """The student reads the teacher's cached logits by example, so both must see the same token ids."""
    problems = []
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        problems.append(
            f"vocabularies differ ({len(t_vocab)} vs {len(s_vocab)} tokens; only in the teacher: "
            f"{only_t}, only in the student: {only_s})"
        )
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(teacher_tok, attr) != getattr(student_tok, attr):
            problems.append(
                f"{attr} is {getattr(teacher_tok, attr)} for the teacher, "
                f"{getattr(student_tok, attr)} for the student"
            )
    if problems:
        raise UserError(
            "The teacher and student use different tokenizers: " + "; ".join(problems) + ". "
            "Pick a student with the teacher's tokenizer (`model=`), or build it from the teacher "
            "with distill.student.from_teacher=true."
        )


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, spread evenly and always ending with the last layer (it feeds
    the norm and head the student copies). 30 -> 15 keeps 0, 2, 4, ..., 14, 17, ..., 27, 29."""
    if not 1 <= keep <= total:
        raise UserError(
            f"distill.student.num_layers={keep} is out of range: the teacher has {total} decoder "
            f"layers; choose 1..{total}, or list them with distill.student.keep_layers."
        )
    if keep == 1:
        return [total - 1]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def check_keep_layers(keep_layers: Sequence[int], total: int) -> list[int]:
    keep = [int(i) for i in keep_layers]
    bad = [i for i in keep if not 0 <= i < total]
    if not keep or bad:
        raise UserError(
            f"distill.student.keep_layers={keep} is out of range: {bad or 'empty'}; the teacher has "
            f"{total} decoder layers, so valid indices are 0..{total - 1}."
        )
    if len(set(keep)) != len(keep):
        raise UserError(f"distill.student.keep_layers={keep} repeats a layer; list each index once.")
    return keep


def student_from_teacher(teacher: PreTrainedModel, keep_layers: Sequence[int]) -> PreTrainedModel:
    """A new classifier with the teacher's layers `keep_layers` (in that order), and its embeddings,
    final norm and head copied. Keeping every layer gives exactly the teacher."""
    base = teacher.model
    keep = check_keep_layers(keep_layers, len(base.layers))
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):  # per-layer attention kinds (sliding/full) in some models
        config.layer_types = [config.layer_types[i] for i in keep]
    student = type(teacher)(config)
    renamed = {}
    for name, value in teacher.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            if int(index) not in keep:
                continue
            name = f"model.layers.{keep.index(int(index))}.{rest}"
        renamed[name] = value
    student.load_state_dict(renamed, strict=True)  # copies: the student shares no storage with the teacher
    config.distilled_from = {"keep_layers": keep, "teacher_layers": len(base.layers)}
    return student.train()


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of every parameter and buffer (name, dtype, shape, bytes): any change to the teacher's
    weights gives a new hash, whatever file format it came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy())  # the buffer itself: no copy of 0.5 GB
    return digest.hexdigest()


@dataclass(frozen=True)
class TeacherRef:
    """The teacher `distill.teacher` names, and what loading it told (None: not loaded yet).

    `sha256` (`weights_sha256`) keys its cached outputs: known, it spares loading the teacher
    again when the cache is full. `params` is reported beside the student's; `hidden_size` sizes
    the hidden-state projection. `attn_implementation` is how a saved teacher is loaded.
    """

    spec: Any
    sha256: str | None = None
    params: int | None = None
    hidden_size: int | None = None
    attn_implementation: str | None = None


@dataclass(frozen=True)
class Student:
    """What `build_student` made: the model to train, its tokenizer, its teacher, and the teacher's
    layers it kept (also in `model.config.distilled_from`; None for a `model=` student)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    teacher: TeacherRef
    keep_layers: list[int] | None = None


def build_student(cfg: DictConfig, label_names: Sequence[str]) -> Student:
    """The student for `distill=kd`: from the teacher's layers, or the `model=` source.

    Writes nothing into `cfg`: the layers kept and the teacher's hash come back in the `Student`.
    """
    # The student copies the teacher's config, so it gets the `model=` group's attention kernel.
    attn = cfg.model.get("attn_implementation")
    teacher, teacher_tok = load_teacher(cfg.distill.teacher, label_names, attn)
    ref = TeacherRef(
        cfg.distill.teacher,
        weights_sha256(teacher),
        sum(p.numel() for p in teacher.parameters()),
        teacher.config.hidden_size,
        attn,
    )
    student_cfg = cfg.distill.student
    if student_cfg.from_teacher:
        keep = kept_layers(student_cfg, len(teacher.model.layers))
        print(f"Student: the teacher's layers {keep} (of {len(teacher.model.layers)})", flush=True)
        return Student(student_from_teacher(teacher, keep), teacher_tok, ref, keep)
    student, student_tok = load_classifier(cfg.model, label_names)
    check_same_tokenizer(teacher_tok, student_tok)
    return Student(student, student_tok, ref)


def kept_layers(student_cfg: DictConfig, total: int) -> list[int]:
    """`distill.student.keep_layers`, else `num_layers` evenly spaced, else all `total` layers."""
    if student_cfg.get("keep_layers") is not None:
        return check_keep_layers(student_cfg.keep_layers, total)
    if student_cfg.get("num_layers") is None:
        return list(range(total))  # a full copy: prune= (depth or width) makes it smaller
    return evenly_spaced(total, int(student_cfg.num_layers))


def _show(spec) -> str:
    return str(OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else dict(spec))
