"""Distillation: the teacher against a KD student and the same student trained without KD.

    # 1. the two student runs (same init from the teacher's layers, same data, LR and schedule):
    python -m llm_lightning.train task=sentiment distill=kd distill.teacher=<teacher>/model \
        hydra.run.dir=outputs/distill/kd-15
    python -m llm_lightning.train task=sentiment distill=kd distill.teacher=<teacher>/model \
        distill.alpha=0 hydra.run.dir=outputs/distill/nokd-15            # alpha=0: CE only, no KD
    # 2. this table:
    python benchmarks/distill.py --teacher <teacher>/model --kd outputs/distill/kd-15 --no-kd outputs/distill/nokd-15

Accuracy comes from each run's metrics.json (the teacher's from the KD run's `teacher/test/acc`,
computed by the callback on the same test split). Throughput is measured here: forward only,
fp32, eager attention, batch 16, the first `--texts` test texts in split order (real length mix), real
(non-pad) tokens per second, models interleaved over `--rounds` rounds, median reported.

The KD cost: `--steps` training steps of the 15-layer student on the same batches, alternating a
plain CE step and a KD step that reads the warm teacher-logit cache (bf16 autocast, fused AdamW,
as in training); the median step times and their ratio. Target: KD <= 1.2x plain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from llm_lightning.data import ClassificationDataModule, load_task
from llm_lightning.distill.losses import DistillationLoss, KDSettings
from llm_lightning.distill.student import evenly_spaced, student_from_teacher, weights_sha256
from llm_lightning.distill.teacher_cache import TeacherCache
from llm_lightning.models.saved import load_saved
from llm_lightning.runtime import conf_dir


def throughput(models: dict, tokenizer, texts: list[str], batch_size: int, rounds: int) -> dict[str, float]:
    """Median tokens/s per model, forward only, models interleaved each round."""
    batches = [
        tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt")
        for i in range(0, len(texts), batch_size)
    ]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model.eval()(**batches[0])
        for _ in range(rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for b in batches:
                    model(**b)
                times[name].append(time.perf_counter() - start)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def task_config(limit: int | None):
    cfg = OmegaConf.load(conf_dir() / "task" / "sentiment.yaml")
    cfg.limit = limit
    return cfg


def kd_step_cost(
    teacher, cache_root: str | None, steps: int, num_layers: int, limit: int | None
) -> dict[str, float]:
    """Median seconds per training step: plain CE against KD with the warm cache, same batches."""
    cfg = task_config(limit)
    data = load_task(cfg, seed=42)
    _, tokenizer, names = teacher
    model = teacher[0]
    dm = ClassificationDataModule(data, tokenizer, cfg.max_length, 16, 32, seed=42)
    dm.setup()
    cache = TeacherCache(
        Path(cache_root) if cache_root else _default_root(),
        weights_sha256(model),
        cfg.name,
        cfg.max_length,
        "bf16-mixed",
    )
    entry = cache.load("train", dm.splits["train"].input_ids)
    if entry is None:
        raise SystemExit(
            f"No warm cache at {cache.path('train', dm.splits['train'].input_ids)}: run the KD "
            "student first (it fills the cache), with the same distill.cache.dir."
        )
    total = len(model.model.layers)  # the students kept evenly spaced layers (distill.student.num_layers)
    keep = evenly_spaced(total, num_layers)
    student = student_from_teacher(model, keep).train()
    student.model.embed_tokens.requires_grad_(False)  # as finetune=full: embeddings frozen
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    kd = DistillationLoss(KDSettings.checked(2.0, 0.5))  # the loss distill=kd trains with
    batches = [b for _, b in zip(range(steps), dm.train_dataloader(), strict=False)]
    times = {"plain": [], "kd": []}

    def step(batch, with_kd: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = student(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits.float()
        if with_kd:
            loss = kd(logits, entry["logits"][batch["index"]], batch["labels"])["loss"]
        else:
            loss = F.cross_entropy(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step(batches[0], False)  # warm-up
    step(batches[0], True)
    for i, batch in enumerate(batches):  # alternate the order so drift hits both alike
        for with_kd in (False, True) if i % 2 == 0 else (True, False):
            times["kd" if with_kd else "plain"].append(step(batch, with_kd))
    plain, kd_s = statistics.median(times["plain"]), statistics.median(times["kd"])
    return {"plain_s_per_step": plain, "kd_s_per_step": kd_s, "ratio": kd_s / plain, "steps": len(batches)}


def _default_root() -> Path:
    from llm_lightning.models.smollm2 import cache_dir

    return cache_dir() / "teacher_logits"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", required=True, help="the teacher's exported model/ folder")
    parser.add_argument("--kd", required=True, help="run dir of the student trained with KD")
    parser.add_argument("--no-kd", required=True, help="run dir of the same student trained with alpha=0")
    parser.add_argument(
        "--more",
        action="append",
        default=[],
        metavar="LABEL=RUN_DIR",
        help="another student run to add as a row (repeatable), e.g. 'student, KD + transfer set=outputs/...'",
    )
    parser.add_argument("--texts", type=int, default=256, help="test texts per throughput pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="training steps per variant for the KD cost")
    parser.add_argument(
        "--cache-dir", default=None, help="distill.cache.dir of the KD run, if not the default"
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--attn", default="eager", help="attention kernel for all three models")
    parser.add_argument("--limit", type=int, default=None, help="task.limit of the runs (wiring checks only)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    labels = {"teacher": "teacher", "kd": "student, KD", "no_kd": "student, no KD (alpha=0)"}
    dirs = {"kd": args.kd, "no_kd": args.no_kd}
    for i, spec in enumerate(args.more):
        label, sep, run_dir = spec.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"--more {spec!r}: write LABEL=RUN_DIR")
        labels[f"more{i}"], dirs[f"more{i}"] = label, run_dir
    runs = {name: json.loads((Path(d) / "metrics.json").read_text()) for name, d in dirs.items()}
    teacher = load_saved(args.teacher)
    students = {name: load_saved(Path(d) / "model")[0] for name, d in dirs.items()}
    models = {"teacher": teacher[0], **students}
    for model in models.values():  # as conf/model/smollm2_135m.yaml: eager is faster on CPU for short texts
        model.set_attn_implementation(args.attn)
    texts = load_task(task_config(args.limit), seed=42).test.texts[: args.texts]
    tps = throughput(models, teacher[1], texts, 16, args.rounds)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    acc = {"teacher": runs["kd"]["teacher/test/acc"], **{name: r["test/acc"] for name, r in runs.items()}}
    layers = {name: len(m.model.layers) for name, m in models.items()}

    print("| model | layers | test accuracy | % of teacher | parameters | tokens/s, batch 16 | × teacher |")
    print("|---|---|---|---|---|---|---|")
    for name in models:
        print(
            f"| {labels[name]} | {layers[name]} | {acc[name]:.4f} | {100 * acc[name] / acc['teacher']:.1f}% | "
            f"{params[name] / 1e6:.1f}M | {tps[name]:.0f} | {tps[name] / tps['teacher']:.2f}× |"
        )
    print()
    for name, r in runs.items():
        print(
            f"{labels[name]}: train {r['train/seconds']:.0f} s (cache fill {r.get('distill/cache_fill_seconds', 0):.0f} s), "
            f"train/tokens_per_s {r.get('train/tokens_per_s', float('nan')):.0f}"
        )
    cost = kd_step_cost(teacher, args.cache_dir, args.steps, layers["kd"], args.limit)
    print(
        f"\nKD step with a warm cache vs plain CE step ({cost['steps']} steps each, batch 16, bf16): "
        f"{cost['kd_s_per_step']:.3f} s vs {cost['plain_s_per_step']:.3f} s = {cost['ratio']:.3f}×"
    )


if __name__ == "__main__":
    main()
