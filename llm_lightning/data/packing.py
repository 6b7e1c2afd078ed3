"""Packing: a padded batch's texts laid side by side in as few rows as fit, none of them padded.

First-fit, longest first; each text's position ids start at 0, which is how a packed text is told
apart from its neighbours: transformers reads restarting position ids as packed sequences
(llm_lightning.measure.padding_free), and the runtime exports build their block mask from them
(llm_lightning.runtimes.inputs).

How wide a row is: as wide as the longest text, or, given `pair_cost`, the width that costs least.
A row's attention is computed over all its `width x width` pairs of tokens (the block mask hides
the pairs across texts, it does not skip them), so wider rows fill better but attend more: the
width chosen minimises `rows x width x (1 + pair_cost x width)`, the linear maps' work on every
token of every row plus attention's on every pair. At batch 16 on 128 Rotten Tomatoes test texts
in their given order, rows as wide as the longest text are 88% real tokens, the cheapest width's
97%, which ran 1.09x faster in an OpenVINO int8 export and 1.08x in torch fp32 (docs/BENCHMARKS.md,
"Packed row width").
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


# Attention's time per pair against its multiply-add count, next to the linear maps' time per weight:
# benchmarks/packing_width.py fitted 0.7x on an OpenVINO int8 export and 1.1x on torch fp32 (AVX2,
# docs/BENCHMARKS.md "Packed row width"). Where int8 matmuls run faster (VNNI, AMX) attention's
# share grows: rerun that benchmark there before trusting 1.
ATTENTION_SLOWDOWN = 1.0
WIDTHS = 16  # widths tried between the longest text and twice it: a grid, not every width


def pair_cost(config) -> float | None:
    """What one attention pair costs against one token's pass through a layer's linear maps, for a
    Llama-shaped transformers config (`num_attention_heads`, `num_key_value_heads`, `head_dim`,
    `intermediate_size`); None for another shape, whose rows then stay as wide as the longest text.
    A pair is two multiply-adds per head and head dimension (query x key, weight x value); a token
    is one per weight of q, k, v, o and the three MLP maps."""
    try:
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        mlp = int(config.intermediate_size)
    except (AttributeError, TypeError):
        return None
    linear = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * mlp
    return ATTENTION_SLOWDOWN * 2 * heads * head_dim / linear


def fill(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit, longest first: the texts (indices into `lengths`) of each row of `width`."""
    rows: list[list[int]] = []
    room: list[int] = []  # free columns left in each row
    for text in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[text]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(text)
        room[row] -= lengths[text]
    return rows


def cheapest_rows(lengths: list[int], pair_cost: float | None) -> tuple[int, list[list[int]]]:
    """(width, rows): rows as wide as the longest text, or the cheapest width of a grid from the
    longest text to twice it (see the module's docstring)."""
    longest = max(lengths)
    if pair_cost is None:
        return longest, fill(lengths, longest)
    widest = min(2 * longest, sum(lengths))
    widths = sorted({min(widest, longest + step * longest // WIDTHS) for step in range(WIDTHS + 1)})
    packings = [(width, fill(lengths, width)) for width in widths]
    return min(packings, key=lambda p: len(p[1]) * p[0] * (1 + pair_cost * p[0]))


def pack_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_id: int,
    always: bool = False,
    pair_cost: float | None = None,
) -> PackedBatch | None:
    """The texts of a padded batch (right- or left-padded) packed into fewer rows, or None when
    they would need as many rows as there are texts (equal lengths) or a text is empty.
    `always`: packed even where that saves no row (a graph that takes only packed rows).
    `pair_cost` (see `pair_cost()`): rows of the cheapest width; None: as wide as the longest text."""
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1).tolist()
    if min(lengths) == 0 or (len(lengths) < 2 and not always):
        return None
    width, rows = cheapest_rows(lengths, pair_cost)
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
