"""Padding-free batches (llm_lightning.measure.padding_free): the same logits as padded batches, fewer rows."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, LlamaConfig

from llm_lightning.data.packing import ATTENTION_SLOWDOWN, cheapest_rows, pack_batch, pair_cost
from llm_lightning.measure.bench import BenchSettings, measure, token_counts
from llm_lightning.measure.padding_free import PaddingFree, padding_free
from llm_lightning.quantization.torchao_path import quantize_model
from tests.test_llama3_shapes import ROPE

# lengths from 2 to 40 bytes: a batch that packs into fewer rows than texts
TEXTS = [
    "a dull film",
    "ok",
    "a gorgeous, moving and very funny film about friendship and loss",
    "bad",
] * 2 + [
    "it was fine, I guess",
    "the actors are wonderful but the story drags on",
]


def padded(tokenizer, texts, side: str = "right"):
    tokenizer.padding_side = side
    try:
        enc = tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "right"
    return enc["input_ids"], enc["attention_mask"]


def logits(model, ids, mask) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_padding_free_logits_are_the_padded_logits(tiny, attention):
    model, tokenizer = tiny
    model = copy.deepcopy(model)
    model.set_attn_implementation(attention)
    ids, mask = padded(tokenizer, TEXTS)
    packed = pack_batch(ids, mask, tokenizer.pad_token_id)
    assert packed is not None and packed.input_ids.shape[0] < len(TEXTS)
    assert packed.input_ids.numel() < mask.numel()  # fewer tokens computed
    wrapped = padding_free(model, tokenizer.pad_token_id)
    assert isinstance(wrapped, PaddingFree)  # else the comparison below would be of the model with itself
    torch.testing.assert_close(
        logits(wrapped, ids, mask),
        logits(model, ids, mask),
        atol=1e-5,
        rtol=1e-5,
    )


def test_left_padded_batches_give_the_same_logits(tiny):
    model, tokenizer = tiny
    right, left = padded(tokenizer, TEXTS), padded(tokenizer, TEXTS, side="left")
    assert not torch.equal(right[0], left[0])
    torch.testing.assert_close(
        logits(PaddingFree(model, tokenizer.pad_token_id), *left), logits(model, *right), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("cost", [None, 1e-4])
def test_each_text_sits_whole_in_one_row_with_its_own_positions(tiny, cost):
    _, tokenizer = tiny
    ids, mask = padded(tokenizer, TEXTS)
    packed = pack_batch(ids, mask, tokenizer.pad_token_id, pair_cost=cost)
    if cost is None:
        assert packed.input_ids.shape[1] == mask.shape[1]  # rows as wide as the longest text
    else:
        assert packed.input_ids.shape[1] > mask.shape[1]  # wider: the cheaper rows for this cost
    for text, (row, col) in enumerate(zip(packed.rows.tolist(), packed.cols.tolist(), strict=True)):
        n = int(mask[text].sum())
        start = col - n + 1
        assert torch.equal(packed.input_ids[row, start : col + 1], ids[text, :n])
        assert packed.position_ids[row, start : col + 1].tolist() == list(range(n))
    cells = {
        (r, c - i)
        for t, (r, c) in enumerate(zip(packed.rows.tolist(), packed.cols.tolist(), strict=True))
        for i in range(int(mask[t].sum()))
    }
    assert len(cells) == int(mask.sum())  # no two texts share a cell


def test_rows_of_the_cheapest_width_hold_more_texts():
    # lengths 10, 6, 6, 6: as wide as the longest, no two 6s share a row (4 rows, 40 slots); 16 wide,
    # two rows hold them all (32 slots) for more attention pairs (2 x 16^2 against 4 x 10^2)
    assert cheapest_rows([10, 6, 6, 6], None) == (10, [[0], [1], [2], [3]])
    assert cheapest_rows([10, 6, 6, 6], 0.01) == (16, [[0, 1], [2, 3]])
    assert cheapest_rows([10, 6, 6, 6], 1.0)[0] == 10  # attention dear: the narrow rows win
    assert cheapest_rows([5, 4], 0.0) == (9, [[0, 1]])  # never wider than all the texts together


def test_wider_rows_compute_fewer_slots_and_the_padded_logits(tiny):
    model, tokenizer = tiny
    ids, mask = padded(tokenizer, TEXTS)
    narrow = pack_batch(ids, mask, tokenizer.pad_token_id)
    wide = pack_batch(ids, mask, tokenizer.pad_token_id, pair_cost=1e-4)
    assert wide.input_ids.numel() < narrow.input_ids.numel()
    wrapped = PaddingFree(model, tokenizer.pad_token_id)
    wrapped.pair_cost = 1e-4
    torch.testing.assert_close(logits(wrapped, ids, mask), logits(model, ids, mask), atol=1e-5, rtol=1e-5)


def test_pair_cost_reads_a_llama3_shaped_config():
    # Llama-3-shaped: GQA (32 heads, 8 KV heads) and an explicit head_dim, here wider than
    # hidden / heads so that reading it matters: q and o 2048 x 4096, k and v 2048 x 1024
    config = LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_scaling=ROPE,
    )
    linear = 2048 * 128 * (2 * 32 + 2 * 8) + 3 * 2048 * 8192
    assert pair_cost(config) == pytest.approx(ATTENTION_SLOWDOWN * 2 * 32 * 128 / linear)
    assert pair_cost(GPT2Config()) is None  # another shape: rows stay as wide as the longest text


def test_batches_that_cannot_pack_run_as_they_are(tiny):
    model, tokenizer = tiny
    same = padded(tokenizer, ["abcd", "efgh", "ijkl"])  # equal lengths: as many rows as texts
    assert pack_batch(*same, tokenizer.pad_token_id) is None
    one = padded(tokenizer, ["a single text"])
    assert pack_batch(*one, tokenizer.pad_token_id) is None
    wrapped = PaddingFree(model, tokenizer.pad_token_id)
    torch.testing.assert_close(logits(wrapped, *same), logits(model, *same))


def test_models_without_a_decoder_and_score_head_stay_padded(tiny):
    model, tokenizer = tiny
    other = nn.Linear(4, 2)
    assert padding_free(other, 0) is other
    own_masking = nn.Module()  # a decoder and a head, but attention masked by code of its own
    own_masking.model, own_masking.score = nn.Module(), nn.Linear(4, 2)
    own_masking.model.layers = nn.ModuleList([nn.Linear(4, 4)])
    assert padding_free(own_masking, 0) is own_masking
    assert padding_free(model, None) is model  # no pad token
    compiled = torch.compile(model)  # whole: packing through `.model` would skip the compiled code
    assert padding_free(compiled, tokenizer.pad_token_id) is compiled
    wrapped = padding_free(model, tokenizer.pad_token_id)
    assert isinstance(wrapped, PaddingFree) and padding_free(wrapped, tokenizer.pad_token_id) is wrapped


def test_int8_model_packed_stays_within_its_quantization_error(tiny):
    model, tokenizer = tiny
    int8 = quantize_model(copy.deepcopy(model), "int8_dynamic", activations="asymmetric")
    ids, mask = padded(tokenizer, TEXTS)
    reference = logits(model, ids, mask)
    error = (logits(int8, ids, mask) - reference).abs().max()
    packed = padding_free(int8, tokenizer.pad_token_id)
    assert isinstance(packed, PaddingFree)
    packed_error = (logits(packed, ids, mask) - reference).abs().max()
    assert packed_error <= 1.5 * error + 1e-4


def test_bench_reports_whether_batches_ran_padding_free(tiny):
    model, tokenizer = tiny
    settings = {"batch_sizes": (4,), "throughput_texts": 8, "latency_texts": 2, "repeats": 1}
    on = measure(model, tokenizer, TEXTS, [0, 1] * 5, BenchSettings(**settings, padding_free=True))
    off = measure(model, tokenizer, TEXTS, [0, 1] * 5, BenchSettings(**settings, padding_free=False))
    assert on["padding_free"] is True and off["padding_free"] is False
    assert on["acc"] == off["acc"]


def test_token_counts_count_the_padding_a_batch_adds():
    assert token_counts([[1, 2, 3], [4], [5, 6], [7, 8]], 2) == (8, 10)  # (3+3) + (2+2) computed
