"""Which training stage the chain's last forms (`quantized/`, `deploy/`) are made from.

By default the last stage. With `final_among: [layers11, layers11_more]` (a recipe's or the command
line's), the one of those stages whose training run reached the best validation accuracy
(`val/acc_best` in its metrics.json). So whether a second distillation helped is decided on the
validation split, after both are trained, and never on the test split the report then scores.
"""

from __future__ import annotations

from pathlib import Path

from llm_lightning.artifacts import BEST_VALIDATION as VAL_KEY
from llm_lightning.artifacts import METRICS_FILE, best_validation_accuracy
from llm_lightning.errors import UserError


def check_final_among(among, stages: list[str]) -> list[str]:
    """`final_among` checked before anything trains: stages of this chain, or empty (the last)."""
    if isinstance(among, str):  # `final_among: layers11`, one name
        among = [among]
    names = [str(n) for n in (among or [])]
    unknown = [n for n in names if n not in stages]
    if unknown:
        raise UserError(
            f"compress: final_among={names} names {unknown}, not stages of this chain; its stages: "
            f"{', '.join(stages)} (key `final_among` of conf/compress.yaml or the recipe)."
        )
    return names


def choose_final(out: Path, stages: list[str], among: list[str]) -> tuple[str, dict | None]:
    """The stage to quantize and export, and the record of the choice (None: the last stage, no choice).
    On a tie the stage listed first wins: the shorter road to the same accuracy."""
    if not among:
        return stages[-1], None
    scores = {}
    for stage in among:
        value = best_validation_accuracy(Path(out) / stage)
        if value is None:
            raise UserError(
                f"compress: final_among chooses on {VAL_KEY}, and stage {stage!r} has none in "
                f"{Path(out) / stage / METRICS_FILE} "
                "(trained without a validation split?). Give the task a val split, or drop final_among."
            )
        scores[stage] = value
    best = max(among, key=lambda s: scores[s])  # max keeps the first of equal scores
    print(
        f"[compress] final model: {best}, chosen on {VAL_KEY} ("
        + ", ".join(f"{s} {v:.4f}" for s, v in scores.items())
        + ")",
        flush=True,
    )
    return best, {"stage": best, "by": VAL_KEY, "among": scores}
