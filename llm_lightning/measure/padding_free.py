"""Padding-free batches: a batch's texts packed into as few rows as fit, none of them padded.

A batch of texts is padded to its longest text; at batch 16 on Rotten Tomatoes test texts in
their given order, 45% of the tokens are padding (3,189 real tokens in 5,808), and a model spends
as long on a padding token as on a real one. Here the texts are packed (llm_lightning.data.packing:
first-fit, longest first, into rows of the cheapest width, each text with position ids from 0),
and transformers (5.24 here) reads restarting position ids as packed sequences and masks
attention to stay inside each text (`masking_utils.find_packed_sequence_indices`), so every text
is computed as if alone. Each text's class comes from its own last token, as
`*ForSequenceClassification` pools it.

Ratios measured in docs/BENCHMARKS.md, "Padding-free batches".
"""

from __future__ import annotations

import logging
import sys

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from llm_lightning.data.packing import pack_batch, pair_cost

log = logging.getLogger(__name__)


class PaddingFree(nn.Module):
    """Wraps a `*ForSequenceClassification` decoder (`.model` then `.score`, like Llama's): called
    like the model, it returns the same logits, computed on packed rows."""

    def __init__(self, model: nn.Module, pad_id: int):
        super().__init__()
        self.classifier = model
        self.pad_id = int(pad_id)
        self.config = model.config
        self.pair_cost = pair_cost(model.config)  # rows of the cheapest width

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        packed = (
            None
            if attention_mask is None or kwargs
            else pack_batch(input_ids, attention_mask, self.pad_id, pair_cost=self.pair_cost)
        )
        if packed is None:
            return self.classifier(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # no attention mask: position ids that restart are how transformers tells packed texts apart
        hidden = self.classifier.model(input_ids=packed.input_ids, position_ids=packed.position_ids)
        last = hidden.last_hidden_state[packed.rows, packed.cols]
        return SequenceClassifierOutputWithPast(logits=self.classifier.score(last))


def can_pack(model: nn.Module) -> bool:
    """True for decoder classifiers built as transformers builds Llama's: a base `.model` whose
    forward takes position ids and masks attention with transformers' `create_causal_mask`, and a
    `.score` head on its last hidden states. Not a model torch.compile'd whole: its `.model` is
    the uncompiled one, and packing would bypass the compile."""
    if hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
        return False
    if not all(isinstance(getattr(model, part, None), nn.Module) for part in ("model", "score")):
        return False
    # packed texts are kept apart only by transformers' mask builder; a decoder that masks
    # attention its own way (remote code, older designs) would let them attend to each other
    decoder_module = sys.modules.get(type(model.model).__module__)
    return isinstance(getattr(model.model, "layers", None), nn.ModuleList) and hasattr(
        decoder_module, "create_causal_mask"
    )


def padding_free(model: nn.Module, pad_id: int | None) -> nn.Module:
    """`model` wrapped to run its batches padding-free, or `model` itself where it cannot be
    (another architecture, no pad token): then batches stay padded, and the log says so."""
    if isinstance(model, PaddingFree) or getattr(model, "packs_batches", False):
        return model  # packed already, or packs its own batches (a runtime folder's packed graph)
    if pad_id is None or not can_pack(model):
        log.info(
            "Batches stay padded: %s is not a transformers decoder classifier to pack for "
            "(`.model.layers` masked by `create_causal_mask`, `.score`), or has no pad token",
            type(model).__name__,
        )
        return model
    return PaddingFree(model, pad_id)
