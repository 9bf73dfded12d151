"""Per-sample adapter masks: what ``adapter_mask`` costs, one fusion site on CPU (issue 8).

``python -m benchmarks adapter-mask [--batch 8] [--seq 128] [--backends torch cpu]
[--variants none batch token] [--dtype float32] [--repeats 9] [--threads N] [--json out.json]``
(or ``python benchmarks/bench_adapter_mask.py ...``)

What is timed: ``FusedAdapterFusion.forward`` (H=768, N=8 adapters of width r=48, relu, the
``dynamic`` preset, perturbed weights) under ``torch.inference_mode`` on a (batch, seq, H) input
(default 8 x 128 = 1024 tokens), per backend, with

- ``none``:  no mask (``adapter_mask=None``: the path every unmasked call takes),
- ``batch``: a (batch, N) mask (each request fuses a random subset of the adapter pool; one row
  masks every adapter, one row keeps a single adapter), broadcast over the sequence,
- ``token``: the same mask expanded to (batch, seq, N) (per-token form).

Every (backend, variant) pair alternates sample by sample (interleaved, the first one rotating
with the repeat: :mod:`benchmarks.timing`), each sample averages enough calls to last ~``--sample-ms``; the table shows the
median per call with the 20th and 80th percentiles and each variant's overhead over ``none`` of
the same backend (medians). Not a unit test: numbers depend on the machine and its load. On a
machine shared with other work, ``--threads 1 --clock cpu`` times the CPU time of the calling
thread (``time.thread_time``; with one intra-op thread all of a call's work runs there), which
time spent descheduled does not inflate; wall-clock medians there swing by 10-20%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List, Tuple

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedadapter as fa  # noqa: E402
from benchmarks.providers import SiteShape, Step, build_site, site_copies  # noqa: E402
from benchmarks.results import ResultWriter, make_row  # noqa: E402
from benchmarks.timing import quantiles, time_interleaved  # noqa: E402


def make_mask(batch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(batch, n, generator=g) > 0.5
    mask[0] = False          # a request that fuses nothing: the residual path alone
    if batch > 1:
        mask[1] = False
        mask[1, 0] = True    # a request with a single adapter
    return mask


def measure(mods, x, res, points: List[Tuple[str, str]], masks: Dict[str, object], repeats: int,
            sample_ms: float, clock=time.perf_counter) -> Dict[Tuple[str, str], List[float]]:
    """Per-call milliseconds, ``repeats`` samples per (backend, variant) point, the points
    interleaved (:func:`benchmarks.timing.time_interleaved`; the first 'cpu' call loads the extension)."""

    def step(backend, variant):
        m, mask = mods[backend], masks[variant]
        return Step(run=(lambda: m(x, res)) if mask is None else (lambda: m(x, res, adapter_mask=mask)))

    steps = {p: step(*p) for p in points}
    return time_interleaved(steps, "cpu", repeats=repeats, min_sample_s=sample_ms / 1e3, warmup=3, clock=clock)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    ap.add_argument("--variants", nargs="+", default=["none", "batch", "token"], choices=["none", "batch", "token"])
    ap.add_argument("--repeats", type=int, default=9, help="samples per point (>= 5)")
    ap.add_argument("--sample-ms", type=float, default=40.0, help="target length of one sample")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: time.perf_counter; cpu: this thread's CPU time (needs --threads 1)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--out", default=None, help="also append rows of the shared schema (benchmarks/results.py) to "
                    "OUT/results.{csv,json}")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        ap.error("--clock cpu counts the calling thread only: use it with --threads 1")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    backends = [b for b in args.backends if fa.available_backends("cpu").get(b) is None]
    skipped = sorted(set(args.backends) - set(backends))
    dtype = getattr(torch, args.dtype)
    site = build_site(SiteShape(tokens=args.batch * args.seq, hidden=args.hidden, n=args.adapters, width=args.width,
                               dtype=args.dtype)).eval()
    mods = site_copies(site, backends)  # parameters made outside inference mode
    tokens = args.batch * args.seq
    print(f"# adapter_mask overhead: FusedAdapterFusion.forward, H={args.hidden} N={args.adapters} r={args.width}, "
          f"input ({args.batch}, {args.seq}, {args.hidden}) = {tokens} tokens, {args.dtype}, inference_mode")
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"repeats {args.repeats}, clock {args.clock}" + (f"; skipped (unavailable): {skipped}" if skipped else ""))
    rows, schema_rows = [], []
    with torch.inference_mode():
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(dtype)
        res = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(dtype)
        bmask = make_mask(args.batch, args.adapters)
        masks = {"none": None, "batch": bmask,
                 "token": bmask[:, None, :].expand(args.batch, args.seq, args.adapters).contiguous()}
        points = [(b, v) for b in backends for v in args.variants]
        s = measure(mods, x, res, points, masks, args.repeats, args.sample_ms, clock)
    print(f"{'backend':>8} {'mask':>6} | {'ms per call (p20-p80)':>26} | {'overhead vs none':>16}")
    for b, v in points:
        q = quantiles(s[(b, v)])
        med, p20, p80 = q["median"], q["p20"], q["p80"]
        base = quantiles(s[(b, "none")])["median"] if (b, "none") in s else None
        over = None if base is None else med / base - 1.0
        over_s = "" if over is None or v == "none" else f"{over * 100:+.1f}%"
        print(f"{b:>8} {v:>6} | {med:9.3f} ({p20:.3f}-{p80:.3f}) | {over_s:>16}")
        rows.append(dict(backend=b, mask=v, tokens=tokens, hidden=args.hidden, adapters=args.adapters,
                         width=args.width, dtype=args.dtype, median_s=med / 1e3, p20_s=p20 / 1e3, p80_s=p80 / 1e3,
                         overhead_vs_none=over, samples_s=[t / 1e3 for t in s[(b, v)]], threads=torch.get_num_threads(),
                         clock=args.clock))
        schema_rows.append(make_row(kernel="adapter_mask", provider=b, mode="nograd", metric="time", unit="ms",
                                    x_name="mask", x_value=v, **q,
                                    config=dict(mask=v, tokens=tokens, batch=args.batch, seq=args.seq, hidden=args.hidden,
                                                n=args.adapters, r=args.width, dtype=args.dtype, repeats=args.repeats,
                                                threads=torch.get_num_threads(), clock=args.clock,
                                                overhead_vs_none=over, samples_ms=s[(b, v)])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.out:
        ResultWriter(args.out).add(schema_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
