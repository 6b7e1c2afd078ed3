"""The losses a `SequenceClassifier` is given, as small modules after torchtune's
`modules/loss/kd_losses.py` (softmax in float32, shapes in the docstrings): cross-entropy over the
labeled rows, and knowledge distillation on top of it. With the schedules for T and alpha.

    loss = alpha * T² * KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 - alpha) * CE
           + hidden_weight * MSE(proj(student pooled hidden), teacher pooled hidden)

The cross-entropy lives here, not in module.py, because the KD loss is built on it and this
package sits below the module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from llm_lightning.data.transfer import UNLABELED
from llm_lightning.errors import UserError

SHAPES = ("constant", "linear", "cosine")


def labeled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rows with a label; transfer-set texts (label UNLABELED) have none,
    and a batch of only those gives 0 (with a gradient of zeros).

    Args:
        logits: (batch, num_labels).
        labels: (batch,), class ids or UNLABELED.
    """
    labeled = labels != UNLABELED
    if not labeled.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[labeled], labels[labeled])


class ClassificationLoss(nn.Module):
    """Cross-entropy over the labeled rows: the training loss without distillation."""

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits: (batch, num_labels), float32.
            labels: (batch,), class ids or UNLABELED.

        Returns:
            Scalar tensor.
        """
        return labeled_cross_entropy(student_logits, labels)


class KLDivergenceLoss(nn.Module):
    """`T² · KL(softmax(teacher / T) ‖ softmax(student / T))`, averaged over the batch.

    The T² factor (Hinton et al., 2015) keeps the gradient's size independent of T: the soft
    targets' gradients shrink as 1/T², so without it raising T would quietly turn the KD term off.
    For large T the loss tends to `mean((d - mean(d))²) / 2` with `d = student - teacher`, per example.
    It is 0 exactly when the two distributions agree.
    """

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
    ) -> torch.Tensor:
        """
        Args:
            student_logits: (batch, num_labels), any float dtype.
            teacher_logits: (batch, num_labels), no gradient needed.
            temperature: T > 0.

        Returns:
            Scalar float32 tensor.
        """
        if temperature <= 0:
            raise UserError(f"distill.temperature must be > 0, got {temperature}.")
        s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
        kl = (t.exp() * (t - s)).sum(-1)  # (batch,)
        return kl.mean() * temperature**2


class HiddenStateLoss(nn.Module):
    """Mean squared error between the student's and teacher's pooled (last-token) hidden states,
    through a learned linear projection when their widths differ (identity otherwise)."""

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        self.proj = (
            nn.Identity() if student_width == teacher_width else nn.Linear(student_width, teacher_width)
        )

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_hidden: (batch, student_width).
            teacher_hidden: (batch, teacher_width), no gradient needed.

        Returns:
            Scalar float32 tensor.
        """
        projected = self.proj(student_hidden.float())
        return F.mse_loss(projected.float(), teacher_hidden.detach().float())


@dataclass
class Schedule:
    """A value that moves from `start` to `end` over training (`progress` 0 -> 1).

    `shape`: constant (stays at `start`), linear, or cosine (slow at both ends).
    """

    start: float
    end: float | None = None
    shape: str = "constant"

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise UserError(
                f"schedule shape={self.shape!r} is not one of {SHAPES} "
                "(distill.temperature_schedule.shape / distill.alpha_schedule.shape)."
            )
        if self.shape != "constant" and self.end is None:
            raise UserError(f"a {self.shape} schedule needs `end` (distill.*_schedule.end).")

    def __str__(self) -> str:
        return (
            f"{self.start:g}" if self.shape == "constant" else f"{self.start:g}->{self.end:g} ({self.shape})"
        )

    def __call__(self, progress: float) -> float:
        if self.shape == "constant" or self.end is None:
            return self.start
        p = min(max(progress, 0.0), 1.0)
        if self.shape == "cosine":
            p = (1 - math.cos(math.pi * p)) / 2
        return self.start + (self.end - self.start) * p


