"""Padding: the tokenizer and the model agree on a pad token, and rows become padded batches.

`with_pad_token` lives here, beside `pad`, because padding is where it matters: Llama ships no
pad token and the classifier pools the last non-pad token of each right-padded row.
`length_batches` orders rows by length and cuts them into batches; `run_by_length` runs a model
over those batches and puts each row's output back in the rows' order: every pass over a whole
split (evaluation, the teacher's cache, SmoothQuant's search, predict) goes through it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def with_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
    """Set the pad token, right padding and no KV cache.

    Llama ships no pad token; the classifier pools the last non-pad token, so it must know one.

    Padding is on the right, and the pooled token is the rightmost non-pad one, so reusing
    EOS as pad is safe as long as inputs do not end in EOS (we never append it).
    """
    right_padded(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    # A classifier never generates: with the default use_cache=True every forward also fills a
    # KV cache it throws away, and torch.compile recompiles each decoder layer for it (one guard
    # per layer index) until it hits the recompile limit and runs the rest eagerly.
    model.config.use_cache = False
    return model, tokenizer


def right_padded(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer with a pad token (EOS, else UNK, where it has none) and right padding."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask), each of shape (batch, longest row)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def length_batches(
    lengths: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """Row indices shortest first (equal lengths keep their order), cut into batches of `batch_size`.

    Batches of similar lengths carry little padding, and on a CPU a pad token costs a real one's
    compute. `rank`/`world_size` keep every `world_size`-th index of the sorted order from `rank`
    (a DDP rank's share) before cutting.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)[rank::world_size]
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


Outputs = TypeVar("Outputs", torch.Tensor, tuple[torch.Tensor | None, ...])


def run_by_length(
    rows: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    forward: Callable[[torch.Tensor, torch.Tensor], Outputs],
) -> Outputs:
    """`forward(input_ids, attention_mask)` over `rows` in `length_batches`, each batch right-padded
    (`pad`), and its outputs put back in the rows' order: row i of the result is `rows[i]`'s.

    `forward` returns a tensor, or a tuple of tensors (or None, which stays None), each with a
    first dimension of the batch; the results are gathered on the CPU. Needs at least one row.
    """
    single = None
    gathered: list[torch.Tensor | None] = []
    for idx in length_batches([len(r) for r in rows], batch_size):
        got = forward(*pad([list(rows[i]) for i in idx], pad_id))
        single = isinstance(got, torch.Tensor) if single is None else single
        parts = (got,) if single else got
        if not gathered:
            gathered = [
                None if p is None else torch.empty((len(rows), *p.shape[1:]), dtype=p.dtype) for p in parts
            ]
        for out, part in zip(gathered, parts, strict=True):
            if out is not None:
                out[idx] = part.cpu()
    if single is None:
        raise ValueError("run_by_length needs at least one row.")
    return gathered[0] if single else tuple(gathered)
