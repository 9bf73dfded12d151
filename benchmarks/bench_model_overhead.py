"""Model-level overhead of AdapterFusion over the bare model (CPU, float32, BERT-base shape).

    .venv-ah/bin/python -m benchmarks model-overhead [--repeats 7] [--json out.json]
    .venv-ah/bin/python benchmarks/bench_model_overhead.py [--repeats 7] [--json out.json]   # the same

Variants, each a BERT-base-shaped ``BertModel`` (random init, 12 blocks, H=768) on a batch of
B=8, S=128 token ids, with 8 ``seq_bn`` adapters of width 48 fused (the ``dynamic`` preset):

* ``bare``         the model without adapters
* ``adapterhub``   AdapterHub's own eager ``Fuse`` (``adapters.init`` + 8 adapters + fusion)
* ``accelerate``   the same AdapterHub model after ``fusedadapter.accelerate`` (``--backend``, default auto)
* ``patch``        the bare model after ``fusedadapter.patch`` (same backend)

Repeats are interleaved (every round runs every variant, the first one rotating:
:func:`benchmarks.timing.time_interleaved`) so that a busy
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
import sys
import warnings

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedadapter as fa  # noqa: E402
from benchmarks.models import bert, fusion_adapters  # noqa: E402
from benchmarks.providers import Step  # noqa: E402
from benchmarks.results import ResultWriter, make_row  # noqa: E402
from benchmarks.timing import paired_quantiles, quantiles, time_interleaved  # noqa: E402

B, S, N_ADAPTERS, WIDTH = 8, 128, 8, 48


def build(with_adapterhub: bool, backend: str = "auto", layers: int = 12, hidden: int = 768):
    bare = bert(layers, hidden, seed=0).eval()  # BERT-base at the defaults: 12 layers, H=768, 12 heads, FFN 3072
    variants = {"bare": bare}
    cfgs = fusion_adapters(N_ADAPTERS, WIDTH)
    names = list(cfgs)
    patched = copy.deepcopy(bare)
    fa.patch(patched, cfgs, fusion="dynamic", placement="seq_bn", backend=backend)
    if with_adapterhub:
        import adapters

        ah = copy.deepcopy(bare)
        adapters.init(ah)
        for n in names:
            ah.add_adapter(n, config=adapters.SeqBnConfig(reduction_factor=hidden / WIDTH))
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
    ap.add_argument("--out", default=None, help="also append rows of the shared schema (benchmarks/results.py) to "
                    "OUT/results.{csv,json}")
    ap.add_argument("--layers", type=int, default=12, help="BERT blocks (default 12: BERT-base)")
    ap.add_argument("--hidden", type=int, default=768, help="BERT width (default 768)")
    ap.add_argument("--batch", type=int, default=B)
    ap.add_argument("--seq", type=int, default=S)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import adapters  # noqa: F401

        with_ah = True
    except ImportError:
        with_ah = False
        print("note: `adapters` is not installed: the AdapterHub variants are skipped", file=sys.stderr)

    variants = build(with_ah, args.backend, args.layers, args.hidden)
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)

    def call(name):
        with torch.inference_mode():
            return variants[name](input_ids=ids, attention_mask=mask).last_hidden_state

    # sanity: the fused variants compute what they stand for
    if with_ah:
        diff = (call("accelerate") - call("adapterhub")).abs().max().item()
        print(f"accelerate vs AdapterHub: max |diff| of the last hidden state {diff:.2e}")
    for _ in range(args.warmup):
        for name in variants:
            call(name)
    steps = {name: Step(run=lambda name=name: call(name)) for name in variants}
    ms = time_interleaved(steps, "cpu", repeats=args.repeats, min_sample_s=0.0, warmup=0)  # one call per sample
    times = {name: [t / 1e3 for t in v] for name, v in ms.items()}

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\nBERT shape L={args.layers} H={args.hidden}, B={args.batch}, S={args.seq}, {N_ADAPTERS} seq_bn adapters r={WIDTH} fused, CPU float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {args.backend}, "
          f"{args.repeats} interleaved rounds"
          + (f", load average {load[0]:.1f}" if load else ""))
    print(f"{'variant':<12} {'median s':>9} {'p20 s':>8} {'p80 s':>8} {'min s':>7}   {'overhead median':>15} {'p20':>7} "
          f"{'p80':>7} {'of mins':>8}")
    results, schema_rows = {}, []
    cfg = dict(model="bert", layers=args.layers, hidden=args.hidden, batch=args.batch, seq=args.seq, n=N_ADAPTERS,
               r=WIDTH, dtype="float32", backend=args.backend, repeats=args.repeats, threads=torch.get_num_threads())
    for name in variants:
        ts = times[name]
        q, ratio = quantiles(ts), paired_quantiles(ts, times["bare"])
        res = {"median_s": q["median"], "p20_s": q["p20"], "p80_s": q["p80"],
               "min_s": min(ts), "overhead_median": ratio["median"] - 1,
               "overhead_p20": ratio["p20"] - 1, "overhead_p80": ratio["p80"] - 1,
               "overhead_of_mins": min(ts) / min(times["bare"]) - 1, "times_s": ts}
        results[name] = res
        common = dict(kernel="model_overhead", provider=name, mode="nograd", x_name="tokens",
                      x_value=args.batch * args.seq)
        schema_rows.append(make_row(**common, metric="time", unit="ms", **{k: v * 1e3 for k, v in q.items()},
                                    config=dict(cfg, samples_ms=[t * 1e3 for t in ts])))
        if name != "bare":
            schema_rows.append(make_row(**common, metric="overhead", unit="ratio-1",
                                        **{k: v - 1 for k, v in ratio.items()}, config=cfg))
        ov = "" if name == "bare" else (f"{100 * res['overhead_median']:>+14.1f}% {100 * res['overhead_p20']:>+6.1f}% "
                                        f"{100 * res['overhead_p80']:>+6.1f}% {100 * res['overhead_of_mins']:>+7.1f}%")
        print(f"{name:<12} {res['median_s']:>9.3f} {res['p20_s']:>8.3f} {res['p80_s']:>8.3f} {res['min_s']:>7.3f}   {ov}")
    if args.json:
        meta = {"shape": {"B": args.batch, "S": args.seq, "adapters": N_ADAPTERS, "width": WIDTH, "hidden": args.hidden,
                          "layers": args.layers},
                "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "processor": platform.processor(), "load_average": load, "repeats": args.repeats,
                "backend": args.backend}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    if args.out:
        ResultWriter(args.out).add(schema_rows)
    return results


if __name__ == "__main__":
    main()
