"""Model-level overhead of AdapterFusion over the bare model (CPU, float32, BERT-base shape).

    .venv-ah/bin/python benchmarks/bench_model_overhead.py [--repeats 7] [--json out.json]

Variants, each a BERT-base-shaped ``BertModel`` (random init, 12 blocks, H=768) on a batch of
B=8, S=128 token ids, with 8 ``seq_bn`` adapters of width 48 fused (the ``dynamic`` preset):

* ``bare``         the model without adapters
* ``adapterhub``   AdapterHub's own eager ``Fuse`` (``adapters.init`` + 8 adapters + fusion)
* ``accelerate``   the same AdapterHub model after ``fusedadapter.accelerate`` (``--backend``, default auto)
* ``patch``        the bare model after ``fusedadapter.patch`` (same backend)

Repeats are interleaved (every round runs every variant, in a shuffled order) so that a busy
machine slows all variants alike; the overhead is the median (p20, p80) over rounds of each
round's ``variant / bare`` time ratio, minus one ("of mins": best variant time over best bare
time, the least disturbed estimate on a shared machine). Without ``adapters`` installed the AdapterHub
variants are skipped. This is a benchmark script, not a timed test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedadapter as fa  # noqa: E402

B, S, N_ADAPTERS, WIDTH = 8, 128, 8, 48


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def build(with_adapterhub: bool, backend: str = "auto"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig()  # BERT-base: 12 layers, H=768, 12 heads, FFN 3072
    bare = BertModel(config).eval()
    variants = {"bare": bare}
    names = [f"task{i}" for i in range(N_ADAPTERS)]
    patched = copy.deepcopy(bare)
    fa.patch(patched, {n: fa.AdapterConfig(bottleneck_size=WIDTH) for n in names}, fusion="dynamic",
             placement="seq_bn", backend=backend)
    if with_adapterhub:
        import adapters

        ah = copy.deepcopy(bare)
        adapters.init(ah)
        for n in names:
            ah.add_adapter(n, config=adapters.SeqBnConfig(reduction_factor=768 / WIDTH))
        fuse = adapters.Fuse(*names)
        ah.add_adapter_fusion(fuse)
        ah.set_active_adapters(fuse)
        ah.eval()
        accelerated = copy.deepcopy(ah)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # the fused path must really be taken
            fa.accelerate(accelerated, backend=backend)
        variants["adapterhub"] = ah
        variants["accelerate"] = accelerated
    variants["patch"] = patched
    return variants


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--backend", default="auto", help="fusedadapter backend of both fused variants (default auto)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import adapters  # noqa: F401

        with_ah = True
    except ImportError:
        with_ah = False
        print("note: `adapters` is not installed: the AdapterHub variants are skipped", file=sys.stderr)

    variants = build(with_ah, args.backend)
    ids = torch.randint(1000, 30000, (B, S), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, S, dtype=torch.long)

    def call(name):
        with torch.inference_mode():
            return variants[name](input_ids=ids, attention_mask=mask).last_hidden_state

    # sanity: the fused variants compute what they stand for
    if with_ah:
        diff = (call("accelerate") - call("adapterhub")).abs().max().item()
        print(f"accelerate vs AdapterHub: max |diff| of the last hidden state {diff:.2e}")
    order = list(variants)
    rng = random.Random(0)
    for _ in range(args.warmup):
        for name in order:
            call(name)
    times = {name: [] for name in order}
    for r in range(args.repeats):
        rng.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            call(name)
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in variants),
              file=sys.stderr)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nBERT-base shape, B={B}, S={S}, {N_ADAPTERS} seq_bn adapters r={WIDTH} fused, CPU float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, "
          f"{args.repeats} interleaved rounds"
          + (f", load average {load[0]:.1f}" if load else ""))
    print(f"{'variant':<12} {'median s':>9} {'p20 s':>8} {'p80 s':>8} {'min s':>7}   {'overhead median':>15} {'p20':>7} "
          f"{'p80':>7} {'of mins':>8}")
    results = {}
    for name in variants:
        ts = times[name]
        ratios = [t / b for t, b in zip(ts, times["bare"])]
        res = {"median_s": statistics.median(ts), "p20_s": _quantile(ts, 0.2), "p80_s": _quantile(ts, 0.8),
               "min_s": min(ts), "overhead_median": statistics.median(ratios) - 1,
               "overhead_p20": _quantile(ratios, 0.2) - 1, "overhead_p80": _quantile(ratios, 0.8) - 1,
               "overhead_of_mins": min(ts) / min(times["bare"]) - 1, "times_s": ts}
        results[name] = res
        ov = "" if name == "bare" else (f"{100 * res['overhead_median']:>+14.1f}% {100 * res['overhead_p20']:>+6.1f}% "
                                        f"{100 * res['overhead_p80']:>+6.1f}% {100 * res['overhead_of_mins']:>+7.1f}%")
        print(f"{name:<12} {res['median_s']:>9.3f} {res['p20_s']:>8.3f} {res['p80_s']:>8.3f} {res['min_s']:>7.3f}   {ov}")
    if args.json:
        meta = {"shape": {"B": B, "S": S, "adapters": N_ADAPTERS, "width": WIDTH, "hidden": 768, "layers": 12},
                "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "processor": platform.processor(), "load_average": load, "repeats": args.repeats,
                "backend": args.backend}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
