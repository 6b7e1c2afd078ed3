"""The once-per-process probe that tells oneDNN's real int8 kernels from its reference one
(llm_lightning.quantization.onednn_int8.packed_matmul_is_fast)."""

from __future__ import annotations

import time

import pytest
import torch


def test_a_packed_linear_much_slower_than_int_mm_is_not_used(monkeypatch):
    """On an AVX-512 VNNI CPU without AMX oneDNN ran the packed linear in its scalar reference
    kernel, thousands of times slower than torch._int_mm: the speed probe must turn it down."""
    from llm_lightning.quantization import onednn_int8

    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    real = onednn_int8.int8_linear_packed
    # the reference kernel was 3,021x slower than torch._int_mm on that CPU; here 20x this machine's
    # own _int_mm time for the probe's shape (0.1 ms on AVX-512 VNNI, 25 ms on AVX2 alone)
    q = torch.randint(-127, 128, (32, 576), dtype=torch.int8)
    w = torch.randint(-127, 128, (576, 1536), dtype=torch.int8)
    took = onednn_int8.best_of_three(lambda: torch._int_mm(q, w))

    def reference_speed(*args):
        time.sleep(20 * took)
        return real(*args)

    monkeypatch.setattr(onednn_int8, "int8_linear_packed", reference_speed)
    assert onednn_int8.packed_matmul_is_fast.__wrapped__() is False


def test_the_speed_probe_stops_timing_a_kernel_once_one_call_is_past_its_limit():
    """A reference kernel took 0.3 s a probe call on EPYC-512: the probe pays the warm-up and one
    timed call for it, not four calls, and still times three calls of a fast kernel."""
    from llm_lightning.quantization.onednn_int8 import best_of_three

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    assert best_of_three(slow, give_up_after=0.01) >= 0.02
    assert len(calls) == 2
    calls.clear()
    best_of_three(slow, give_up_after=1.0)
    assert len(calls) == 4
