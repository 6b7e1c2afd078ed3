"""The teacher's outputs for every example of a split, computed once and kept on disk.

A file holds one split's logits (and pooled hidden states, when the hidden-state term wants
them), row i = example i of the split. Its name is the key: the teacher's weights hash, the
task, split, max_length, the autocast precision, and a hash of the split's token ids, so a
changed teacher, tokenizer, text or max_length finds no file and computes a new one.

    <root>/<teacher sha256[:16]>/<task>-<split>-len<max_length>-<precision>-<token ids sha256[:16]>[-hidden].pt
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llm_lightning.data.batching import run_by_length
from llm_lightning.distill.losses import pooled_last_token
from llm_lightning.models import decoder_parts


def token_ids_sha256(input_ids: list[list[int]]) -> str:
    """Hash of a split's token ids, in order (row i is example id i)."""
    digest = hashlib.sha256()
    for ids in input_ids:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_hidden: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One teacher forward.

    Args:
        input_ids, attention_mask: (batch, seq), right-padded.

    Returns:
        logits (batch, num_labels) float32, and the pooled last-token hidden state
        (batch, width) float32 after the final norm, or None.
    """
    captured: list[torch.Tensor] = []
    hook = None
    if with_hidden:
        norm = decoder_parts(teacher)[2][0]
        hook = norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = teacher(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    finally:
        if hook is not None:
            hook.remove()
    hidden = None
    if with_hidden:
        hidden = pooled_last_token(captured[-1], input_ids, teacher.config.pad_token_id).float()
    return logits, hidden


class TeacherCache:
    """Teacher logits on disk for one teacher, task and tokenization.

    Args:
        root: cache folder (`distill.cache.dir`, default `$LLM_LIGHTNING_CACHE/teacher_logits`).
        teacher_sha256: `weights_sha256(teacher)`.
        task: task name; max_length: tokenization limit; precision: the trainer's precision,
            since bf16 autocast gives slightly different logits than fp32.
        with_hidden: also store pooled hidden states (for the hidden-state term).
    """

    def __init__(
        self,
        root: Path,
        teacher_sha256: str,
        task: str,
        max_length: int,
        precision: str,
        with_hidden: bool = False,
    ):
        self.root, self.teacher_sha256 = Path(root), teacher_sha256
        self.task, self.max_length, self.precision, self.with_hidden = (
            task,
            max_length,
            precision,
            with_hidden,
        )

    def path(self, split: str, input_ids: list[list[int]]) -> Path:
        data = token_ids_sha256(input_ids)[:16]
        suffix = "-hidden" if self.with_hidden else ""
        name = f"{self.task}-{split}-len{self.max_length}-{self.precision}-{data}{suffix}.pt"
        return self.root / self.teacher_sha256[:16] / name

    def load(self, split: str, input_ids: list[list[int]]) -> dict[str, torch.Tensor] | None:
        """The cached outputs, or None when this key has none yet."""
        path = self.path(split, input_ids)
        if not path.exists():
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if entry.get("teacher_sha256") != self.teacher_sha256 or entry["logits"].shape[0] != len(input_ids):
            return None  # a hash-prefix collision or a foreign file: recompute rather than trust it
        return entry

    def fill(
        self,
        teacher: nn.Module,
        split: str,
        input_ids: list[list[int]],
        pad_token_id: int,
        batch_size: int,
        forward_context: Callable[[], contextlib.AbstractContextManager] | None = None,
        device: torch.device | str = "cpu",
        log: Callable[[str], None] = print,
    ) -> dict[str, torch.Tensor]:
        """Run the teacher once over every example (shortest first, so batches barely pad) and
        write the file atomically. Prints progress about every 10%."""
        n = len(input_ids)
        started, done, next_report = time.perf_counter(), 0, 0.1
        context = forward_context or contextlib.nullcontext

        def forward(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            nonlocal done, next_report
            with context():
                out = teacher_outputs(teacher, ids.to(device), mask.to(device), self.with_hidden)
            done += ids.shape[0]
            if done / n >= next_report or done == n:
                rate = done / max(time.perf_counter() - started, 1e-9)
                log(f"Teacher outputs [{self.task}/{split}]: {done:,}/{n:,} examples ({rate:.0f}/s)")
                next_report += 0.1
            return out

        logits, hidden = run_by_length(input_ids, batch_size, pad_token_id, forward)
        entry = {"logits": logits, "teacher_sha256": self.teacher_sha256}
        if hidden is not None:
            entry["hidden"] = hidden
        path = self.path(split, input_ids)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(entry, tmp)
        os.replace(tmp, path)  # readers see the whole file or none
        return entry
