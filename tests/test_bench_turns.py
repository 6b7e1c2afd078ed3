"""Timing several models in turns (bench.interleaved_throughput), and the classifier's KV cache
being off (a cache-filling forward is slower and makes torch.compile recompile per layer)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from llm_lightning.measure.bench import interleaved_throughput, rates_in_turns


class Recorder(nn.Module):
    """Wraps a classifier and appends its name to a shared log on every forward."""

    def __init__(self, model: nn.Module, name: str, log: list[str]):
        super().__init__()
        self.model, self.name, self.log = model, name, log

    def forward(self, **kwargs):
        self.log.append(self.name)
        return self.model(**kwargs)


TEXTS = ["a fine film", "dull", "one of the best films of the year, moving and funny", "bad"] * 5


def test_models_take_turns_and_every_one_is_reported(tiny):
    model, tokenizer = tiny
    log: list[str] = []
    models = {"a": Recorder(model, "a", log), "b": Recorder(model, "b", log)}
    speeds = interleaved_throughput(models, tokenizer, TEXTS, batch_size=8, rounds=3)
    assert set(speeds) == {"a", "a_min", "a_max", "b", "b_min", "b_max"}
    assert all(0 < speeds[f"{n}_min"] <= speeds[n] <= speeds[f"{n}_max"] for n in models)
    batches = 3  # 20 texts in batches of 8; every batch goes through both models before the next
    assert log == ["a", "b"] * batches * 3


def test_each_round_is_reported_and_a_stalled_round_is_the_slowest(tiny):
    """A model that stalls in its second round only: that round is its slowest, by at least the
    stall, so min/max over rounds show what a median alone hides."""
    model, tokenizer = tiny
    calls = {"n": 0}

    class StallsInRoundTwo(nn.Module):
        def forward(self, **kwargs):
            calls["n"] += 1
            if calls["n"] in (4, 5, 6):  # 3 batches per round: round 2 is calls 4-6
                time.sleep(0.5)
            return model(**kwargs)

    with torch.inference_mode():  # warm up, as callers do: a cold first round is slow by itself
        model(**tokenizer(TEXTS[:8], padding=True, return_tensors="pt"))
    rates = rates_in_turns({"m": StallsInRoundTwo()}, tokenizer, TEXTS, batch_size=8, rounds=3)
    assert list(rates) == ["m"] and len(rates["m"]) == 3
    assert rates["m"][1] == min(rates["m"])
    tokens = sum(len(ids) for ids in tokenizer(TEXTS)["input_ids"])  # real tokens of one round
    assert rates["m"][1] <= tokens / 1.5  # the stalled round took at least 3 x 0.5 s


def test_names_that_collide_with_the_spread_keys_are_refused(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="collide"):
        interleaved_throughput({"a": model, "a_min": model}, tokenizer, TEXTS[:4], batch_size=4, rounds=1)


def test_by_length_sorts_texts_so_batches_pad_less(tiny):
    model, tokenizer = tiny
    shapes: list[tuple[int, int]] = []

    class Shapes(nn.Module):
        def forward(self, input_ids, attention_mask):
            shapes.append(tuple(input_ids.shape))
            return model(input_ids=input_ids, attention_mask=attention_mask)

    interleaved_throughput({"m": Shapes()}, tokenizer, TEXTS, batch_size=5, rounds=1)
    in_order = sum(b * w for b, w in shapes)
    shapes.clear()
    interleaved_throughput({"m": Shapes()}, tokenizer, TEXTS, batch_size=5, rounds=1, by_length=True)
    assert sum(b * w for b, w in shapes) < in_order


def test_loaded_classifiers_do_not_fill_a_kv_cache(tiny):
    model, tokenizer = tiny
    assert model.config.use_cache is False
    ids = tokenizer(["a fine film"], return_tensors="pt")
    with torch.inference_mode():
        out = model(**ids)
    assert getattr(out, "past_key_values", None) is None


def test_exported_model_loads_without_kv_cache(tiny, tmp_path):
    from llm_lightning.models import load_exported

    model, tokenizer = tiny
    model.config.use_cache = True  # as a checkpoint written before this change would have it
    try:
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
    finally:
        model.config.use_cache = False
    loaded, _ = load_exported(tmp_path)
    assert loaded.config.use_cache is False


def test_each_turn_starts_after_a_pause_for_the_previous_models_threads(tiny, monkeypatch):
    """The previous runtime's spinning threads must settle before the next model's clock starts:
    every timed call is preceded by an untimed SETTLE_S pause, never counted in the rate."""
    from llm_lightning.measure import bench

    model, tokenizer = tiny
    events: list[str] = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(f"sleep {s}"))
    models = {"a": Recorder(model, "a", events), "b": Recorder(model, "b", events)}
    rates_in_turns(models, tokenizer, TEXTS, batch_size=8, rounds=1)
    assert events == [f"sleep {bench.SETTLE_S}", "a", f"sleep {bench.SETTLE_S}", "b"] * 3
