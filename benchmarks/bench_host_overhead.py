"""Host overhead of one eval call (issue 12): a one-token call of one site minus its two GEMMs.

H=768, N=8, r=48, CPU fp32, 1 thread, ``torch.no_grad()``, the fold cache warm. ``gemms`` is
the two GEMMs alone (GEMM1 ``[a] @ [w_down; w_query]^T`` and GEMM2 ``w @ w_out^T``, on the folded
weights); the overhead is the call's median minus theirs, each the median of interleaved
repeats of ``--inner`` back-to-back calls.

    python -m benchmarks.bench_host_overhead --backends torch cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import fusedadapter as fa
from fusedadapter.testing import perturb_


def _time(fn, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--inner", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    site = fa.FusedAdapterFusion(768, {f"a{i}": fa.AdapterConfig(reduction_factor=16) for i in range(8)}).eval()
    perturb_(site, torch.Generator().manual_seed(0))
    a = torch.randn(1, args.tokens, 768)
    res = torch.randn(1, args.tokens, 768)
    with torch.no_grad():
        f = site.folded(torch.float32)
        w1 = torch.cat([f.w_down, f.w_query], 0)
        w2 = f.w_out
        x = a.reshape(-1, 768)
        wmix = torch.randn(x.shape[0], w2.shape[1])
        fns = {"gemms": lambda: (torch.mm(x, w1.t()), torch.mm(wmix, w2.t()))}
        for b in args.backends:
            if fa.available_backends("cpu").get(b) is not None:
                print(f"{b}: unavailable")
                continue
            m = site if b == args.backends[0] else __import__("copy").deepcopy(site)
            m.backend = b
            fns[b] = (lambda m=m: m(a, res))
        for fn in fns.values():
            for _ in range(50):
                fn()
        samples = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, fn in fns.items():
                samples[k].append(_time(fn, args.inner))
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"two GEMMs alone: {med['gemms']:.1f} us")
    for k in fns:
        if k != "gemms":
            print(f"{k:6s} call {med[k]:7.1f} us  host overhead {med[k] - med['gemms']:6.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
