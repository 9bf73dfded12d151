"""The ``cpu`` backend (C++ extension, csrc/) against the ``torch`` backend, one fusion site on CPU.

``python benchmarks/bench_native_cpu.py [--tokens 1 8 64 1024] [--dtypes float32 bfloat16]
[--repeats 15] [--threads N] [--json out.json]``

What is timed: ``FusedAdapterFusion.forward`` (H=768, N=8 adapters of width r=48, relu, the
``dynamic`` preset, perturbed weights) under ``torch.inference_mode``, so the fold is cached
and each call is the module's Python plus one op call. Backends alternate sample by sample
(interleaved), each sample averages enough calls to last ~``--sample-ms``; the table shows the
median per call with the 20th and 80th percentiles of the samples. Not a unit test: numbers
depend on the machine and its load, so read them with their spread. On a shared machine whose
cores are busy with other work, OpenMP regions of 2+ threads stall on descheduled threads (both
backends, ms-long outliers); ``--threads 1`` then gives stable numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List

import torch

import fusedadapter as fa
from fusedadapter.testing import perturb_


def make_site(hidden: int, n: int, r: int, dtype: torch.dtype) -> fa.FusedAdapterFusion:
    g = torch.Generator().manual_seed(0)
    site = fa.FusedAdapterFusion(hidden, [fa.AdapterConfig(bottleneck_size=r) for _ in range(n)], backend="torch")
    perturb_(site, g)
    return site.to(dtype).eval()


def quantile(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_interleaved(site, x, res, backends, repeats: int, sample_ms: float) -> Dict[str, List[float]]:
    """Per-call seconds, ``repeats`` samples per backend, backends alternating sample by sample."""
    calls = {}
    for b in backends:  # warm up (first call of 'cpu' builds or loads the extension) and size the samples
        site.backend = b
        for _ in range(3):
            site(x, res)
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 0.02 or n < 2:
            site(x, res)
            n += 1
        per = (time.perf_counter() - t0) / n
        calls[b] = max(1, int(sample_ms / 1e3 / per))
    samples: Dict[str, List[float]] = {b: [] for b in backends}
    for i in range(repeats):
        order = backends if i % 2 == 0 else backends[::-1]
        for b in order:
            site.backend = b
            k = calls[b]
            t0 = time.perf_counter()
            for _ in range(k):
                site(x, res)
            samples[b].append((time.perf_counter() - t0) / k)
    return samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=15, help="samples per backend and point (>= 5)")
    ap.add_argument("--sample-ms", type=float, default=30.0, help="target length of one sample")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    from fusedadapter.extension import load_native_op

    load_native_op("cpu", "cpu")
    cfg = torch.ops.fusedadapter._cpu_config()
    isa = {0: "generic", 1: "avx512", 2: "avx512bf16"}[int(cfg[1])]
    print(f"# cpu backend vs torch backend: FusedAdapterFusion.forward, H={args.hidden} N={args.adapters} "
          f"r={args.width}, inference_mode")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"cpu kernels: {isa} (small_m_max {cfg[2]}, bf16_min_m {cfg[3]}), repeats {args.repeats}")
    print(f"{'dtype':>9} {'tokens':>6} | {'torch ms (p20-p80)':>24} | {'cpu ms (p20-p80)':>24} | {'speedup':>7}")
    rows = []
    cpu_median = {}
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        site = make_site(args.hidden, args.adapters, args.width, dtype)  # parameters made outside inference mode
        with torch.inference_mode():
            for tokens in args.tokens:
                g = torch.Generator().manual_seed(tokens)
                x = torch.randn(tokens, args.hidden, generator=g).to(dtype)
                res = torch.randn(tokens, args.hidden, generator=g).to(dtype)
                s = time_interleaved(site, x, res, ["cpu", "torch"], args.repeats, args.sample_ms)
                stats = {b: (statistics.median(v), quantile(v, 0.2), quantile(v, 0.8)) for b, v in s.items()}
                speed = stats["torch"][0] / stats["cpu"][0]
                cpu_median[(dname, tokens)] = stats["cpu"][0]

                def fmt(t):
                    return f"{t[0] * 1e3:8.3f} ({t[1] * 1e3:.3f}-{t[2] * 1e3:.3f})"

                print(f"{dname:>9} {tokens:>6} | {fmt(stats['torch']):>24} | {fmt(stats['cpu']):>24} | {speed:6.2f}x",
                      flush=True)
                rows.append({"dtype": dname, "tokens": tokens, "torch_ms": [x * 1e3 for x in stats["torch"]],
                             "cpu_ms": [x * 1e3 for x in stats["cpu"]], "speedup": speed})
    if "float32" in args.dtypes and "bfloat16" in args.dtypes:
        print("# cpu backend, bf16 speed over its own fp32 (median ratio):")
        for tokens in args.tokens:
            print(f"#   {tokens:>6} tokens: {cpu_median[('float32', tokens)] / cpu_median[('bfloat16', tokens)]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "isa": isa,
                       "machine": platform.machine(), "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
