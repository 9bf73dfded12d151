"""``python -m benchmarks train``: a model-level AdapterFusion stage-2 training step (issue 11).

BERT-base shape (H=768, 12 heads, FFN 3072; ``--layers`` blocks, random weights, the same base
weights for every provider), N seq_bn adapters of width r and a dynamic fusion at every block,
train mode (dropout on), CPU fp32, ``inputs_embeds`` of shape (B, S, 768). Providers, interleaved:

* ``floor``: the bare model frozen, backward to ``inputs_embeds`` (requires grad), no optimizer:
  every layer's input gradient and nothing else (what a free fusion would cost);
* ``adapterhub``: AdapterHub's own model (``adapters.init``, ``add_adapter`` x N,
  ``add_adapter_fusion``, ``train_adapter_fusion``), where ``adapters`` imports;
* ``accelerate``: that model after ``fusedadapter.accelerate(model)`` (backend ``auto``);
* ``patch``: ``fa.patch`` with ``backend="auto"`` (``--backends`` adds ``patch:NAME`` rows);
* ``reference``: ``fa.patch`` with the eager reference backend (AdapterHub's op sequence).

A step is: forward, loss = mean(hidden^2) + the fusion regularization (AdapterHub's
``get_fusion_regularization_loss`` on its models, ``fa.fusion_regularization_loss`` on patched
ones), backward, AdamW step over the fusion parameters (adapters and base model frozen); the
gradients are cleared before the timed part. Prints median [p20, p80] seconds per step and the
ratio to the floor (median of the per-repeat ratios, [p20, p80]); ``--out DIR`` appends rows of
the shared results schema (``kernel="train_step"``: ``time`` in ms and ``x_floor``), ``--json``
writes the plain table. ``--profile PROVIDER`` prints one step's per-op self CPU time instead.
The issue's grid is ``--shapes 1x32 2x64 8x128 32x128 --n-adapters 2 8 16``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.env import adapters_importable  # noqa: E402
from benchmarks.models import bert  # noqa: E402
from benchmarks.providers import Step  # noqa: E402
from benchmarks.results import ResultWriter, make_row  # noqa: E402
from benchmarks.timing import paired_quantiles, quantiles, time_interleaved  # noqa: E402

HIDDEN = 768
PROVIDERS = ("floor", "adapterhub", "accelerate", "patch", "reference")
OPTIMIZERS = ("fused", "foreach", "loop")
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _model(layers: int, hidden: int):
    return bert(layers, hidden, seed=0, vocab_size=1000).train()


def _adapterhub_model(layers, hidden, n_adapters, r):
    """AdapterHub's stage-2 setup: N seq_bn adapters, a dynamic Fuse, ``train_adapter_fusion``."""
    import adapters
    from adapters import Fuse, SeqBnConfig

    model = _model(layers, hidden)
    adapters.init(model)
    names = [f"a{i}" for i in range(n_adapters)]
    for name in names:
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=hidden / r))
    model.add_adapter_fusion(Fuse(*names), "dynamic")
    model.train_adapter_fusion(Fuse(*names))  # freezes base and adapters, fusion trainable, train mode
    return model


def _patched_model(layers, hidden, n_adapters, r, backend):
    import fusedadapter as fa

    model = _model(layers, hidden)
    fa.patch(model, {f"a{i}": fa.AdapterConfig(bottleneck_size=r) for i in range(n_adapters)}, fusion="dynamic",
             placement="seq_bn", backend=backend)
    model.requires_grad_(False)
    for mod in model.modules():
        if isinstance(mod, fa.FusedAdapterFusion):
            for lin in (mod.query, mod.key, mod.value):
                if lin is not None:
                    lin.requires_grad_(True)
    return model


def available(requested=None):
    """(providers that run here, {provider: why not})."""
    wanted = list(requested) if requested else list(PROVIDERS)
    ok, skipped = [], {}
    for p in wanted:
        if p in ("adapterhub", "accelerate") and not adapters_importable():
            skipped[p] = "`adapters` does not import here (use .venv-ah)"
        else:
            ok.append(p)
    return ok, skipped


def optimizer(params, kind: str):
    """AdamW over ``params``: ``fused`` (the Hugging Face Trainer's default optimizer on torch >= 2.8,
    ``adamw_torch_fused``), ``foreach``, or ``loop`` (torch's default on CPU: one parameter at a time)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    return torch.optim.AdamW(params, lr=1e-4, fused=kind == "fused" or None, foreach=kind == "foreach" or None)


def make_steps(providers, layers, batch, seq, n_adapters, r, hidden=HIDDEN, opt_kind="fused"):
    """{provider: Step} for one point; ``providers`` from :func:`available` (``patch:NAME`` allowed)."""
    import fusedadapter as fa

    g = torch.Generator().manual_seed(1)
    emb = torch.randn(batch, seq, hidden, generator=g)
    steps = {}
    for name in providers:
        if name == "floor":
            bare = _model(layers, hidden).requires_grad_(False)
            x = emb.clone().requires_grad_(True)

            def floor(bare=bare, x=x):
                bare(inputs_embeds=x).last_hidden_state.pow(2).mean().backward()

            steps[name] = Step(floor, lambda x=x: setattr(x, "grad", None))
            continue
        if name in ("adapterhub", "accelerate"):
            model = _adapterhub_model(layers, hidden, n_adapters, r)
            if name == "accelerate":
                fa.accelerate(model, backend="auto")

            def reg(model=model):  # what AdapterHub's AdapterTrainer adds in train_adapter_fusion
                return model.base_model.get_fusion_regularization_loss()
        else:
            backend = {"patch": "auto", "reference": "reference"}.get(name) or name.split(":", 1)[1]
            model = _patched_model(layers, hidden, n_adapters, r, backend)

            def reg(model=model):
                return fa.fusion_regularization_loss(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError(f"{name}: no trainable fusion parameters")
        opt = optimizer(params, opt_kind)
        xin = emb.clone()

        def step(model=model, opt=opt, xin=xin, reg=reg):
            loss = model(inputs_embeds=xin).last_hidden_state.pow(2).mean() + reg()
            loss.backward()
            opt.step()

        steps[name] = Step(step, lambda opt=opt: opt.zero_grad(set_to_none=True))
    return steps


def profile(step: Step, top: int = 40) -> str:
    """One step's per-op self CPU time (after two warm-up steps)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    for _ in range(2):
        if step.prep:
            step.prep()
        step.run()
    if step.prep:
        step.prep()
    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        step.run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


