"""llm_lightning.data.batching: rows ordered by length, cut into batches, padded, and each row's
output put back at its own index."""

from __future__ import annotations

import pytest
import torch

from llm_lightning.data.batching import length_batches, pad, run_by_length

ROWS = [[5, 6, 7], [1], [2, 3], [4], [8, 9, 10, 11], [12, 13]]


def test_batches_go_shortest_first_and_ties_keep_their_order():
    assert length_batches([len(r) for r in ROWS], 2) == [[1, 3], [2, 5], [0, 4]]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_share_the_sorted_order_without_overlap(world):
    lengths = [len(r) for r in ROWS]
    shares = [length_batches(lengths, 2, rank, world) for rank in range(world)]
    taken = [i for share in shares for batch in share for i in batch]
    assert sorted(taken) == list(range(len(ROWS)))
    for rank, share in enumerate(shares):  # every world-th index of the sorted order, from the rank
        flat = [i for batch in share for i in batch]
        assert flat == [i for batch in length_batches(lengths, 2) for i in batch][rank::world]
        assert all(len(batch) <= 2 for batch in share)


def test_each_rows_output_comes_back_at_its_index():
    widths: list[int] = []

    def forward(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        widths.append(ids.shape[1])
        assert torch.equal(mask.sum(1), mask.sum(1).sort().values)  # sorted by length inside a batch
        return (ids * mask).sum(1) * 100 + mask.sum(1)  # the row's sum and its length

    got = run_by_length(ROWS, 4, pad_id=0, forward=forward)
    assert got.tolist() == [sum(r) * 100 + len(r) for r in ROWS]
    assert widths == [2, 4]  # each batch padded to its own longest row: 1,1,2,2 then 3,4


def test_tuple_outputs_come_back_as_a_tuple_and_none_stays_none():
    def forward(ids: torch.Tensor, mask: torch.Tensor):
        return ids[:, :1].float(), None, mask.sum(1, keepdim=True)

    first, nothing, lengths = run_by_length(ROWS, 3, pad_id=-1, forward=forward)
    assert nothing is None
    assert first.dtype == torch.float32 and first.squeeze(1).tolist() == [r[0] for r in ROWS]
    assert lengths.squeeze(1).tolist() == [len(r) for r in ROWS]


def test_the_padding_is_the_pad_helpers():
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    run_by_length(ROWS, 6, 99, lambda ids, mask: seen.append((ids, mask)) or ids[:, 0])
    order = length_batches([len(r) for r in ROWS], 6)[0]
    ids, mask = pad([ROWS[i] for i in order], 99)
    assert torch.equal(seen[0][0], ids) and torch.equal(seen[0][1], mask)


def test_no_rows_is_refused():
    with pytest.raises(ValueError, match="at least one row"):
        run_by_length([], 4, 0, lambda ids, mask: ids)


@pytest.mark.parametrize("world", [1, 2])
def test_eval_batches_are_the_sorted_split_shared_by_rank_and_padded(tmp_path, world):
    from types import SimpleNamespace

    from llm_lightning.data import ClassificationDataModule, load_task
    from llm_lightning.models import load_classifier
    from tests.conftest import make_cfg

    cfg = make_cfg(tmp_path)
    data = load_task(cfg.task, cfg.seed)
    _, tokenizer = load_classifier(cfg.model, data.label_names)
    dm = ClassificationDataModule(data, tokenizer, 64, 4, 8, cfg.seed)
    dm.setup()
    split = dm.splits["val"]
    for rank in range(world):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0)
        batches = list(dm.eval_loader("val"))
        # as eval_loader built them before length_batches: the whole split sorted, then every world-th
        order = sorted(range(len(split)), key=split.lengths().__getitem__)[rank::world]
        assert [b["index"].tolist() for b in batches] == [order[i : i + 8] for i in range(0, len(order), 8)]
        for b in batches:
            rows = [split.input_ids[i] for i in b["index"].tolist()]
            ids, mask = pad(rows, tokenizer.pad_token_id)
            assert torch.equal(b["input_ids"], ids) and torch.equal(b["attention_mask"], mask)
            assert b["labels"].tolist() == [split.labels[i] for i in b["index"].tolist()]
