"""``python -m benchmarks train``: a model-level AdapterFusion stage-2 training step (issue 11).

BERT-base shape (H=768, 12 heads, FFN 3072; ``--layers`` blocks, random weights), N seq_bn
adapters of width r and a dynamic fusion at every block, CPU fp32. Providers, interleaved:

* ``floor``: the bare model frozen, backward to ``inputs_embeds`` (requires grad), no optimizer:
  every layer's input gradient and nothing else (what a free fusion would cost);
* ``reference``: ``fa.patch`` with the eager reference backend (AdapterHub's op sequence);
* ``patch``: ``fa.patch`` with ``backend="auto"`` (``--backends`` adds named ones).

A fused step is: forward, loss = mean(hidden^2) + the fusion regularization, backward, AdamW step
over the fusion parameters (adapters and base model frozen). Prints median [p20, p80] seconds and
the ratio to the floor; ``--out`` writes the rows as JSON. The default is quick (2 x 64 tokens,
3 repeats); the issue's grid is ``--shapes 1x32 2x64 8x128 32x128 --n-adapters 8``.
"""

from __future__ import annotations

import argparse
import os
import json
import platform
import sys

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.models import bert  # noqa: E402
from benchmarks.providers import Step  # noqa: E402
from benchmarks.timing import quantiles, time_interleaved  # noqa: E402


def _model(layers: int, seed: int = 0):
    return bert(layers, 768, seed=seed, vocab_size=1000).train()


def _steps(layers, batch, seq, n_adapters, r, backends):
    import fusedadapter as fa

    g = torch.Generator().manual_seed(1)
    emb = torch.randn(batch, seq, 768, generator=g)
    steps = {}
    bare = _model(layers)
    bare.requires_grad_(False)
    x = emb.clone().requires_grad_(True)

    def floor():
        x.grad = None
        bare(inputs_embeds=x).last_hidden_state.pow(2).mean().backward()

    steps["floor"] = Step(floor)
    for name, backend in [("reference", "reference"), ("patch", "auto")] + [(f"patch:{b}", b) for b in backends]:
        model = _model(layers)
        cfgs = {f"a{i}": fa.AdapterConfig(bottleneck_size=r) for i in range(n_adapters)}
        fa.patch(model, cfgs, fusion="dynamic", placement="seq_bn", backend=backend)
        model.requires_grad_(False)
        params = []
        for mod in model.modules():
            if type(mod).__name__ == "FusedAdapterFusion":
                for lin in (mod.query, mod.key, mod.value):
                    if lin is not None:
                        lin.requires_grad_(True)
                        params += list(lin.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        xin = emb.clone()

        def step(model=model, opt=opt, xin=xin):
            opt.zero_grad(set_to_none=True)
            loss = model(inputs_embeds=xin).last_hidden_state.pow(2).mean() + fa.fusion_regularization_loss(model)
            loss.backward()
            opt.step()

        steps[name] = Step(step)
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--shapes", nargs="+", default=["2x64"], help="BxS, e.g. 1x32 2x64 8x128")
    ap.add_argument("--n-adapters", type=int, nargs="+", default=[8])
    ap.add_argument("--r", type=int, default=48)
    ap.add_argument("--backends", nargs="+", default=[], help="also time fa.patch with these backends")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes:
        b, s = (int(v) for v in shape.lower().split("x"))
        for n in args.n_adapters:
            steps = _steps(args.layers, b, s, n, args.r, args.backends)
            times = time_interleaved(steps, "cpu", repeats=args.repeats, min_sample_s=0.0, warmup=1)
            floor = quantiles(times["floor"])["median"]
            for name, samples in times.items():
                q = quantiles(samples)
                rows.append({"batch": b, "seq": s, "n_adapters": n, "r": args.r, "layers": args.layers,
                             "provider": name, "s_median": q["median"] / 1e3, "s_p20": q["p20"] / 1e3,
                             "s_p80": q["p80"] / 1e3, "x_floor": q["median"] / floor,
                             "threads": torch.get_num_threads()})
                print(f"B={b} S={s} N={n} {name:14s} {q['median'] / 1e3:8.3f} s  [{q['p20'] / 1e3:.3f}, "
                      f"{q['p80'] / 1e3:.3f}]  {q['median'] / floor:5.2f}x the floor", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": "python -m benchmarks train " + " ".join(sys.argv[2:] if argv is None else argv),
                       "torch": torch.__version__, "machine": platform.machine(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
