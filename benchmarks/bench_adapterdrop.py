"""AdapterDrop speed: a fused BERT-base with adapters pruned and early layers skipped (CPU, float32).

    .venv/bin/python benchmarks/bench_adapterdrop.py [--repeats 5] [--threads 1] [--json out.json]

A BERT-base-shaped ``BertModel`` (random init, 12 blocks, H=768) on B=8, S=128 token ids, patched
with 8 ``seq_bn`` adapters of width 48 and the ``dynamic`` fusion (``fusedadapter.patch``; fusion
weights perturbed away from their init so the calibration has something to rank), then
``fusedadapter.adapter_drop(model, calibration, keep=k, skip_layers=n)`` for every k in
``--kept`` (default 8 4 2) and n in ``--skipped`` (default 0 3 6), for each backend in
``--backends`` (default ``auto`` — the fused op — and ``reference``, AdapterHub's eager op
sequence: AdapterDrop's own baseline), plus the bare model. Every variant shares the bare model's
parameter tensors (only the fusion sites are per variant).

Repeats are interleaved (``benchmarks.timing.time_interleaved``: every round runs every variant
once, round-robin, the first one rotating), so a busy machine slows all of them alike. Reported per variant: median / p20 / p80 seconds per forward
(``torch.inference_mode``), the speed-up over the unpruned fusion (k=8, n=0) as the median of
per-round ratios ``t(k8 n0) / t(variant) - 1`` against the same backend's unpruned fusion
(AdapterDrop's "+68% inference speed keeping 2 of 8" is this number), "of mins" (best time over
best time: the least disturbed estimate on a shared machine), and the overhead over the bare
model. A benchmark script, not a timed test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedadapter as fa  # noqa: E402
from benchmarks.models import bert  # noqa: E402
from benchmarks.providers import Step  # noqa: E402
from benchmarks.timing import quantiles, time_interleaved  # noqa: E402
from fusedadapter.patching import fusion_sites  # noqa: E402
from fusedadapter.testing import perturb_  # noqa: E402

N_ADAPTERS, WIDTH = 8, 48


def shared_copy(model):
    """A deep copy whose parameters and buffers are the original's tensors (modules, hooks: new)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def build(args):
    bare = bert(args.layers, args.hidden, seed=0).eval()
    g = torch.Generator().manual_seed(2)
    calib = [{"input_ids": torch.randint(1000, 30000, (2, 64), generator=g),
              "attention_mask": torch.ones(2, 64, dtype=torch.long)} for _ in range(2)]
    names = [f"task{i}" for i in range(N_ADAPTERS)]
    variants = {"bare": (bare, None)}
    for backend in args.backends:
        for n in args.skipped:
            for k in args.kept:
                m = shared_copy(bare)
                torch.manual_seed(1)  # the same adapters and fusion in every variant
                fa.patch(m, {nm: fa.AdapterConfig(bottleneck_size=WIDTH) for nm in names}, fusion="dynamic",
                         placement="seq_bn", backend=backend)
                gen = torch.Generator().manual_seed(3)
                for _, _, site in fusion_sites(m):
                    perturb_(site, gen)
                report = fa.adapter_drop(m, calib, keep=k, skip_layers=n)
                variants[(backend, k, n)] = (m, report)
    return variants


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: steadier on a shared machine; 0 = torch's default)")
    ap.add_argument("--backends", nargs="+", default=["auto", "reference"],
                    help="fusedadapter backends (default: auto reference)")
    ap.add_argument("--kept", type=int, nargs="+", default=[8, 4, 2], help="adapters kept (default 8 4 2)")
    ap.add_argument("--skipped", type=int, nargs="+", default=[0, 3, 6], help="layers skipped (default 0 3 6)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12, help="blocks (default 12, BERT-base)")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size (default 768, BERT-base)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if max(args.kept) > N_ADAPTERS or min(args.kept) < 1 or max(args.skipped) > args.layers:
        ap.error(f"--kept must be in 1..{N_ADAPTERS} and --skipped in 0..{args.layers}")
    if N_ADAPTERS not in args.kept or 0 not in args.skipped:
        ap.error("--kept must include 8 and --skipped 0 (the unpruned fusion is the baseline)")

    variants = build(args)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)

    def step(model):
        def run():
            with torch.inference_mode():
                return model(input_ids=ids, attention_mask=mask).last_hidden_state
        return Step(run=run)

    # every repeat runs each variant once (round-robin, the first one rotating); times in seconds
    ms = time_interleaved({key: step(m) for key, (m, _) in variants.items()}, "cpu", repeats=args.repeats,
                          min_sample_s=0.0, warmup=args.warmup)
    times = {key: [t * 1e-3 for t in v] for key, v in ms.items()}

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    kept_any = next((rep.kept for _, rep in variants.values() if rep is not None and len(rep.kept) == min(args.kept)),
                    None)
    print(f"\nAdapterDrop on a fused BERT shape ({args.layers} blocks, H={args.hidden}), B={args.batch}, S={args.seq}, "
          f"{N_ADAPTERS} seq_bn adapters r={WIDTH}, dynamic fusion, CPU float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds"
          + (f", load average {load[0]:.1f}" if load else ""))
    from fusedadapter.dispatch import resolve_backend

    resolved = resolve_backend("auto", "cpu", torch.float32, args.batch * args.seq)[0]
    print(f"backend auto runs {resolved!r} here ({args.batch * args.seq} tokens per site, float32)")
    if kept_any is not None:
        print(f"kept at k={min(args.kept)} (by mean fusion probability on the calibration batches): {kept_any}")
    head = (f"{'backend':<9} {'kept':>4} {'skipped':>7} {'median s':>9} {'p20 s':>7} {'p80 s':>7}   "
            f"{'speed-up vs k8 n0':>17} {'p20':>7} {'p80':>7} {'of mins':>8}   {'overhead vs bare':>16}")
    print(head)
    print("-" * len(head))
    results = {}
    for key in variants:
        ts = times[key]
        base = times[(key[0], N_ADAPTERS, 0)] if key != "bare" else times["bare"]
        sp = [b / t - 1 for t, b in zip(ts, base)]
        ov = [t / b - 1 for t, b in zip(ts, times["bare"])]
        qt, qs = quantiles(ts), quantiles(sp)
        res = {"median_s": qt["median"], "p20_s": qt["p20"], "p80_s": qt["p80"],
               "speedup_median": qs["median"], "speedup_p20": qs["p20"], "speedup_p80": qs["p80"],
               "speedup_of_mins": min(base) / min(ts) - 1, "overhead_median": quantiles(ov)["median"], "times_s": ts}
        rep = variants[key][1]
        if rep is not None:
            res.update(backend=key[0], kept_count=key[1], skipped=key[2], kept=rep.kept,
                       skipped_layers=rep.skipped_layers)
        name = "bare" if key == "bare" else f"{key[0]} k{key[1]} n{key[2]}"
        results[name] = res
        if key == "bare":
            print(f"{'bare':<9} {'-':>4} {'-':>7} {res['median_s']:>9.3f} {res['p20_s']:>7.3f} {res['p80_s']:>7.3f}")
            continue
        print(f"{key[0]:<9} {key[1]:>4} {key[2]:>7} {res['median_s']:>9.3f} {res['p20_s']:>7.3f} {res['p80_s']:>7.3f}   "
              f"{100 * res['speedup_median']:>+16.1f}% {100 * res['speedup_p20']:>+6.1f}% {100 * res['speedup_p80']:>+6.1f}% "
              f"{100 * res['speedup_of_mins']:>+7.1f}%   {100 * res['overhead_median']:>+15.1f}%")
    if args.json:
        meta = {"shape": {"B": args.batch, "S": args.seq, "adapters": N_ADAPTERS, "width": WIDTH, "hidden": args.hidden,
                          "layers": args.layers}, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine(), "processor": platform.processor(), "load_average": load,
                "repeats": args.repeats, "backends": args.backends, "auto_resolves_to": resolved}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
