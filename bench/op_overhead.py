"""What each fused CPU op costs beyond its own GEMMs, one node of width W at batch B.

Each op and the GEMMs it cannot avoid are timed alternately, 41 pairs; the median of the
paired differences is printed, so that drift in a shared machine's load cancels:
- transform (bias + ReLU + mask pass) against u Wᵀ;
- head_error (softmax cross-entropy, error, ReLU mask) against h Aᵀ and dlogits A;
- the SGD-with-momentum update of W against errᵀ u;
- and, against nothing, one pass that reads W and its momentum buffer and writes W: less
  traffic than any momentum step of W can make, so no update can cost less beyond its GEMM.

    python bench/op_overhead.py [--widths 256 1024] [--batches 256 1024 4096]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from localprop import ops
from localprop.ops import backends

C = 10  # classes of the head


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def extra_us(op, gemms, n: int, pairs: int = 41) -> float:
    """Median over ``pairs`` of (op time − GEMM time) per call, in µs."""
    for _ in range(3):
        op()
        gemms()
    return statistics.median((per_call(op, n) - per_call(gemms, n)) * 1e6 for _ in range(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[256])
    args = parser.parse_args()
    reason = backends.why_unavailable("cpp", torch.device("cpu"))
    if reason:
        raise SystemExit(reason)
    for w in args.widths:
        for b in args.batches:
            for name, us in overheads(w, b).items():
                print(f"width {w:5d}  batch {b:5d}  {name:16s} {us:8.1f} us beyond its GEMMs")


def overheads(w: int, B: int) -> dict[str, float]:
    """Each op's median time beyond its GEMMs (µs) for one node of width w at batch B."""
    n = max(2, 10 * 256 ** 3 // (w ** 2 * B))
    u, wt, b = torch.randn(B, w), torch.randn(w, w) * 0.03, torch.randn(w)
    a, c, y = torch.randn(C, w) * 0.03, torch.randn(C), torch.randint(0, C, (B,))
    h, aux = ops.transform(u, wt, b, "relu", "cpp")
    out = ops.head_error(h, aux, a, c, y, "relu", backend="cpp")
    buf, z, logits, g, dw = (torch.zeros(w, w), torch.empty(B, w), torch.empty(B, C), torch.empty(B, w),
                             torch.empty(w, w))
    return {
        "transform": extra_us(lambda: ops.transform(u, wt, b, "relu", "cpp"),
                              lambda: torch.mm(u, wt.t(), out=z), n),
        "head_error": extra_us(lambda: ops.head_error(h, aux, a, c, y, "relu", backend="cpp"),
                               lambda: (torch.mm(h, a.t(), out=logits), torch.mm(logits, a, out=g)), n),
        "sgd update of W": extra_us(
            lambda: torch.ops.localprop.sgd_update_(wt, out.err, u, buf, 1e-6, 0.9, 0.0, 0.0, False, False, False),
            lambda: torch.mm(out.err.t(), u, out=dw), n),
        "W, momentum pass": extra_us(lambda: torch.add(wt, buf, alpha=-1e-6, out=dw), lambda: None, n),
    }


if __name__ == "__main__":
    main()
