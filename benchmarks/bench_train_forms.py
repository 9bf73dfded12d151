"""Training forms of one fusion site (issue 11): where does the per-token form beat the folded one?

AdapterFusion stage 2 (adapters frozen, fusion Q/K/V trained), mode ``full`` (forward + backward),
interleaved repeats. Providers: the eager reference, the torch/cpu backends in each training form
(``folded``: the trained products rows @ W_K^T @ W_Q and W_V @ rows^T under autograd, float32
or float64 as before issue 11; ``per_token``: q, W_K^T q and W_V after the weighted sum per token)
and ``auto`` (the cost model in :func:`fusedadapter.fold.training_fold_form`). Writes the rows, the
measured crossover M* and ``TRAIN_PER_TOKEN_RATIO = M* / (R+N)`` to ``--out``; also the bytes
autograd saves for backward per provider (inputs and parameters left out).

    python -m benchmarks.bench_train_forms --tokens 16 64 256 1024 --repeats 5 \
        --out benchmarks/results/cpu-amd-epyc-2core-1thread/train_fold/forms.json
"""

from __future__ import annotations

import argparse
import os
import json
import math
import platform
import sys

import torch

import fusedadapter as fa
import fusedadapter.fold as fold_mod

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.providers import SiteShape, Step, setup_site  # noqa: E402
from benchmarks.timing import quantiles, time_interleaved  # noqa: E402
from benchmarks.train_fold_precision import set_variant  # noqa: E402

# name -> (form, forward, backward, key-rows and w_out products' precisions[, backward GEMM]) of
# fusedadapter.fold;
# "auto": the switches as committed (the cost model and the committed precisions).
_F32, _F64 = torch.float32, torch.float64
VARIANTS = {"folded-fp64": ("folded", _F64, _F64, _F64, _F64),
            "folded-fp64-bwd32": ("folded", _F64, _F32, _F64, _F64),
            "folded-fp64-bwd32-k32-o32": ("folded", _F64, _F32, _F32, _F32),
            "folded-fp64-bwd32-onednn": ("folded", _F64, _F32, _F64, _F64, "onednn"),
            "folded-fp32": ("folded", _F32, _F32, _F32, _F32),
            "per_token": ("per_token", _F64, _F64, _F64, _F64),
            "auto": ("auto", fold_mod.TRAIN_FOLD_PRECISION, fold_mod.TRAIN_FOLD_BACKWARD_PRECISION,
                     fold_mod.TRAIN_FOLD_KEY_PRECISION, fold_mod.TRAIN_FOLD_OUT_PRECISION,
                     fold_mod.TRAIN_FOLD_BACKWARD_GEMM)}


def saved_bytes_excl_cache(case, name) -> int:
    """Like SiteCase.saved_bytes, also leaving out the site's fold cache (alive anyway, like the
    parameters: the frozen adapter half is built once, not per call)."""
    from .providers import _train_setup

    mod, fwd, fusion_params = case.provider(name)
    mod.train()
    _train_setup(mod, fusion_params)
    with torch.enable_grad():
        fwd(case.a_grad, case.res_grad)  # fills the cache
    keep = [case.a_grad, case.res_grad] + list(mod.parameters())
    for entry in (getattr(mod, "_fold_cache", None) or {}).values():
        v = entry[2]
        keep += [t for t in vars(v).values() if isinstance(t, torch.Tensor)] if hasattr(v, "__dict__") else []
    skip = {t.untyped_storage().data_ptr() for t in keep}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip and st.data_ptr() != 0:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fwd(case.a_grad, case.res_grad)
    del out
    return int(sum(seen.values()))


def _with_form(step: Step, values) -> Step:
    def wrap(fn):
        if fn is None:
            return None

        def run():
            saved = set_variant(values)
            try:
                return fn()
            finally:
                set_variant(saved)
        return run
    return Step(wrap(step.run), wrap(step.prep))


def measure(tokens, backends, repeats, hidden=768, n=8, reduction=16, min_sample_s=0.05, width=None):
    rows = []
    for m in tokens:
        case = setup_site(SiteShape(tokens=m, hidden=hidden, n=n, reduction=reduction, width=width))
        steps = {"reference": case.step("reference", "full")}
        saved = {"reference": case.saved_bytes("reference")}
        saved_nc = {"reference": saved["reference"]}
        for b in backends:
            for v, values in VARIANTS.items():
                name = f"{b}:{v}"
                steps[name] = _with_form(case.step(b, "full"), values)
                saved_form = set_variant(values)
                try:
                    saved[name] = case.saved_bytes(b)
                    saved_nc[name] = saved_bytes_excl_cache(case, b)
                finally:
                    set_variant(saved_form)
        times = time_interleaved(steps, "cpu", repeats=repeats, min_sample_s=min_sample_s)
        ref = quantiles(times["reference"])["median"]
        for name, samples in times.items():
            q = quantiles(samples)
            rows.append({"tokens": m, "r": case.spec.r, "provider": name, "ms_median": q["median"], "ms_p20": q["p20"],
                         "ms_p80": q["p80"], "speedup_vs_reference": ref / q["median"],
                         "saved_MiB": saved[name] / 2**20, "saved_MiB_excl_fold_cache": saved_nc[name] / 2**20})
            print(f"M={m:5d} {name:22s} {q['median']:9.3f} ms  [{q['p20']:.3f}, {q['p80']:.3f}]  "
                  f"x{ref / q['median']:6.2f} vs reference  saved {saved[name] / 2**20:7.2f} MiB "
                  f"({saved_nc[name] / 2**20:.2f} MiB without the fold cache)", flush=True)
    return rows


def crossover(rows, backend, rows_count):
    """M* where per_token and the folded form as committed (folded-fp64-bwd32-onednn, else
    folded-fp64-bwd32, else folded-fp64, if measured) cost the same (log-linear interpolation), or None."""
    t = {(r["tokens"], r["provider"]): r["ms_median"] for r in rows}
    have = {p for _, p in t}
    folded = next((f"{backend}:{v}" for v in ("folded-fp64-bwd32-onednn", "folded-fp64-bwd32", "folded-fp64") if f"{backend}:{v}" in have), None)
    if f"{backend}:per_token" not in have or folded is None:
        return None  # not measured in this run (--variants)
    ms = sorted({r["tokens"] for r in rows})
    d = [(m, math.log(t[(m, f"{backend}:per_token")] / t[(m, folded)])) for m in ms]
    for (m0, d0), (m1, d1) in zip(d, d[1:]):
        if d0 <= 0 < d1:
            f = -d0 / (d1 - d0)
            return math.exp(math.log(m0) + f * (math.log(m1) - math.log(m0)))
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--width", type=int, default=48, help="adapter width r (R = 8 r; r > 192 is wide: R > 2H)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    backends = [b for b in args.backends if fa.available_backends("cpu").get(b) is None]
    for v in list(VARIANTS):
        if v not in args.variants:
            del VARIANTS[v]
    rows = measure(args.tokens, backends, args.repeats, width=args.width)
    rn = 8 * args.width + 8
    result = {"command": "python -m benchmarks.bench_train_forms " + " ".join(sys.argv[1:] if argv is None else argv),
              "torch": torch.__version__, "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "shape": {"hidden": 768, "n": 8, "r": args.width, "rows": rn}, "rows": rows, "crossover": {}}
    for b in backends:
        m_star = crossover(rows, b, rn)
        result["crossover"][b] = {"tokens": m_star, "ratio": None if m_star is None else m_star / rn}
        print(f"{b}: per_token = folded at M* = {m_star}, ratio M*/(R+N) = {None if m_star is None else m_star / rn}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
