"""The teacher's outputs for every example of a split, computed once and kept on disk.

A file holds one split's logits (and pooled hidden states, when the hidden-state term wants
them), row i = example i of the split. Its name is the key: the teacher's weights hash, the
task, split, max_length, the autocast precision, and a hash of the split's token ids, so a
changed teacher, tokenizer, text or max_length finds no file and computes a new one.

    <root>/<teacher sha256[:16]>/<task>-<split>-len<max_length>-<precision>-<token ids sha256[:16]>[-hidden].pt

While a fill runs, its finished parts wait beside it in `.<that name>.parts/`, so a killed fill
(a 37,000-example split takes the 135M teacher ~25 minutes on 2 cores) resumes where it stopped.
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
        part_rows: examples a fill computes between saves (see `fill`).
    """

    def __init__(
        self,
        root: Path,
        teacher_sha256: str,
        task: str,
        max_length: int,
        precision: str,
        with_hidden: bool = False,
        part_rows: int = 4096,
    ):
        self.root, self.teacher_sha256 = Path(root), teacher_sha256
        self.task, self.max_length, self.precision, self.with_hidden = (
            task,
            max_length,
            precision,
            with_hidden,
        )
        self.part_rows = int(part_rows)

    def path(self, split: str, input_ids: list[list[int]]) -> Path:
        data = token_ids_sha256(input_ids)[:16]
        suffix = "-hidden" if self.with_hidden else ""
        name = f"{self.task}-{split}-len{self.max_length}-{self.precision}-{data}{suffix}.pt"
        return self.root / self.teacher_sha256[:16] / name

    def load(self, split: str, input_ids: list[list[int]]) -> dict[str, torch.Tensor] | None:
        """The cached outputs, or None when this key has none yet."""
        return self._read(self.path(split, input_ids), len(input_ids))

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
        """Run the teacher once over every example and write the file atomically. Prints progress
        about every 10%.

        The split runs in parts of `part_rows` examples (shortest first within each, so batches
        barely pad), each saved as it ends: a fill that is killed (a session's end, a preempted
        job) loses at most one part, and the next fill of the same key reads the parts done.
        """
        n = len(input_ids)
        path = self.path(split, input_ids)
        parts = path.with_name(f".{path.name}.parts")  # beside the file, under the same key
        started, done, computed, next_report = time.perf_counter(), 0, 0, 0.1
        context = forward_context or contextlib.nullcontext

        def report(how: str) -> None:
            nonlocal next_report
            if done / n >= next_report or done == n:
                log(f"Teacher outputs [{self.task}/{split}]: {done:,}/{n:,} examples {how}")
                while next_report <= done / n:
                    next_report += 0.1

        def forward(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            nonlocal done, computed
            with context():
                out = teacher_outputs(teacher, ids.to(device), mask.to(device), self.with_hidden)
            done, computed = done + ids.shape[0], computed + ids.shape[0]
            report(f"({computed / max(time.perf_counter() - started, 1e-9):.0f}/s)")
            return out

        pieces = []
        for start in range(0, n, self.part_rows):
            stop = min(start + self.part_rows, n)
            part = parts / f"rows-{start:08d}-{stop:08d}.pt"
            piece = self._read(part, stop - start)
            if piece is None:
                logits, hidden = run_by_length(input_ids[start:stop], batch_size, pad_token_id, forward)
                piece = self._entry(logits, hidden)
                _save_atomically(piece, part)
            else:
                done += stop - start
                report(f"read from an interrupted fill ({parts})")
            pieces.append(piece)
        entry = self._entry(
            torch.cat([p["logits"] for p in pieces]),
            torch.cat([p["hidden"] for p in pieces]) if self.with_hidden else None,
        )
        _save_atomically(entry, path)  # readers see the whole file or none
        for piece_path in parts.glob("rows-*.pt"):
            piece_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            parts.rmdir()  # another rank may still be writing its parts there
        return entry

    def _entry(self, logits: torch.Tensor, hidden: torch.Tensor | None) -> dict[str, torch.Tensor]:
        entry = {"logits": logits, "teacher_sha256": self.teacher_sha256}
        if hidden is not None:
            entry["hidden"] = hidden
        return entry

    def _read(self, path: Path, rows: int) -> dict[str, torch.Tensor] | None:
        """A file of this cache's outputs for `rows` examples, or None if absent or foreign."""
        if not path.exists():
            return None
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if entry.get("teacher_sha256") != self.teacher_sha256 or entry["logits"].shape[0] != rows:
            return None  # a hash-prefix collision or a foreign file: recompute rather than trust it
        if self.with_hidden and "hidden" not in entry:
            return None
        return entry


def _save_atomically(entry: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(entry, tmp)
    os.replace(tmp, path)
