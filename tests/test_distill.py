"""Knowledge distillation: the losses, the student built from the teacher's layers, the teacher-output
cache and the callback that brings it with the batch, and the errors for a teacher that does not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llm_lightning.callbacks.distill import CacheSettings, KnowledgeDistillation
from llm_lightning.data import ClassificationDataModule, load_task
from llm_lightning.data.transfer import UNLABELED
from llm_lightning.distill.losses import (
    DistillationLoss,
    HiddenStateLoss,
    KDSettings,
    KLDivergenceLoss,
    Schedule,
)
from llm_lightning.distill.student import (
    TeacherRef,
    build_student,
    check_same_tokenizer,
    evenly_spaced,
    load_teacher,
    student_from_teacher,
    weights_sha256,
)
from llm_lightning.distill.teacher_cache import TeacherCache
from llm_lightning.models import load_classifier
from llm_lightning.models.export import export_model
from llm_lightning.models.tiny import byte_tokenizer
from tests.conftest import make_cfg, tiny_model_cfg

LABELS = ["negative", "positive"]
TINY = tiny_model_cfg(num_layers=3)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """An exported 3-layer tiny teacher (random weights are enough to test the plumbing)."""
    model, tok = load_classifier(TINY, LABELS)
    return export_model(model, tok, tmp_path_factory.mktemp("teacher") / "model")


@pytest.fixture
def batch():
    tok = byte_tokenizer()
    enc = tok(["a gorgeous film", "dull", "it was fine, I suppose"], padding=True, return_tensors="pt")
    return {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "labels": torch.tensor([1, 0, 1]),
        "index": torch.tensor([0, 1, 2]),
    }


# ---- the loss ----


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    loss = KLDivergenceLoss()
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    for t in (0.5, 1.0, 4.0):
        assert loss(logits, logits.clone(), t).item() == pytest.approx(0.0, abs=1e-6)
        assert loss(logits, logits.flip(0), t).item() > 1e-3


def test_kd_loss_is_t_squared_times_kl_and_tends_to_half_the_variance():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    loss = KLDivergenceLoss()
    for t in (1.0, 2.0, 5.0):
        kl = F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean")
        assert loss(student, teacher, t).item() == pytest.approx(t**2 * kl.item(), rel=1e-5)
    # Documented: for large T the T²-scaled loss tends to mean((d - mean d)²) / 2, d = student - teacher.
    d = student - teacher
    limit = ((d - d.mean(-1, keepdim=True)) ** 2).mean(-1).div(2).mean().item()
    assert loss(student, teacher, 200.0).item() == pytest.approx(limit, rel=1e-2)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        loss(student, teacher, 0.0)


def test_hidden_loss_projects_only_when_widths_differ():
    assert isinstance(HiddenStateLoss(8, 8).proj, torch.nn.Identity)
    h = HiddenStateLoss(4, 8)
    assert h(torch.randn(3, 4), torch.randn(3, 8)).shape == ()


def test_schedules_move_between_start_and_end():
    assert Schedule(4.0, 1.0, "linear")(0.5) == pytest.approx(2.5)
    assert Schedule(4.0, 1.0, "cosine")(0.25) == pytest.approx(4.0 - 3.0 * (1 - 0.5**0.5) / 2)
    assert Schedule(0.5)(0.9) == 0.5 and Schedule(4.0, 1.0, "linear")(2.0) == 1.0
    with pytest.raises(ValueError, match="not one of"):
        Schedule(1.0, 2.0, "step")
    with pytest.raises(ValueError, match="alpha must be in"):
        KDSettings.checked(alpha=1.5)
    with pytest.raises(
        ValueError, match=r"temperature must be > 0, got 0; distill.alpha must be in \[0, 1\], got -1"
    ):
        KDSettings.checked(temperature=0, alpha=-1)
    with pytest.raises(ValueError, match=r"alpha_schedule.end must be in \[0, 1\], got 2.0"):
        KDSettings.checked(alpha_schedule={"end": 2.0, "shape": "linear"})
    settings = KDSettings.checked(4.0, 0.5, {"end": 1.0, "shape": "linear"}, {"end": 0.1, "shape": "cosine"})
    assert settings.at(0.5) == {"temperature": 2.5, "alpha": pytest.approx(0.3)}
    assert str(settings) == "T=4->1 (linear), alpha=0.5->0.1 (cosine), hidden_weight=0.0"


def test_distillation_loss_is_alpha_kd_plus_one_minus_alpha_ce_plus_the_hidden_term():
    g = torch.Generator().manual_seed(2)
    student = torch.randn(4, 3, generator=g, requires_grad=True)
    teacher = torch.randn(4, 3, generator=g)
    labels = torch.tensor([0, UNLABELED, 2, 1])  # a transfer-set row: KD only
    hidden_s, hidden_t = torch.randn(4, 5, generator=g), torch.randn(4, 8, generator=g)
    loss = DistillationLoss(KDSettings.checked(3.0, 0.7, hidden_weight=0.5), student_width=5, teacher_width=8)
    terms = loss(student, teacher, labels, 0.0, student_hidden=hidden_s, teacher_hidden=hidden_t)
    kd = KLDivergenceLoss()(student, teacher, 3.0)
    ce = F.cross_entropy(student[[0, 2, 3]], labels[[0, 2, 3]])
    mse = F.mse_loss(loss.hidden.proj(hidden_s), hidden_t)
    assert set(terms) == {"kd", "ce", "hidden", "loss"}
    for name, expected in (
        ("kd", kd),
        ("ce", ce),
        ("hidden", mse),
        ("loss", 0.7 * kd + (1 - 0.7) * ce + 0.5 * mse),
    ):
        torch.testing.assert_close(terms[name], expected, rtol=0, atol=0, msg=name)
    terms["loss"].backward()
    assert loss.hidden.proj.weight.grad.abs().sum() > 0  # the projection is the loss's own parameter
    assert [n for n, _ in loss.named_parameters()] == ["hidden.proj.weight", "hidden.proj.bias"]
    with pytest.raises(ValueError, match="needs student_hidden and teacher_hidden"):
        loss(student, teacher, labels)
    plain = DistillationLoss(KDSettings.checked(3.0, 0.7))
    assert set(plain(student, teacher, labels)) == {"kd", "ce", "loss"} and not list(plain.parameters())


# ---- the student ----


def test_student_keeping_every_layer_is_exactly_the_teacher(teacher_dir, batch):
    teacher, _ = load_teacher(str(teacher_dir), LABELS)
    student = student_from_teacher(teacher, [0, 1, 2]).eval()
    with torch.no_grad():
        expected = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, expected)


def test_student_copies_the_kept_layers_embeddings_norm_and_head(teacher_dir):
    teacher, _ = load_teacher(str(teacher_dir), LABELS)
    student = student_from_teacher(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert student.config.distilled_from == {"keep_layers": [0, 2], "teacher_layers": 3}
    pairs = [
        (student.model.layers[1], teacher.model.layers[2]),
        (student.model.embed_tokens, teacher.model.embed_tokens),
        (student.model.norm, teacher.model.norm),
        (student.score, teacher.score),
    ]
    for s, t in pairs:
        for (name, ps), pt in zip(s.named_parameters(), t.parameters(), strict=True):
            assert torch.equal(ps, pt) and ps.data_ptr() != pt.data_ptr(), name
    assert all(p.requires_grad for p in student.parameters()) and student.training
    assert evenly_spaced(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert evenly_spaced(30, 1) == [29] and evenly_spaced(4, 4) == [0, 1, 2, 3]


def test_build_student_returns_the_kept_layers_and_the_teacher_and_leaves_the_config_alone(
    teacher_dir, tmp_path
):
    cfg = make_cfg(tmp_path, ["distill=kd", f"distill.teacher={teacher_dir}", "distill.student.num_layers=2"])
    before = OmegaConf.to_yaml(cfg)
    student = build_student(cfg, LABELS)
    assert student.keep_layers == [0, 2] and len(student.model.model.layers) == 2
    assert student.model.config.distilled_from == {"keep_layers": [0, 2], "teacher_layers": 3}
    assert student.model.config._attn_implementation == cfg.model.attn_implementation == "eager"
    teacher, _ = load_teacher(str(teacher_dir), LABELS)
    assert student.teacher == TeacherRef(
        str(teacher_dir),
        weights_sha256(teacher),
        sum(p.numel() for p in teacher.parameters()),
        teacher.config.hidden_size,
        "eager",
    )
    assert OmegaConf.to_yaml(cfg) == before  # nothing written back into the config


# ---- bad input ----


def test_keep_layers_out_of_range_is_a_clear_error(teacher_dir, tmp_path):
    cfg = make_cfg(
        tmp_path, ["distill=kd", f"distill.teacher={teacher_dir}", "distill.student.keep_layers=[0,5]"]
    )
    with pytest.raises(
        ValueError, match=r"distill.student.keep_layers=\[0, 5\] is out of range: \[5\].*0\.\.2"
    ):
        build_student(cfg, LABELS)
    cfg = make_cfg(tmp_path, ["distill=kd", f"distill.teacher={teacher_dir}", "distill.student.num_layers=4"])
    with pytest.raises(ValueError, match=r"num_layers=4 is out of range.*3 decoder layers; choose 1\.\.3"):
        build_student(cfg, LABELS)


def test_missing_teacher_path_is_a_clear_error(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"distill.teacher='/nowhere/model' does not exist.*model/ folder"
    ):
        load_teacher("/nowhere/model", LABELS)


def test_teacher_with_other_labels_is_refused(teacher_dir):
    with pytest.raises(
        ValueError, match=r"teacher's labels \['negative', 'positive'\] differ.*\['a', 'b', 'c'\]"
    ):
        load_teacher(str(teacher_dir), ["a", "b", "c"])


def test_student_with_another_tokenizer_is_refused(teacher_dir, tmp_path):
    other = byte_tokenizer()
    other.add_tokens(["<movie>"])
    with pytest.raises(
        ValueError, match=r"different tokenizers: vocabularies differ .*only in the student: \['<movie>'\]"
    ):
        check_same_tokenizer(byte_tokenizer(), other)
    # Through the config: a student from `model=` must share the teacher's tokenizer (here it does).
    cfg = make_cfg(
        tmp_path,
        [
            "distill=kd",
            f"distill.teacher={teacher_dir}",
            "distill.student.from_teacher=false",
            "model.hidden_size=32",
        ],
    )
    student = build_student(cfg, LABELS)
    assert student.model.config.hidden_size == 32 and student.keep_layers is None


# ---- the cache and the callback ----


def _datamodule(tmp_path, max_length: int = 64):
    cfg = make_cfg(tmp_path)
    data = load_task(cfg.task, cfg.seed)
    dm = ClassificationDataModule(data, byte_tokenizer(), max_length, 4, 8, cfg.seed)
    dm.setup()
    return dm


def test_cached_teacher_outputs_equal_uncached_ones_on_the_same_batch(teacher_dir, tmp_path):
    teacher, _ = load_teacher(str(teacher_dir), LABELS)
    dm = _datamodule(tmp_path)
    split = dm.splits["train"]
    cache = TeacherCache(
        tmp_path / "cache", weights_sha256(teacher), "sentiment", 64, "32-true", with_hidden=True
    )
    ref = TeacherRef(str(teacher_dir), weights_sha256(teacher))
    cached = KnowledgeDistillation(ref, "sentiment", with_hidden=True)
    cached.outputs["train"] = cache.fill(
        teacher, "train", split.input_ids, 0, batch_size=5, log=lambda _: None
    )
    uncached = KnowledgeDistillation(ref, "sentiment", CacheSettings(enabled=False), with_hidden=True)
    uncached.teacher = teacher
    batch = next(iter(dm.train_dataloader()))  # different padding than the fill's length-sorted batches
    a, b = cached.teacher_batch("train", batch), uncached.teacher_batch("train", batch)
    assert set(a) == set(b) == {"teacher_logits", "teacher_hidden"}
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    # The same loss either way, from the outputs that come with the batch.
    loss = DistillationLoss(KDSettings.checked(3.0, 0.7))
    student_logits = torch.randn(batch["labels"].shape[0], 2)
    la = loss(student_logits, a["teacher_logits"], batch["labels"])
    lb = loss(student_logits, b["teacher_logits"], batch["labels"])
    torch.testing.assert_close(la["loss"], lb["loss"], atol=1e-6, rtol=1e-5)
    assert la["kd"].item() > 0


def test_cache_is_reused_and_invalidated_by_a_changed_teacher_or_tokenization(teacher_dir, tmp_path):
    teacher, _ = load_teacher(str(teacher_dir), LABELS)
    dm = _datamodule(tmp_path)
    ids = dm.splits["train"].input_ids
    cache = TeacherCache(tmp_path / "cache", weights_sha256(teacher), "sentiment", 64, "32-true")
    assert cache.load("train", ids) is None
    entry = cache.fill(teacher, "train", ids, 0, batch_size=8, log=lambda _: None)
    assert torch.equal(cache.load("train", ids)["logits"], entry["logits"])  # another run reuses it
    with torch.no_grad():
        teacher.score.weight.add_(0.01)
    changed = TeacherCache(tmp_path / "cache", weights_sha256(teacher), "sentiment", 64, "32-true")
    assert changed.teacher_sha256 != cache.teacher_sha256 and changed.load("train", ids) is None
    shorter = [x[:8] for x in ids]  # max_length=8 tokenizes differently
    assert cache.load("train", shorter) is None and cache.path("train", shorter) != cache.path("train", ids)


class _Killed(Exception):
    pass


def _counting(teacher, die_after: int | None = None) -> list[int]:
    """Counts the examples `teacher` runs (in the list it returns), and kills the run (an exception)
    once `die_after` have run."""
    seen = [0]

    def hook(_module, _args, kwargs):
        if die_after is not None and seen[0] >= die_after:
            raise _Killed
        seen[0] += kwargs["input_ids"].shape[0]

    teacher.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_a_killed_fill_resumes_from_its_saved_parts_and_gives_the_same_outputs(teacher_dir, tmp_path):
    teacher, _ = load_teacher(str(teacher_dir), LABELS)
    ids = _datamodule(tmp_path).splits["train"].input_ids
    assert len(ids) > 20
    sha = weights_sha256(teacher)

    def cache(root: str) -> TeacherCache:
        return TeacherCache(tmp_path / root, sha, "sentiment", 64, "32-true", with_hidden=True, part_rows=8)

    whole = cache("whole").fill(teacher, "train", ids, 0, batch_size=4, log=lambda _: None)

    dying, _ = load_teacher(str(teacher_dir), LABELS)
    _counting(dying, die_after=12)  # dies inside the second part of 8
    with pytest.raises(_Killed):
        cache("resumed").fill(dying, "train", ids, 0, batch_size=4, log=lambda _: None)
    resumed = cache("resumed")
    parts = resumed.path("train", ids).with_name(f".{resumed.path('train', ids).name}.parts")
    assert [p.name for p in parts.iterdir()] == ["rows-00000000-00000008.pt"]  # no half part, no tmp
    assert resumed.load("train", ids) is None  # nothing a reader could take as the whole split

    again, _ = load_teacher(str(teacher_dir), LABELS)
    seen = _counting(again)
    said: list[str] = []
    entry = resumed.fill(again, "train", ids, 0, batch_size=4, log=said.append)
    assert seen[0] == len(ids) - 8  # the saved part is not run again
    assert any("read from an interrupted fill" in line for line in said)
    for key in ("logits", "hidden"):
        torch.testing.assert_close(entry[key], whole[key], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(resumed.load("train", ids)["logits"], whole["logits"], atol=1e-5, rtol=1e-4)
    assert not parts.exists()  # the parts go once the whole file is written


def test_teacher_gets_no_gradient_and_the_projection_trains(teacher_dir, tmp_path):
    """In-process run with the teacher in memory (cache off) and a narrower student, so the
    hidden-state term has a learned projection."""
    from llm_lightning.train import train

    cfg = make_cfg(
        tmp_path,
        [
            "distill=kd",
            f"distill.teacher={teacher_dir}",
            "distill.student.from_teacher=false",
            "model.hidden_size=32",
            "model.intermediate_size=64",
            "distill.cache.enabled=false",
            "distill.hidden_weight=1.0",
            "test=false",
            "export=false",
        ],
    )
    metrics, objects = train(cfg)
    callback = next(c for c in objects["trainer"].callbacks if isinstance(c, KnowledgeDistillation))
    teacher = callback.teacher
    reference, _ = load_teacher(str(teacher_dir), LABELS)
    assert not teacher.training and all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for (name, p), q in zip(teacher.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name  # the optimizer never touched the teacher
    module = objects["module"]
    assert not hasattr(module, "distill_hidden") and not hasattr(module, "extra_losses")
    proj = module.criterion.hidden.proj
    assert isinstance(proj, torch.nn.Linear) and proj.weight.shape == (64, 32)
    optimizer = objects["trainer"].optimizers[0]
    assert any(proj.weight is p for g in optimizer.param_groups for p in g["params"])
    assert optimizer.state[proj.weight]["exp_avg"].abs().sum() > 0  # it got gradients and steps
    # under the model's schedule from the configured LR: with warmup, the first step's LR is 0,
    # and a group that took that as its base never trained
    group = next(g for g in optimizer.param_groups if any(proj.weight is p for p in g["params"]))
    assert group["initial_lr"] == cfg.optimizer.lr > 0 and cfg.scheduler.warmup_ratio > 0
    for key in ("train/kd_epoch", "train/ce_epoch", "train/hidden_epoch", "train/loss_epoch"):
        assert key in metrics, key
