"""Tokenize once, pad per batch, and group training texts of similar length.

Rotten Tomatoes sentences are 24 tokens at the median and 68 at most: random batches pad
everything to the longest, and on a CPU every pad token costs a full token's compute.
Batches drawn from length-sorted windows cut the padded tokens by about half.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from llm_lightning.data.batching import length_batches, pad
from llm_lightning.data.resumable import ResumableLoader
from llm_lightning.data.tasks import Split, TaskData


class TokenizedSplit(Dataset):
    def __init__(self, split: Split, tokenizer, max_length: int):
        enc = tokenizer(split.texts, truncation=True, max_length=max_length, add_special_tokens=True)
        self.input_ids: list[list[int]] = enc["input_ids"]
        self.labels = split.labels
        self.texts = split.texts

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "label": self.labels[i], "index": i}

    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar-length texts: shuffle, cut into windows of `window` batches,
    sort each window by length, batch it, and shuffle the batches. Seeded per epoch. (Not
    `length_batches`, which sorts a whole split: training batches must stay random.)

    Under DDP the batches are built at the global size (`batch_size` x `world_size`) and each
    rank takes every `world_size`-th example of each: the ranks never share an example, and one
    step trains on the same examples as a single process with the global batch would.
    """

    def __init__(
        self,
        lengths: list[int],
        batch_size: int,
        seed: int,
        window: int = 50,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lengths, self.batch_size, self.seed, self.window = lengths, batch_size, seed, window
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.world_size  # the global batch
        span = size * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start : start + span], key=self.lengths.__getitem__)
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        rng.shuffle(batches)
        # A last batch smaller than the world would leave a rank without examples: DDP needs every
        # rank to take the same number of steps, so it is dropped.
        return [b[self.rank :: self.world_size] for b in batches if len(b) >= self.world_size]

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start the next pass over `epoch` after its first `batches_done` batches (exact resume)."""
        self._resume = (epoch, batches_done)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        if self._resume is not None:
            epoch, done = self._resume
            self._resume = None
            if epoch == self.epoch:
                batches = batches[done:]
        return iter(batches)

    def __len__(self) -> int:
        size = self.batch_size * self.world_size
        n, rest = -(-len(self.lengths) // size), len(self.lengths) % size
        return n - 1 if 0 < rest < self.world_size else n


def collate(pad_id: int):
    def fn(items: list[dict]) -> dict[str, torch.Tensor]:
        # right padding: the classifier pools the last real token
        ids, mask = pad([x["input_ids"] for x in items], pad_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([x["label"] for x in items]),
            "index": torch.tensor([x["index"] for x in items]),
        }

    return fn


class ClassificationDataModule(L.LightningDataModule):
    def __init__(
        self,
        data: TaskData,
        tokenizer,
        max_length: int,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        group_by_length: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        self.data, self.tokenizer = data, tokenizer
        self.max_length, self.batch_size, self.eval_batch_size = max_length, batch_size, eval_batch_size
        self.seed, self.group_by_length, self.num_workers = seed, group_by_length, num_workers
        self.splits: dict[str, TokenizedSplit] = {}
        self._sampler: LengthGroupedBatches | None = None

    @property
    def label_names(self) -> list[str]:
        return self.data.label_names

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            for name in ("train", "val", "test"):
                self.splits[name] = TokenizedSplit(getattr(self.data, name), self.tokenizer, self.max_length)

    def _loader(
        self, split: TokenizedSplit, loader_cls: type[DataLoader] = DataLoader, **kwargs
    ) -> DataLoader:
        return loader_cls(
            split, collate_fn=collate(self.tokenizer.pad_token_id), num_workers=self.num_workers, **kwargs
        )

    def _train_position(self) -> int:
        """Batches of the current epoch the fit loop has taken; checkpoints keep it for exact resume."""
        return (
            self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer is not None else 0
        )

    def _train_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        split = self.splits["train"]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if self.group_by_length:
            self._sampler = LengthGroupedBatches(
                split.lengths(), self.batch_size, self.seed, rank=rank, world_size=world
            )
            if trainer is not None:
                self._sampler.set_epoch(trainer.current_epoch)
            return self._loader(
                split,
                ResumableLoader,
                batch_sampler=self._sampler,
                position=self._train_position,
                epoch=self._train_epoch,
            )
        if world > 1:  # trainer.use_distributed_sampler is off (for the grouped sampler): shard here
            sampler = DistributedSampler(split, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
            return self._loader(split, batch_size=self.batch_size, sampler=sampler)
        gen = torch.Generator().manual_seed(self.seed)
        return self._loader(split, batch_size=self.batch_size, shuffle=True, generator=gen, drop_last=False)

    def eval_loader(self, name: str) -> DataLoader:
        """Evaluation batches sorted by length (order does not change the metrics, padding does).

        Under DDP each rank evaluates every `world_size`-th example (the metrics sync across ranks).
        """
        split = self.splits[name]
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = length_batches(split.lengths(), self.eval_batch_size, rank, world)
        return self._loader(split, batch_sampler=batches)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")
