"""Packing: a padded batch's texts laid side by side in as few rows as fit, none of them padded.

First-fit, longest first, into rows as wide as the longest text; each text's position ids start
at 0, which is how a packed text is told apart from its neighbours: transformers reads restarting
position ids as packed sequences (llm_lightning.measure.padding_free), and the runtime exports
build their block mask from them (llm_lightning.runtimes.inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (rows, width): texts side by side, the rest of a row is padding
    position_ids: torch.Tensor  # (rows, width): 0, 1, ... for each text, and for each row's padding
    rows: torch.Tensor  # (texts,): the row of each text's last token, in the batch's order
    cols: torch.Tensor  # (texts,): its column


def pack_batch(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, always: bool = False
) -> PackedBatch | None:
    """The texts of a padded batch (right- or left-padded) packed into fewer rows, or None when
    they would need as many rows as there are texts (equal lengths) or a text is empty.
    `always`: packed even where that saves no row (a graph that takes only packed rows)."""
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1).tolist()
    if min(lengths) == 0 or (len(lengths) < 2 and not always):
        return None
    width = max(lengths)
    rows: list[list[int]] = []  # the texts in each row
    room: list[int] = []  # free columns left in each row
    for text in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[text]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(text)
        room[row] -= lengths[text]
    if len(rows) == len(lengths) and not always:
        return None
    ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    positions = torch.empty((len(rows), width), dtype=torch.long, device=input_ids.device)
    last_row = torch.empty(len(lengths), dtype=torch.long, device=input_ids.device)
    last_col = torch.empty_like(last_row)
    count = torch.arange(width, device=input_ids.device)
    for r, texts in enumerate(rows):
        at = 0
        for text in texts:
            n = lengths[text]
            ids[r, at : at + n] = input_ids[text][keep[text]]
            positions[r, at : at + n] = count[:n]
            last_row[text], last_col[text] = r, at + n - 1
            at += n
        positions[r, at:] = count[: width - at]  # the row's padding: a sequence of its own
    return PackedBatch(ids, positions, last_row, last_col)
