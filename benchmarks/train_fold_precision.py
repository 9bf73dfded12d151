"""Which parts of the training fold need float64? Measure it against the docs/algorithm.md §4 oracle.

AdapterFusion stage 2 (adapters frozen, fusion query/key/value trained): for random perturbed
sites (mixed widths, activations, ln_before, flags, residual_before, logit dropout replayed from a
mask, 1..300 tokens) run a backend (``--backend``: torch or cpu) with the trained products of the fold
in float64 (today's fold) or float32, in the folded form, in the per-token form, or as shipped
(``default``: the form each call takes by default), and report for each the worst ratio err / bound
over outputs, probabilities and every gradient (inputs and fusion parameters), fp32 and bf16
activations. A ratio <= 1 passes the oracle. Sites where the float64 truth's softmax saturates
(:func:`fusedadapter.testing.softmax_saturated`: its gradients are not accurate there) are counted
apart, as in ``benchmarks/grad_tail.py``, with their forward (outputs, probabilities) checked.

    python -m benchmarks.train_fold_precision --sites 40 --out benchmarks/results/<dir>/train_fold/precision.json
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys

import torch

import fusedadapter as fa
import fusedadapter.fold as fold_mod
from fusedadapter.testing import FLOORS, perturb_, rel_err, softmax_saturated

_F32, _F64 = torch.float32, torch.float64
# name -> (form, forward products' precision, backward products' precision, precision of the key
# rows rows @ W_K^T, precision of w_out = W_V @ rows^T) of fusedadapter.fold (the last two apply
# when the forward's precision is float64; a float32 forward runs every product in float32)
VARIANTS = {"folded-fp64": ("folded", _F64, _F64, _F64, _F64),
            "folded-fp64-bwd32": ("folded", _F64, _F32, _F64, _F64),
            "folded-fp64-bwd32-o32": ("folded", _F64, _F32, _F64, _F32),
            "folded-fp64-bwd32-k32": ("folded", _F64, _F32, _F32, _F64),
            "folded-fp64-bwd32-k32-o32": ("folded", _F64, _F32, _F32, _F32),
            "folded-fp32": ("folded", _F32, _F32, _F32, _F32),
            "folded-fp64-bwd32-onednn": ("folded", _F64, _F32, _F64, _F64, "onednn"),
            "per_token": ("per_token", _F32, _F32, _F32, _F32),
            # what ships: the form chosen per call (fold.training_fold_form), fold.py's default precisions
            "default": ("auto", _F64, _F32, _F64, _F64, "onednn")}
HIDDEN = [8, 17, 32, 64, 96]
_KNOBS = ("TRAIN_FORM", "TRAIN_FOLD_PRECISION", "TRAIN_FOLD_BACKWARD_PRECISION", "TRAIN_FOLD_KEY_PRECISION",
          "TRAIN_FOLD_OUT_PRECISION", "TRAIN_FOLD_BACKWARD_GEMM")


def set_variant(values):
    """Set fusedadapter.fold's form/precision switches to ``values``; returns the previous values."""
    values = tuple(values) + ("aten",) * (len(_KNOBS) - len(values))  # the last knob: aten unless named
    saved = tuple(getattr(fold_mod, k) for k in _KNOBS)
    for k, v in zip(_KNOBS, values):
        setattr(fold_mod, k, v)
    return saved


def random_site(rng: random.Random, seed: int):
    h = rng.choice(HIDDEN)
    n = rng.choice([1, 2, 3, 5, 8])
    cfgs = []
    for i in range(n):
        cfgs.append(fa.AdapterConfig(bottleneck_size=rng.choice([1, 2, 4, 8, 16]),
                                     non_linearity=rng.choice(["relu", "gelu", "tanh", "swish"]),
                                     ln_before=rng.random() < 0.3, scaling=rng.choice([1.0, 0.5, 2.0])))
    flags = dict(query=rng.random() > 0.15, key=rng.random() > 0.15, value=rng.random() > 0.15,
                 residual_before=rng.random() < 0.25)
    site = fa.FusedAdapterFusion(h, cfgs, fa.FusionConfig.load("dynamic", **flags), backend="reference").double()
    perturb_(site, torch.Generator().manual_seed(seed))
    m = rng.choice([1, 3, 16, 64, 300])
    dropout = rng.random() < 0.5
    return site, m, dropout


def stage2_run(site, backend, dtype, a, res, mask, dropout, variant=None):
    m = copy.deepcopy(site).to(dtype)
    m.backend = backend
    m.adapters.requires_grad_(False)
    m.train(dropout)
    if not dropout:
        m.dropout_p = 0.0
    a, res = a.to(dtype).requires_grad_(True), res.to(dtype).requires_grad_(True)
    saved = set_variant(VARIANTS[variant]) if variant is not None else None
    try:
        out, p = m(a, res, return_probs=True, dropout_mask=mask if dropout else None)
        g = torch.Generator().manual_seed(7)
        loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)).sum() + (
            p * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)).sum()
        names = [n for n, q in m.named_parameters() if q.requires_grad]
        params = [q for q in m.parameters() if q.requires_grad]
        grads = torch.autograd.grad(loss, [a, res] + params, allow_unused=True)
    finally:
        if saved is not None:
            set_variant(saved)
    result = {"out": out.detach(), "probs": p.detach(), "d_a": grads[0], "d_res": grads[1]}
    for n, gq in zip(names, grads[2:]):
        result[f"d_{n}"] = None if gq is None else gq.detach()
    return result


