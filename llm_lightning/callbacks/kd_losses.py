"""Distillation losses as small modules, after torchtune's `modules/loss/kd_losses.py`: softmax in
float32, shapes in the docstrings, nothing else. And the schedule object for T and alpha."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_lightning.errors import UserError

SHAPES = ("constant", "linear", "cosine")


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
