"""CPU memory is counted exactly at the allocator: the same step measured twice in one
process gives the same peak, whatever was measured before, and the free of a block
allocated before a measurement counts."""
import gc

import pytest
import torch

import localprop as lp
from localprop import memory
from tests.conftest import SGD

pytestmark = pytest.mark.skipif(memory.cpu_counter() is None, reason="needs the C++ extension's counting allocator")


def test_a_free_of_an_older_block_counts():
    old = torch.empty(1 << 20)  # 4 MiB allocated before the measurement, e.g. last step's gradients
    with memory.track_peak("cpu") as peak:
        del old
        new = torch.empty(1000)  # 4000 bytes: still below where the block began
    assert peak.bytes == 0
    older = torch.empty(1000)
    with memory.track_peak("cpu") as peak:
        del older
        newer = torch.empty(3000)  # 12000 - 4000 above the start
    assert peak.bytes == 8000
    del new, newer


def step_peak(rule):
    torch.manual_seed(0)
    net = lp.mlp([64, 256, 256, 256, 10], rule=rule, optimizer=SGD)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    gc.collect()
    return memory.measure_step(net, x, y).peak_bytes


def test_the_same_step_measured_twice_gives_the_same_peak_in_any_order():
    first = {rule: step_peak(rule) for rule in ("bp", "greedy", "bp+checkpoint")}
    again = {rule: step_peak(rule) for rule in ("bp+checkpoint", "greedy", "bp")}
    assert first == again
    assert first["greedy"] < first["bp"]


def test_gradients_kept_between_steps_are_seen_freed():
    """A loop that keeps its gradients (zero_grad(set_to_none=False) style) between steps:
    a bp step frees nothing of them, while a loop that frees them inside the step
    lowers the count by their bytes, which the counter sees."""
    torch.manual_seed(0)
    w = torch.randn(512, 512, requires_grad=True)
    (w.sum()).backward()  # w.grad: 1 MiB allocated before the measurement
    with memory.track_peak("cpu") as peak:
        w.grad = None                   # -1 MiB
        buf = torch.empty(512, 512)     # +1 MiB: back at the start, no higher
    assert peak.bytes == 0
    del buf


def test_the_fused_update_holds_the_same_scratch_however_its_threads_overlap():
    """The CPU update forms the weight's gradient tile by tile, one chunk of tiles per
    thread. Each chunk's tile is allocated before the threads start, so one update's peak
    is every chunk's tile, whether or not the two threads happen to run at the same time
    (allocated by each thread, it was one tile or two depending on that timing). For a
    [256, 256] float32 weight and 2 threads: 2 chunks of one 128-row tile, 2 · 128 · 256 · 4
    bytes."""
    w, buf = torch.randn(256, 256), torch.zeros(256, 256)
    err, inp = torch.randn(128, 256), torch.randn(128, 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        peaks = set()
        for _ in range(20):
            with memory.track_peak("cpu") as peak:
                torch.ops.localprop.sgd_update_(w, err, inp, buf, 0.01, 0.9, 0.0, 0.0, False, False, False)
            peaks.add(peak.bytes)
    finally:
        torch.set_num_threads(threads)
    assert peaks == {2 * 128 * 256 * 4}