def site_ratio(site, m, dropout, dtype, variant, seed=1, backend="torch", saturated_apart=False):
    """(worst err / bound, its tensor, whether the float64 truth's softmax saturates) of one site.
    ``saturated_apart``: at a saturated site check only the forward (outputs, probabilities), whose
    truth is accurate there (the survey's rule); otherwise every tensor (the tests' rule)."""
    g = torch.Generator().manual_seed(seed)
    h = site.hidden_size
    a = torch.randn(m, h, generator=g, dtype=torch.float64).to(dtype).double()
    res = torch.randn(m, h, generator=g, dtype=torch.float64).to(dtype).double()
    mask = torch.rand(m, site.num_adapters, generator=g) > 0.3
    rounded = copy.deepcopy(site).to(dtype).double()
    truth = stage2_run(rounded, "reference", torch.float64, a, res, mask, dropout)
    ref = stage2_run(site, "reference", dtype, a, res, mask, dropout)
    got = stage2_run(site, backend, dtype, a, res, mask, dropout, variant)
    saturated = softmax_saturated(truth["probs"])
    worst, where = 0.0, None
    for k, t in truth.items():
        if saturated_apart and saturated and k not in ("out", "probs"):  # the gradients' truth is not accurate
            continue
        if t is None or got[k] is None:
            other = got[k] if t is None else t
            if other is not None and other.abs().max().item() > 1e-9 * max(x.abs().max().item() for x in truth.values() if x is not None):
                return float("inf"), k, saturated
            continue
        bound = 2 * rel_err(ref[k], t) + FLOORS[dtype]
        r = rel_err(got[k], t) / bound
        if r > worst:
            worst, where = r, k
    return worst, where, saturated


def worst_ratio(site, m, dropout, dtype, variant, seed=1, backend="torch"):
    """(worst err / bound, its tensor) over every tensor of one site (see :func:`site_ratio`)."""
    return site_ratio(site, m, dropout, dtype, variant, seed, backend)[:2]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--backend", default="torch", help="the backend the variants run on (torch or cpu)")
    ap.add_argument("--hidden", type=int, nargs="+", default=None,
                    help="hidden sizes to draw from (default: 8 17 32 64 96)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.hidden:
        HIDDEN[:] = args.hidden
    rng = random.Random(args.seed)
    table, ratios, saturated = {}, {}, {}
    for i in range(args.sites):
        site, m, dropout = random_site(rng, args.seed * 1000 + i)
        for dtype in (torch.float32, torch.bfloat16):
            for variant in args.variants:
                r, k, sat = site_ratio(site, m, dropout, dtype, variant, seed=i + 1, backend=args.backend,
                                       saturated_apart=True)
                name = f"{variant} {str(dtype).split('.')[-1]}"
                ratios.setdefault(name, []).append(r)
                saturated.setdefault(name, []).append(sat)
                row = table.setdefault(name, {"sites": 0, "fail": 0, "worst": 0.0, "worst_at": None,
                                              "saturated_sites": 0, "saturated_fail": 0})
                if sat:  # the truth's softmax saturates (fusedadapter.testing.softmax_saturated): its
                    # gradients are apart, only the forward (out, probs) is checked
                    row["saturated_sites"] += 1
                    row["saturated_fail"] += r > 1.0
                    continue
                row["sites"] += 1
                row["fail"] += r > 1.0
                if r > row["worst"]:
                    row["worst"], row["worst_at"] = r, f"site {i} (H={site.hidden_size}, N={site.num_adapters}, M={m}, dropout={dropout}) {k}"
    for name, row in table.items():
        kept = [r for r, sat in zip(ratios[name], saturated[name]) if not sat]
        rs = sorted(kept) or [0.0]
        row["median"], row["p90"] = rs[len(rs) // 2], rs[min(len(rs) - 1, int(0.9 * len(rs)))]
        base = ratios.get("folded-fp64 " + name.split()[-1])
        # per site against today's float64 fold: how often (and by how much at worst) the variant is worse
        if base is not None:
            pairs = [(a, b) for a, b, sat in zip(ratios[name], base, saturated[name]) if not sat]
            rel = [a / b if b > 0 else (1.0 if a == 0 else float("inf")) for a, b in pairs]
            row["worse_than_fp64_sites"] = sum(x > 1.25 for x in rel)
            row["worst_vs_fp64"] = max(rel, default=1.0)
            # the oracle broken where the float64 fold holds it: what a new precision must never add
            row["over_where_fp64_holds"] = sum(a > 1.0 >= b for a, b in pairs)
        print(f"{name:28s} sites {row['sites']:4d}  over the bound {row['fail']:3d}  "
              f"(saturated, forward only: {row['saturated_fail']} of {row['saturated_sites']})  median {row['median']:.3f}  "
              f"p90 {row['p90']:.3f}  worst err/bound {row['worst']:.3f}  at {row['worst_at']}"
              + (f"  sites >1.25x fp64's ratio {row['worse_than_fp64_sites']} (worst {row['worst_vs_fp64']:.2f}x)"
                 + f", over the bound where fp64 holds {row['over_where_fp64_holds']}" if base is not None else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python -m benchmarks.train_fold_precision " + " ".join(argv or sys.argv[1:]),
                       "torch": torch.__version__, "rows": table,
                       # per variant, each site's worst err / bound in site order: two trees' runs with the
                       # same --sites / --seed / --hidden compare site by site (new sites over the bound)
                       "site_ratios": ratios,
                       # per variant, site by site: the truth's softmax saturates (counted apart above)
                       "site_saturated": saturated}, f, indent=1)


if __name__ == "__main__":
    main()
