"""When to prune how much: one-shot, at given epochs, or gradual cubic (Zhu & Gupta, 2017).

Cubic: `s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3` for `t0 <= t <= t0 + n*dt`,
updated every `dt` optimizer steps; `s_i` before `t0` and `s_f` after the end. Pruning fast
early, when many weights are redundant, and slowly near the end lets the network recover.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_lightning.errors import UserError

KINDS = ("one_shot", "epochs", "cubic")


def check_sparsity(value: float, key: str) -> float:
    """Sparsity is a fraction of weights removed: 0 keeps all, 1 would remove everything."""
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise UserError(
            f"{key}={value!r} is outside [0, 1): it is the fraction of weights removed "
            f"(0.5 removes half). Change `{key}`."
        )
    return float(value)


@dataclass
class SparsitySchedule:
    """Target sparsity as a function of optimizer step (and epoch, for `kind=epochs`).

    Args:
        kind: one of KINDS.
        final_sparsity: s_f, in [0, 1).
        initial_sparsity: s_i (cubic only).
        start_step: t0 (cubic only).
        end_step: t0 + n*dt (cubic only); None until `resolve` fills it from the run's length.
        frequency: dt, steps between mask updates (cubic only).
        epochs: for `kind=epochs`, the epochs at which sparsity rises; it reaches
            `final_sparsity * (i + 1) / len(epochs)` at the i-th.
    """

    kind: str = "cubic"
    final_sparsity: float = 0.5
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    frequency: int = 10
    epochs: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in KINDS:
            problems.append(f"prune.schedule.kind={self.kind!r} is not one of {KINDS}")
        for key, value in (
            ("prune.sparsity", self.final_sparsity),
            ("prune.schedule.initial_sparsity", self.initial_sparsity),
        ):
            try:
                check_sparsity(value, key)
            except ValueError as e:
                problems.append(str(e))
        if self.frequency < 1:
            problems.append(f"prune.schedule.frequency={self.frequency} must be >= 1 (optimizer steps)")
        if self.end_step is not None and self.end_step <= self.start_step:
            problems.append(f"prune.schedule.end_step={self.end_step} must be > start_step={self.start_step}")
        if self.kind == "epochs" and (not self.epochs or sorted(self.epochs) != list(self.epochs)):
            problems.append(f"prune.schedule.epochs={self.epochs} must be a non-empty increasing list")
        if problems:
            raise UserError("Bad pruning schedule:\n  " + "\n  ".join(problems))
        self.epochs = [int(e) for e in self.epochs]

    def resolve(self, total_steps: int) -> None:
        """Fill `end_step` (if unset) as 75% of the run, so the last quarter trains at s_f."""
        if self.end_step is None:
            self.end_step = max(self.start_step + 1, int(0.75 * total_steps))

    def sparsity_at(self, step: int, epoch: int = 0) -> float:
        """Target sparsity for the forward pass of optimizer step `step` (0-based)."""
        if self.kind == "one_shot":
            return self.final_sparsity
        if self.kind == "epochs":
            reached = sum(1 for e in self.epochs if epoch >= e)
            return self.final_sparsity * reached / len(self.epochs)
        if self.end_step is None:
            raise RuntimeError(
                "SparsitySchedule.resolve(total_steps) must run before a cubic schedule is used."
            )
        if step < self.start_step:
            return self.initial_sparsity
        span = self.end_step - self.start_step
        t = min(step - self.start_step, span)
        t -= t % self.frequency if t < span else 0  # masks change every `frequency` steps
        progress = t / span
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1.0 - progress) ** 3

    def state_dict(self) -> dict:
        return {"end_step": self.end_step}

    def load_state_dict(self, state: dict) -> None:
        self.end_step = state.get("end_step", self.end_step)
