"""benchmarks/int8_profile.py finds the int8 matmuls and inductor's kernels in a real profile."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

from int8_profile import PARTS, measure  # noqa: E402  (benchmarks/int8_profile.py)

from llm_lightning.measure.compiling import maybe_compile  # noqa: E402
from llm_lightning.measure.padding_free import padding_free  # noqa: E402
from tests.test_fused_projections import int8  # noqa: E402


def test_the_split_finds_each_part_of_a_compiled_int8_forward(tiny):
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # graphs other tests compiled for the same layer class have no kernel names
    model, tokenizer = tiny
    quantized = maybe_compile(int8(copy.deepcopy(model), tokenizer, True), True)
    packed = padding_free(quantized, tokenizer.pad_token_id)
    texts = ["what a film", "boring", "I laughed, I cried", "no"] * 4
    rows = tokenizer(texts)["input_ids"]
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):  # as the script sets it
        got = measure(packed, rows, tokenizer.pad_token_id, passes=1)
    seconds = got["seconds"]
    assert got["tokens"] == sum(len(r) for r in rows) and got["tok_s"] > 0 and got["rate"] > 0
    # each named part was seen, and together they fit in the profiled pass's wall time (no event
    # counted twice, as a kernel's time would be if its caller's total were added too)
    assert all(seconds[part] > 0 for part in PARTS[:3]), seconds
    assert sum(seconds[part] for part in PARTS[:3]) <= got["profiled_s"]
