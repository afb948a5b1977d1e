"""Allocator-level memory measurement: exact on known allocations, consistent with an
analytic count on a toy model, and local learning below backprop on a deep MLP."""
import torch

import localprop as lp
from localprop import memory
from tests.conftest import SGD


def test_track_peak_counts_known_allocations_exactly():
    with memory.track_peak("cpu") as peak:
        a = torch.empty(1000)              # 4000 bytes
        b = torch.empty(2000)              # +8000 -> 12000 (the peak)
        del a                              # -4000
        c = torch.empty(500)               # +2000 -> 10000
    assert peak.bytes == 12000
    del b, c


def test_track_peak_ignores_what_was_allocated_before():
    big = torch.empty(1 << 20)
    with memory.track_peak("cpu") as peak:
        small = torch.empty(10)
    assert peak.bytes == 40
    del big, small


def test_bp_peak_matches_analytic_count_on_toy_mlp():
    """bp on a linear chain (no activation, no bias) of width n, depth d, batch b keeps
    d-1 hidden activations of b*n floats for the backward and allocates every weight's
    gradient (n*n floats each, the first n_in*n). Peak >= that sum, and little more."""
    torch.manual_seed(0)
    b, n, n_in, d, c = 64, 256, 32, 6, 8
    sizes = [n_in] + [n] * (d - 1) + [c]
    net = lp.mlp(sizes, activation=None, bias=False, rule="bp", optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
    x, y = torch.randn(b, n_in), torch.randint(0, c, (b,))
    m = memory.measure_step(net, x, y)
    activations = 4 * b * n * (d - 1)
    grads = 4 * (n_in * n + n * n * (d - 2) + n * c)
    # The gradients of the last weights are allocated while the first activations are
    # still alive; the peak lies between the larger of the two terms and their sum.
    assert max(activations, grads) <= m.peak_bytes <= activations + grads + 4 * b * n
    assert m.param_bytes == 4 * (n_in * n + n * n * (d - 2) + n * c)
    assert m.optimizer_bytes == 0  # SGD without momentum keeps no state


def test_resident_counts_optimizer_state():
    net = lp.mlp([9, 16, 4], rule="greedy", optimizer=SGD)
    x, y = torch.randn(5, 9), torch.randint(0, 4, (5,))
    m = memory.measure_step(net, x, y)
    assert m.optimizer_bytes == m.param_bytes  # one momentum buffer per parameter
    assert m.resident_bytes == 2 * m.param_bytes


def test_greedy_uses_less_step_memory_than_bp_on_deep_mlp():
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    peaks = {}
    for rule in ("bp", "greedy"):
        torch.manual_seed(0)
        net = lp.mlp([64] + [256] * 11 + [10], rule=rule, optimizer=SGD)
        peaks[rule] = memory.measure_step(net, x, y).peak_bytes
    assert peaks["greedy"] * 3 < peaks["bp"]


def test_compare_keeps_rule_names():
    x, y = torch.randn(8, 9), torch.randint(0, 4, (8,))
    rows = memory.compare(lambda r: lp.mlp([9, 16, 4], rule=r),
                          ["bp", "bp+checkpoint", "greedy"], x, y)
    assert [r.rule for r in rows] == ["bp", "bp+checkpoint", "greedy"]
    assert all(r.peak_bytes > 0 for r in rows)
