"""What an exported graph is fed: padded rows with an attention mask, or packed rows.

`quantize.inputs=padded` exports `(input_ids, attention_mask) -> logits`, the interface every
peer tool feeds. `packed` (the default) exports `(input_ids, position_ids, last) -> logits`: our
padding-free batching (llm_lightning.data.packing) inside the exported graph, so that OpenVINO and
ONNX Runtime compute no padding token either.
- `input_ids`, `position_ids`: (rows, width), several texts side by side in a row, each text's
  position ids counting from 0;
- `last`: (texts,), the flat index `row * width + column` of each text's last token, whose hidden
  state the score head reads, as `*ForSequenceClassification` pools it.
The graph builds its block mask from the position ids (a text starts where its position id is 0;
a token sees the earlier tokens of its own text), so each text is computed as if alone. A padded
batch is a packed one of one text a row, so the same graph takes either.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from llm_lightning.data.packing import pack_batch
from llm_lightning.errors import UserError

INPUTS = ("packed", "padded")
NAMES = {"padded": ("input_ids", "attention_mask"), "packed": ("input_ids", "position_ids", "last")}


@dataclass(frozen=True)
class ExportInputs:
    """What an exporter needs besides the model: which graph, inputs to trace it with, and the
    tokenized training texts int8 calibrates on (empty for fp32 and bf16)."""

    inputs: str
    example: tuple[torch.Tensor, ...]
    calibration: list[list[int]]


class Traceable(nn.Module):
    """`(input_ids, attention_mask) -> logits`: the padded graph."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class PackedTraceable(nn.Module):
    """`(input_ids, position_ids, last) -> logits`: the packed graph, for a decoder classifier
    built as transformers builds Llama's (a base `.model`, a `.score` head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not all(isinstance(getattr(model, part, None), nn.Module) for part in ("model", "score")):
            raise UserError(
                f"quantize.inputs=packed needs a decoder classifier with `.model` and `.score` "
                f"(transformers' *ForSequenceClassification); {type(model).__name__} has not: "
                "use quantize.inputs=padded."
            )
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, last: torch.Tensor
    ) -> torch.Tensor:
        text = (position_ids == 0).cumsum(-1)  # which text of its row each token belongs to
        col = torch.arange(input_ids.shape[1], device=input_ids.device)
        keep = (text.unsqueeze(-1) == text.unsqueeze(-2)) & (col.unsqueeze(0) <= col.unsqueeze(1))
        dtype = self.model.score.weight.dtype
        # a 4D mask is taken as it is (transformers builds none); the additive form eager attention adds
        mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
        hidden = self.model.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=mask.unsqueeze(1)
        ).last_hidden_state
        # the head scores every token, then each text's last is taken, as transformers' classifier
        # does: int8 calibrates the head's input on the same tokens as the padded graph's
        return self.model.score(hidden).flatten(0, 1)[last]


def graph(model: nn.Module, inputs: str) -> nn.Module:
    """The module both exporters trace for `inputs`."""
    if inputs not in INPUTS:
        raise UserError(f"quantize.inputs={inputs!r} is not one of {INPUTS}.")
    return (PackedTraceable if inputs == "packed" else Traceable)(model).eval()


def dynamic_shapes(inputs: str) -> dict:
    """torch.export's dynamic axes of each graph input."""
    if inputs == "padded":
        batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
        return {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    rows, width, texts = torch.export.Dim("rows"), torch.export.Dim("width"), torch.export.Dim("texts")
    return {"input_ids": {0: rows, 1: width}, "position_ids": {0: rows, 1: width}, "last": {0: texts}}


def feed(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    inputs: str,
    pad_id: int,
    pair_cost: float | None = None,
) -> dict[str, np.ndarray]:
    """A padded batch (numpy, right- or left-padded) as the graph's named inputs; packed rows are
    of the cheapest width for `pair_cost` (llm_lightning.data.packing), or the longest text's."""
    input_ids, attention_mask = np.asarray(input_ids, np.int64), np.asarray(attention_mask, np.int64)
    if inputs == "padded":
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    mask = attention_mask.copy()
    mask[mask.sum(axis=1) == 0, 0] = (
        1  # an empty text: its one pad token stands in, as padded batches pool it
    )
    packed = pack_batch(
        torch.from_numpy(input_ids), torch.from_numpy(mask), pad_id, always=True, pair_cost=pair_cost
    )
    width = packed.input_ids.shape[1]
    return {
        "input_ids": packed.input_ids.numpy(),
        "position_ids": packed.position_ids.numpy(),
        "last": (packed.rows * width + packed.cols).numpy(),
    }


def split_rows(
    fed: dict[str, np.ndarray], inputs: str, parts: int
) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """The graph's inputs cut by rows into at most `parts` pieces of whole rows, each with the
    indices of its texts in `fed`'s order: row i of a piece's logits is text `indices[i]`'s. A packed
    row's texts stay together, and `last` is counted from the piece's first row."""
    rows = fed["input_ids"].shape[0]
    cuts = [c for c in np.array_split(np.arange(rows), min(parts, rows)) if len(c)]
    if inputs == "padded":
        return [({name: value[c[0] : c[-1] + 1] for name, value in fed.items()}, c) for c in cuts]
    width = fed["input_ids"].shape[1]
    row_of = fed["last"] // width
    pieces = []
    for c in cuts:
        start, stop = int(c[0]), int(c[-1]) + 1
        texts = np.flatnonzero((row_of >= start) & (row_of < stop))
        piece = {
            "input_ids": fed["input_ids"][start:stop],
            "position_ids": fed["position_ids"][start:stop],
            "last": fed["last"][texts] - start * width,
        }
        pieces.append((piece, texts))
    return pieces


def one_text(row: list[int], inputs: str, pad_id: int) -> dict[str, np.ndarray]:
    """One tokenized text as the graph's inputs: what calibration runs."""
    ids = np.array([row], dtype=np.int64)
    return feed(ids, np.ones_like(ids), inputs, pad_id)


def example_inputs(tokenizer, texts: list[str], max_length: int, inputs: str) -> tuple[torch.Tensor, ...]:
    """Example inputs to trace: a right-padded batch of two rows of different lengths (the shortest
    and longest of `texts`), packed for the packed graph, so the trace sees padding and keeps every
    axis dynamic."""
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    by_length = {len(r): text for r, text in zip(rows, texts, strict=True)}
    if len(by_length) < 2:
        raise ValueError("example_inputs needs two texts of different token lengths")
    two = [by_length[min(by_length)], by_length[max(by_length)]]
    enc = tokenizer(two, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    fed = feed(enc["input_ids"].numpy(), enc["attention_mask"].numpy(), inputs, tokenizer.pad_token_id)
    return tuple(torch.from_numpy(fed[name]) for name in NAMES[inputs])
