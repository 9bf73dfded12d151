"""Host overhead of one eval call (issue 12): a one-token call of one site minus its two GEMMs.

H=768, N=8, r=48, CPU fp32, 1 thread, ``torch.no_grad()``, the fold cache warm. ``gemms`` is
the two GEMMs alone (GEMM1 ``[a] @ [w_down; w_query]^T`` and GEMM2 ``w @ w_out^T``, on the folded
weights); the overhead is the call's median minus theirs, each the median of interleaved
repeats of ``--inner`` back-to-back calls; the spread (p20-p80) is that of the per-repeat
differences (call minus GEMMs in the same round). Targets (issue 12): <= 30 us (cpu), <= 60 us
(torch). ``--out DIR`` writes the rows (``kernel="host_overhead"``, per-repeat samples in the
config) to ``DIR/results.{csv,json}``.

    python -m benchmarks host-overhead --backends torch cpu     # or: python benchmarks/bench_host_overhead.py
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedadapter as fa  # noqa: E402
from benchmarks.providers import SiteShape, Step, build_site, site_copies  # noqa: E402
from benchmarks.results import ResultWriter, make_row  # noqa: E402
from benchmarks.timing import quantiles, time_interleaved  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--inner", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=None, help="write results.{csv,json} here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    site = build_site(SiteShape(tokens=args.tokens, hidden=768, n=8, reduction=16), backend="auto").eval()
    backends = [b for b in args.backends if fa.available_backends("cpu").get(b) is None]
    for b in sorted(set(args.backends) - set(backends)):
        print(f"{b}: unavailable")
    mods = site_copies(site, backends)
    a = torch.randn(1, args.tokens, 768)
    res = torch.randn(1, args.tokens, 768)
    with torch.no_grad():
        f = site.folded(torch.float32)
        w1 = torch.cat([f.w_down, f.w_query], 0)
        w2 = f.w_out
        x = a.reshape(-1, 768)
        wmix = torch.randn(x.shape[0], w2.shape[1])
        steps = {"gemms": Step(run=lambda: (torch.mm(x, w1.t()), torch.mm(wmix, w2.t())))}
        steps.update({b: Step(run=lambda m=m: m(a, res)) for b, m in mods.items()})
        samples = time_interleaved(steps, "cpu", repeats=args.repeats, warmup=50, inner=args.inner)
    med = {k: quantiles(v)["median"] * 1e3 for k, v in samples.items()}  # ms -> us
    print(f"two GEMMs alone: {med['gemms']:.1f} us (p20-p80 {_spread(samples['gemms'])})")
    rows = []
    cfg = dict(hidden=768, n=8, r=48, tokens=args.tokens, dtype="float32", threads=1, inner=args.inner,
               repeats=args.repeats, load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    for k in steps:
        row = dict(kernel="host_overhead", provider=k, mode="eval", x_name="tokens", x_value=args.tokens)
        rows.append(make_row(metric="time", unit="us", **quantiles([x * 1e3 for x in samples[k]]), **row,
                             config=dict(cfg, samples_us=[round(x * 1e3, 2) for x in samples[k]])))
        if k == "gemms":
            continue
        diff = [(c - g) * 1e3 for c, g in zip(samples[k], samples["gemms"])]  # same round: same load
        q = quantiles(diff)
        print(f"{k:6s} call {med[k]:7.1f} us  host overhead {med[k] - med['gemms']:6.1f} us "
              f"(per-round p20-p80 {q['p20']:.1f}-{q['p80']:.1f})")
        rows.append(make_row(metric="host_overhead", unit="us", **q, **row,
                             config=dict(cfg, overhead_of_medians_us=round(med[k] - med["gemms"], 2),
                                         samples_us=[round(x, 2) for x in diff])))
    if args.out:
        ResultWriter(args.out).add(rows)
        print(f"wrote {args.out}/results.json")
    return 0


def _spread(samples_ms) -> str:
    q = quantiles([x * 1e3 for x in samples_ms])
    return f"{q['p20']:.1f}-{q['p80']:.1f}"


if __name__ == "__main__":
    sys.exit(main())