def measure(providers, layers, batch, seq, n_adapters, r, repeats, hidden=HIDDEN, opt_kind="fused", clock="wall"):
    """[(provider, samples_ms, ratio quantiles to the floor or None)] for one point, interleaved."""
    steps = make_steps(providers, layers, batch, seq, n_adapters, r, hidden, opt_kind)
    times = time_interleaved(steps, "cpu", repeats=repeats, min_sample_s=0.0, warmup=1, clock=CLOCKS[clock])
    return [(name, s, paired_quantiles(s, times["floor"]) if "floor" in times else None)
            for name, s in times.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=HIDDEN, help="hidden size (768: BERT-base; smaller for tests)")
    ap.add_argument("--shapes", nargs="+", default=["2x64"], help="BxS, e.g. 1x32 2x64 8x128")
    ap.add_argument("--n-adapters", type=int, nargs="+", default=[8])
    ap.add_argument("--r", type=int, default=48)
    ap.add_argument("--providers", nargs="+", default=None, help=f"default: {' '.join(PROVIDERS)} (those that run)")
    ap.add_argument("--backends", nargs="+", default=[], help="also time fa.patch with these backends (patch:NAME)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--optimizer", default="fused", choices=OPTIMIZERS, help="AdamW implementation (default: fused, "
                    "the Hugging Face Trainer's default)")
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS), help="thread: this thread's CPU time (1 torch "
                    "thread on a shared machine: time spent descheduled is not counted); wall: perf_counter")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--profile", default=None, metavar="PROVIDER", help="print one step's per-op profile instead")
    ap.add_argument("--out", default=None, help="folder: append rows of the results schema")
    ap.add_argument("--json", default=None, help="file: the printed table as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread counts one thread's CPU time: it needs --threads 1")
    providers, skipped = available(args.providers)
    providers += [f"patch:{b}" for b in args.backends]
    for p, why in skipped.items():
        print(f"skipped {p}: {why}")
    if args.profile:
        b, s = (int(v) for v in args.shapes[0].lower().split("x"))
        steps = make_steps([args.profile], args.layers, b, s, args.n_adapters[0], args.r, args.hidden, args.optimizer)
        print(profile(steps[args.profile]))
        return 0
    writer = ResultWriter(args.out) if args.out else None
    table = []
    for shape in args.shapes:
        b, s = (int(v) for v in shape.lower().split("x"))
        for n in args.n_adapters:
            rows = []
            for name, samples, ratio in measure(providers, args.layers, b, s, n, args.r, args.repeats, args.hidden,
                                                  args.optimizer, args.clock):
                q = quantiles(samples)
                cfg = {"batch": b, "seq": s, "tokens": b * s, "n_adapters": n, "r": args.r, "layers": args.layers,
                       "hidden": args.hidden, "dtype": "float32", "threads": torch.get_num_threads(),
                       "repeats": args.repeats, "optimizer": args.optimizer, "clock": args.clock, "samples_ms": [round(v, 3) for v in samples]}
                rows.append(make_row(kernel="train_step", provider=name, mode="train", metric="time", unit="ms",
                                     x_name="tokens", x_value=b * s, config=cfg, **q))
                if ratio is not None:
                    rows.append(make_row(kernel="train_step", provider=name, mode="train", metric="x_floor", unit="x",
                                         x_name="tokens", x_value=b * s, config=cfg, **ratio))
                table.append({**{k: v for k, v in cfg.items() if k != "samples_ms"}, "provider": name,
                              "s_median": q["median"] / 1e3, "s_p20": q["p20"] / 1e3, "s_p80": q["p80"] / 1e3,
                              "x_floor": None if ratio is None else ratio["median"]})
                rx = "" if ratio is None else (f"  {ratio['median']:5.2f}x the floor [{ratio['p20']:.2f}, "
                                               f"{ratio['p80']:.2f}]")
                print(f"B={b} S={s} N={n} {name:14s} {q['median'] / 1e3:8.3f} s  [{q['p20'] / 1e3:.3f}, "
                      f"{q['p80'] / 1e3:.3f}]{rx}", flush=True)
            if writer is not None:
                writer.add(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python -m benchmarks train " + " ".join(sys.argv[2:] if argv is None else argv),
                       "torch": torch.__version__, "machine": platform.machine(), "rows": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
