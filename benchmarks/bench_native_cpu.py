"""The ``cpu`` backend (C++ extension, csrc/) against the ``torch`` backend, one fusion site on CPU.

``python -m benchmarks native-cpu [--tokens 1 8 64 1024] [--dtypes float32 bfloat16]
[--repeats 15] [--threads N] [--json out.json]`` (or ``python benchmarks/bench_native_cpu.py ...``)

What is timed: ``FusedAdapterFusion.forward`` (H=768, N=8 adapters of width r=48, relu, the
``dynamic`` preset, perturbed weights) under ``torch.inference_mode``, so the fold is cached
and each call is the module's Python plus one op call. Backends alternate sample by sample
(interleaved, :mod:`benchmarks.timing`), each sample averages enough calls to last ~``--sample-ms``; the table shows the
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
import sys

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.providers import SiteShape, Step, build_site, site_copies  # noqa: E402
from benchmarks.results import ResultWriter, make_row  # noqa: E402
from benchmarks.timing import quantiles, time_interleaved  # noqa: E402


def measure(mods, x, res, repeats: int, sample_ms: float) -> dict:
    """{backend: quantiles (ms per call)} of ``mods[backend](x, res)``, the backends interleaved
    (:func:`benchmarks.timing.time_interleaved`; the first 'cpu' call loads the extension)."""
    steps = {b: Step(run=lambda m=m: m(x, res)) for b, m in mods.items()}
    samples = time_interleaved(steps, "cpu", repeats=repeats, min_sample_s=sample_ms / 1e3, warmup=3)
    return {b: quantiles(v) for b, v in samples.items()}


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
    ap.add_argument("--out", default=None, help="also append rows of the shared schema (benchmarks/results.py) to "
                    "OUT/results.{csv,json}")
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
    rows, schema_rows = [], []
    cpu_median = {}
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        site = build_site(SiteShape(tokens=1, hidden=args.hidden, n=args.adapters, width=args.width, dtype=dname)).eval()
        mods = site_copies(site, ["cpu", "torch"])  # parameters made outside inference mode
        with torch.inference_mode():
            for tokens in args.tokens:
                g = torch.Generator().manual_seed(tokens)
                x = torch.randn(tokens, args.hidden, generator=g).to(dtype)
                res = torch.randn(tokens, args.hidden, generator=g).to(dtype)
                stats = measure(mods, x, res, args.repeats, args.sample_ms)
                speed = stats["torch"]["median"] / stats["cpu"]["median"]
                cpu_median[(dname, tokens)] = stats["cpu"]["median"]

                def fmt(q):
                    return f"{q['median']:8.3f} ({q['p20']:.3f}-{q['p80']:.3f})"

                print(f"{dname:>9} {tokens:>6} | {fmt(stats['torch']):>24} | {fmt(stats['cpu']):>24} | {speed:6.2f}x",
                      flush=True)
                rows.append({"dtype": dname, "tokens": tokens,
                             "torch_ms": [stats["torch"][k] for k in ("median", "p20", "p80")],
                             "cpu_ms": [stats["cpu"][k] for k in ("median", "p20", "p80")], "speedup": speed})
                schema_rows += [make_row(kernel="native_cpu", provider=b, mode="nograd", metric="time", unit="ms",
                                         x_name="tokens", x_value=tokens, **stats[b],
                                         config=dict(tokens=tokens, hidden=args.hidden, n=args.adapters, r=args.width,
                                                     dtype=dname, repeats=args.repeats, threads=torch.get_num_threads(),
                                                     isa=isa))
                                for b in ("torch", "cpu")]
    if "float32" in args.dtypes and "bfloat16" in args.dtypes:
        print("# cpu backend, bf16 speed over its own fp32 (median ratio):")
        for tokens in args.tokens:
            print(f"#   {tokens:>6} tokens: {cpu_median[('float32', tokens)] / cpu_median[('bfloat16', tokens)]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "isa": isa,
                       "machine": platform.machine(), "cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    if args.out:
        ResultWriter(args.out).add(schema_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