@dataclass(frozen=True)
class KDSettings:
    """`distill.temperature`, `distill.alpha` (each a `Schedule`) and `distill.hidden_weight`.

    Build it with `from_config` (or `checked`), which checks every value the way a user sets it.
    """

    temperature: Schedule
    alpha: Schedule
    hidden_weight: float = 0.0

    @classmethod
    def checked(
        cls,
        temperature: float = 2.0,
        alpha: float = 0.5,
        temperature_schedule: Mapping | None = None,
        alpha_schedule: Mapping | None = None,
        hidden_weight: float = 0.0,
    ) -> KDSettings:
        """The settings, or a UserError naming every value out of range."""
        problems = []
        if not temperature > 0:
            problems.append(f"distill.temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            problems.append(f"distill.alpha must be in [0, 1], got {alpha}")
        if hidden_weight < 0:
            problems.append(f"distill.hidden_weight must be >= 0, got {hidden_weight}")
        if problems:
            raise UserError("; ".join(problems) + ".")
        t = Schedule(float(temperature), **(temperature_schedule or {}))
        a = Schedule(float(alpha), **(alpha_schedule or {}))
        if a.end is not None and not 0.0 <= a.end <= 1.0:
            raise UserError(f"distill.alpha_schedule.end must be in [0, 1], got {a.end}.")
        if t.end is not None and not t.end > 0:
            raise UserError(f"distill.temperature_schedule.end must be > 0, got {t.end}.")
        return cls(t, a, float(hidden_weight))

    @classmethod
    def from_config(cls, distill: DictConfig) -> KDSettings:
        """From the `distill=kd` group (conf/distill/kd.yaml)."""
        return cls.checked(
            distill.temperature,
            distill.alpha,
            _plain(distill.get("temperature_schedule")),
            _plain(distill.get("alpha_schedule")),
            distill.get("hidden_weight", 0.0),
        )

    def at(self, progress: float) -> dict[str, float]:
        """`{"temperature": T, "alpha": alpha}` at `progress` (0 -> 1 over training)."""
        return {"temperature": self.temperature(progress), "alpha": self.alpha(progress)}

    def __str__(self) -> str:
        return f"T={self.temperature}, alpha={self.alpha}, hidden_weight={self.hidden_weight}"


class DistillationLoss(nn.Module):
    """Knowledge distillation: `alpha * KD + (1 - alpha) * CE (+ hidden_weight * hidden)`.

    The KD term covers every row, transfer-set texts included; the CE term only the labeled ones.
    The hidden-state projection (when the widths differ) is this module's parameter, so it trains,
    moves and is checkpointed with the `SequenceClassifier` that holds the loss.

    Args:
        settings: T, alpha (with their schedules) and the hidden-state weight.
        student_width, teacher_width: hidden sizes, for the hidden-state term; needed only when
            `settings.hidden_weight > 0`.
    """

    def __init__(
        self, settings: KDSettings, student_width: int | None = None, teacher_width: int | None = None
    ):
        super().__init__()
        self.settings = settings
        self.kd = KLDivergenceLoss()
        self.hidden = HiddenStateLoss(student_width, teacher_width) if settings.hidden_weight > 0 else None

    @property
    def wants_hidden(self) -> bool:
        """Whether `forward` needs the pooled hidden states (`student_hidden`, `teacher_hidden`)."""
        return self.hidden is not None

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor,
        progress: float = 0.0,
        student_hidden: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            student_logits: (batch, num_labels), float32.
            teacher_logits: (batch, num_labels), no gradient needed.
            labels: (batch,), class ids or UNLABELED.
            progress: fraction of training done (0 -> 1), for the T and alpha schedules.
            student_hidden: (batch, student_width), the student's pooled last-token hidden state.
            teacher_hidden: (batch, teacher_width), the teacher's.

        Returns:
            `{"kd", "ce", ["hidden"], "loss"}`, scalar tensors; "loss" is the total to minimise.
        """
        values = self.settings.at(progress)
        alpha = values["alpha"]
        ce = labeled_cross_entropy(student_logits, labels)
        kd = self.kd(student_logits, teacher_logits, values["temperature"])
        terms = {"kd": kd, "ce": ce}
        total = alpha * kd + (1 - alpha) * ce
        if self.hidden is not None:
            if student_hidden is None or teacher_hidden is None:
                raise ValueError(
                    "distill.hidden_weight > 0: the loss needs student_hidden and teacher_hidden."
                )
            terms["hidden"] = self.hidden(student_hidden, teacher_hidden)
            total = total + self.settings.hidden_weight * terms["hidden"]
        terms["loss"] = total
        return terms


def pooled_last_token(
    hidden: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int | None
) -> torch.Tensor:
    """The hidden state the classifier head reads: the rightmost non-pad token, as
    `GenericForSequenceClassification` picks it.

    Args:
        hidden: (batch, seq, width).
        input_ids: (batch, seq).

    Returns:
        (batch, width).
    """
    if pad_token_id is None:
        return hidden[:, -1]
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
    last = (positions * non_pad).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _plain(node) -> dict | None:
    if node is None:
        return None
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
