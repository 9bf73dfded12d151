"""Multi-task serving (issue 16): one routed forward of a mixed batch vs K forwards of its row subsets.

    python -m benchmarks multitask [--k 2 4 8] [--batch 32] [--seq 128] [--repeats 7] [--threads 1]
                                   [--backends auto] [--device cpu] [--rows contiguous interleaved]
                                   [--json out.json]

One fusion site of the BERT-base shape (H=768): a pool of 8 adapters (width 48, relu) shared by
K ``dynamic`` fusions (each fuses all 8, in its own order: AdapterFusion's stage 2 trains one
fusion per target task over the same adapters), :class:`fusedadapter.MultiFusion`. The batch
(B rows of S tokens) is split evenly across the K fusions (B/K rows each).

* ``separate``: the K fusions' own sites (``FusedAdapterFusion``), one forward each, on the row
  subsets the caller already holds (slices: no copy), outputs left apart — what serving K tasks
  costs without routing.
* ``routed`` (``--rows contiguous``): one ``MultiFusion`` forward of the whole batch with the
  route (rows of a task adjacent: the site takes slices, and each group's op writes into its rows
  of one batch output, ``fusedadapter/multitask_rows.py``: no concatenation).
* ``routed-interleaved`` (``--rows interleaved``): the same batch with the tasks round-robin over
  the rows (the site gathers each task's rows and scatters the outputs back).
* ``routed-per-group`` (where the fusions run on ``triton``): ``routed`` with the grouped op off
  (``fusedadapter.multitask_rows.GROUPED_TRITON``): one launch pair per fusion instead of one
  ``fusion_triton_grouped`` call for all, in the same rounds.

``--train``: each variant is a training step instead (AdapterFusion stage 2: train mode, logit
dropout on, the pool adapters frozen, the fusions trained): the forward with autograd, then the
backward of the outputs' sum into the fusion weights and the inputs (gradients accumulate in
``.grad``, alike for every variant). On ``triton`` ``routed`` is then one ``fusion_triton_grouped``
call per step, forward and backward (``routed-per-group``: one op call per fusion, as ``separate``).

Timed (serving: under ``torch.inference_mode``) interleaved (``benchmarks.timing.time_interleaved``:
each round runs every variant once, the first rotating), so load on a shared machine falls on all
alike. Each timed call follows an untimed call of the same variant (``--no-warm-call``: not): a
call right after another variant pays for that variant's allocations, not its own. glibc hands
freed blocks of many MB back to the kernel, so the next call's large tensors page-fault again
(K=4, B=32 S=128, 1 thread, AMD EPYC: the routed call alone 36.4 ms with 0 minor faults, right
after an interleaved-rows call 40.0 ms with 3,040 faults = its 12 MB output; in rounds of all three
variants routed measured 0.90x separate, of the minimums 1.006x). Reported: median / p20 / p80 ms
per forward, tokens/s, and the speed-up of each routed variant over ``separate`` as the median
(p20, p80) of per-round ratios ``t_separate / t_routed``.
A benchmark script, not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedadapter as fa  # noqa: E402
from benchmarks.providers import Step  # noqa: E402
from benchmarks.timing import quantiles, sync, time_interleaved  # noqa: E402
from fusedadapter import multitask_rows  # noqa: E402
from fusedadapter.dispatch import resolve_backend  # noqa: E402
from fusedadapter.multitask import MultiFusion  # noqa: E402
from fusedadapter.testing import perturb_  # noqa: E402

N_POOL, WIDTH = 8, 48


def build(k: int, hidden: int, backend: str, device, dtype, seed: int = 0) -> MultiFusion:
    pool = {f"task{i}": fa.AdapterConfig(bottleneck_size=WIDTH) for i in range(N_POOL)}
    g = torch.Generator().manual_seed(seed)
    names = list(pool)
    fusions = {}
    for j in range(k):
        order = torch.randperm(N_POOL, generator=g).tolist()
        fusions[f"fusion{j}"] = ("dynamic", [names[i] for i in order])
    site = MultiFusion(hidden, pool, fusions, backend=backend)
    perturb_(site, g)
    return site.to(device=device, dtype=dtype).eval()


def routes(k: int, batch: int):
    per = batch // k
    contiguous = [j for j in range(k) for _ in range(per)]
    interleaved = [i % k for i in range(batch)]
    return torch.tensor(contiguous), torch.tensor(interleaved)


def run_point(k, args, device, dtype):
    site = build(k, args.hidden, args.backend, device, dtype)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device=device, dtype=dtype)
    res = torch.randn(args.batch, args.seq, args.hidden, generator=g).to(device=device, dtype=dtype)
    contiguous, interleaved = routes(k, args.batch)
    per = args.batch // k
    sites = list(site.adapter_fusion_layer.values())
    subsets = [(a[j * per:(j + 1) * per], res[j * per:(j + 1) * per]) for j in range(k)]
    # the interleaved batch: row i is row i // k of fusion i % k's subset (same rows, another order)
    src = torch.tensor([(i % k) * per + i // k for i in range(args.batch)], device=device)
    a_i, res_i = a[src], res[src]

    if args.train:  # stage 2: the pool adapters frozen, the fusions and the inputs take gradients
        site.adapters.requires_grad_(False)
        a, res, a_i, res_i = (t.requires_grad_(True) for t in (a, res, a_i.detach(), res_i.detach()))
        subsets = [(a[j * per:(j + 1) * per], res[j * per:(j + 1) * per]) for j in range(k)]
    mode = torch.enable_grad if args.train else torch.inference_mode
    # exactness check before timing (eval: no dropout): routed rows == their fusion's forward
    with mode():
        want = torch.cat([s(x, r) for s, (x, r) in zip(sites, subsets)]).detach()
        got = site(a, res, route=contiguous).detach()
        got_i = site(a_i, res_i, route=interleaved).detach()
        scale = want.abs().max().item()
        err = max((got - want).abs().max().item(), (got_i - want[src]).abs().max().item()) / scale
    site.train(args.train)

    def step(outs):  # serving: the outputs; training: their sum's backward
        if args.train:
            torch.autograd.backward([o.sum() for o in (outs if isinstance(outs, list) else [outs])])
        return outs

    def separate():
        with mode():
            return step([s(x, r) for s, (x, r) in zip(sites, subsets)])

    def routed():
        with mode():
            return step(site(a, res, route=contiguous))

    def routed_interleaved():
        with mode():
            return step(site(a_i, res_i, route=interleaved))

    steps = {"separate": _step(separate, args)}
    if "contiguous" in args.rows:
        steps["routed"] = _step(routed, args)
        if resolve_backend(args.backend, device, dtype, args.batch * args.seq // k, training=args.train)[0] == "triton":
            def routed_per_group():
                was, multitask_rows.GROUPED_TRITON = multitask_rows.GROUPED_TRITON, False
                try:
                    return routed()
                finally:
                    multitask_rows.GROUPED_TRITON = was

            if not args.train:  # (in train mode dropout draws differ per call)
                with torch.inference_mode():
                    err = max(err, (routed_per_group() - want).abs().max().item() / scale)
            steps["routed-per-group"] = _step(routed_per_group, args)
    if "interleaved" in args.rows:
        steps["routed-interleaved"] = _step(routed_interleaved, args)
    sync(device)
    ms = time_interleaved(steps, device, repeats=args.repeats, min_sample_s=args.min_sample_s, warmup=args.warmup)
    return _rows(ms, args), err


def _step(run, args) -> Step:
    """A timed call of ``run``, after an untimed one (the module docstring: allocator state)."""
    return Step(run=run, prep=None if args.no_warm_call else run)


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:
        return ""


def run_model_point(k, args):
    """The whole model: a BERT-base-shaped ``BertModel`` (random init, ``--layers`` blocks) patched with
    ``patch(fusions=...)`` (K fusions over the 8 adapters), one routed forward of the mixed batch,
    vs K models patched with one fusion each (sharing the base model's tensors) on their rows."""
    import copy

    from transformers import BertConfig, BertModel

    from fusedadapter.patching import fusion_sites

    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                        num_attention_heads=max(1, args.hidden // 64), intermediate_size=4 * args.hidden)
    bare = BertModel(config).eval()
    pool = {f"task{i}": fa.AdapterConfig(bottleneck_size=WIDTH) for i in range(N_POOL)}
    g = torch.Generator().manual_seed(0)
    fusions = {f"fusion{j}": ("dynamic", [f"task{i}" for i in torch.randperm(N_POOL, generator=g).tolist()])
               for j in range(k)}

    def shared_copy(model):
        memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        return copy.deepcopy(model, memo)

    multi = fa.patch(shared_copy(bare), pool, fusions=fusions, backend=args.backend)
    for _, _, site in fusion_sites(multi):
        perturb_(site, g)
    singles = []
    for name, (cfg, names) in fusions.items():
        single = fa.patch(shared_copy(bare), {n: pool[n] for n in names}, fusion=cfg, backend=args.backend)
        for (_, _, s1), (_, _, sm) in zip(fusion_sites(single), fusion_sites(multi)):
            f = sm.adapter_fusion_layer[name]
            s1.load_state_dict({**{f"adapters.{n}": v for n, v in f.adapters.state_dict().items()}, **f.state_dict()})
        singles.append(single)
    per = args.batch // k
    ids = torch.randint(1000, 30000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)
    route = [j for j in range(k) for _ in range(per)]
    subsets = [(ids[j * per:(j + 1) * per], mask[j * per:(j + 1) * per]) for j in range(k)]

    def routed():
        with torch.inference_mode(), fa.fusion_route(route):
            return multi(input_ids=ids, attention_mask=mask).last_hidden_state

    def separate():
        with torch.inference_mode():
            return [m(input_ids=i, attention_mask=am).last_hidden_state for m, (i, am) in zip(singles, subsets)]

    want, got = torch.cat(separate()), routed()
    err = (got - want).abs().max().item() / want.abs().max().item()
    ms = time_interleaved({"model separate": _step(separate, args), "model routed": _step(routed, args)}, "cpu",
                          repeats=args.repeats, min_sample_s=0.0, warmup=1)
    return _rows(ms, args, baseline="model separate"), err


def _rows(ms, args, baseline="separate"):
    tokens = args.batch * args.seq
    out = {}
    for name, ts in ms.items():
        q = quantiles(ts)
        row = {"median_ms": q["median"], "p20_ms": q["p20"], "p80_ms": q["p80"], "samples_ms": ts,
               "tokens_per_s": tokens / (q["median"] * 1e-3)}
        if name != baseline:
            r = quantiles([s / t for s, t in zip(ms[baseline], ts)])
            row.update(speedup_median=r["median"], speedup_p20=r["p20"], speedup_p80=r["p80"],
                       speedup_of_mins=min(ms[baseline]) / min(ts))
        out[name] = row
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks multitask", description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[2, 4, 8], help="fusions (default 2 4 8)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=768, help="hidden size (default 768, BERT-base)")
    ap.add_argument("--backend", default="auto", help="fusedadapter backend of every fusion (default auto)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rows", nargs="+", choices=["contiguous", "interleaved"], default=["contiguous", "interleaved"],
                    help="routed variants: tasks' rows adjacent and/or round-robin (default both)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7; >= 5 for committed rows)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-warm-call", action="store_true",
                    help="time each call right after the previous variant's, without an untimed call of its own first")
    ap.add_argument("--min-sample-s", type=float, default=0.0, help="minimum seconds per sample (default 0: one call)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: steadier on a shared machine; 0 = torch's default)")
    ap.add_argument("--train", action="store_true", help="time training steps (forward + backward, train mode) "
                    "instead of serving forwards")
    ap.add_argument("--model", action="store_true", help="also time the whole model: a BERT-base-shaped BertModel "
                    "patched with K fusions, routed, vs K single-fusion patched models on the row subsets")
    ap.add_argument("--model-only", action="store_true", help="time the whole model only (not the site)")
    ap.add_argument("--layers", type=int, default=12, help="--model: blocks (default 12, BERT-base)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new K after this many seconds")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if any(args.batch % k for k in args.k):
        ap.error(f"--batch {args.batch} must split evenly over every --k {args.k}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    per_fusion_tokens = args.batch * args.seq // max(args.k)
    resolved = resolve_backend(args.backend, device, dtype, per_fusion_tokens, training=args.train)[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.train and (args.model or args.model_only):
        ap.error("--train times the site only")
    print(("training steps, " if args.train else "") + f"multi-task site: H={args.hidden}, pool of {N_POOL} adapters r={WIDTH}, K dynamic fusions over all of "
          f"them, B={args.batch} S={args.seq}, {args.device} {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved rounds, backend {args.backend!r} "
          f"(runs {resolved!r} at {per_fusion_tokens} tokens per fusion)"
          + (f", load average {load[0]:.1f}" if load else ""))
    head = (f"{'K':>2} {'variant':<19} {'median ms':>9} {'p20':>8} {'p80':>8} {'tokens/s':>9}   "
            f"{'vs separate':>11} {'p20':>6} {'p80':>6} {'of mins':>7}")
    print(head)
    print("-" * len(head))
    results = {}
    points = [] if args.model_only else [(k, "site") for k in args.k]
    if args.model or args.model_only:
        if args.device != "cpu" or args.dtype != "float32":
            ap.error("--model runs on cpu float32")
        points += [(k, "model") for k in args.k]
    t_start, skipped = time.monotonic(), []
    for k, level in points:
        if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
            skipped.append(f"{level} K={k}")
            continue
        if level == "site":
            rows, err = run_point(k, args, device, dtype)
            results[f"K={k}"] = {"max_rel_err_vs_separate": err, **rows}
        else:
            rows, err = run_model_point(k, args)
            results[f"model K={k}"] = {"max_rel_err_vs_separate": err, "layers": args.layers, **rows}
        for name, r in rows.items():
            extra = ""
            if "speedup_median" in r:
                extra = (f"   {r['speedup_median']:>10.3f}x {r['speedup_p20']:>6.3f} {r['speedup_p80']:>6.3f} "
                         f"{r['speedup_of_mins']:>7.3f}")
            print(f"{k:>2} {name:<19} {r['median_ms']:>9.2f} {r['p20_ms']:>8.2f} {r['p80_ms']:>8.2f} "
                  f"{r['tokens_per_s']:>9.0f}{extra}")
        print(f"{'':>2} (routed rows vs their fusion's own forward: max rel err {err:.1e})")
    if args.json:
        from benchmarks.env import versions

        meta = {"shape": {"B": args.batch, "S": args.seq, "hidden": args.hidden, "pool": N_POOL, "width": WIDTH},
                "mode": "train" if args.train else "serve",
                "commit": _commit(),
                "backend": args.backend, "resolved": resolved, "device": args.device, "dtype": args.dtype,
                "threads": torch.get_num_threads(), "repeats": args.repeats, "versions": versions(),
                "machine": platform.machine(), "processor": platform.processor(), "load_average": load}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "skipped_for_budget": skipped}, f, indent=2)
    if skipped:
        print(f"not run (--budget-s {args.budget_s}): {', '.join(skipped)}")
    return results


if __name__ == "__main__":
    main()
