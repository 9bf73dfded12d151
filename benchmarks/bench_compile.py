"""Compiled vs eager patched models (torch.compile, CUDA graphs): no-grad forward time.

    python benchmarks/bench_compile.py --device cuda --json OUT/compile.json       # a GPU machine
    python benchmarks/bench_compile.py --device cpu --layers 2 --shapes 2x16 --compile-backend aot_eager  # smoke

A BERT-base-shaped ``BertModel`` (random init; ``--layers``, ``--hidden`` to shrink) with 8
``seq_bn`` adapters of width 48 and the dynamic fusion patched in (``fusedadapter.patch``), per
shape ``BxS`` of token ids. Variants (each on the same weights):

* ``bare eager`` / ``bare compiled``: the model without adapters, eager and ``torch.compile``\\ d;
* ``<backend> eager``: the patched model;
* ``<backend> compiled``: ``torch.compile(model)`` (``--compile-backend``, default inductor);
* ``<backend> cudagraphs``: ``torch.compile(model, mode="reduce-overhead")`` (CUDA only);
* ``<backend> frozen``: ``torch.compile(model, options={"freezing": True})`` (inductor only),
  which constant-folds weight-only subgraphs: under ``torch.compile`` a fusion site folds its
  weights inside the graph on every call (``FusedAdapterFusion._cached`` does not cache while
  compiling), freezing moves that out of the call.

Every model here is one class (``BertModel``) and fusedadapter patches with module hooks, which
dynamo does not guard on by default (``torch._dynamo.config.skip_nnmodule_hook_guards``): a
patched model would reuse the bare model's compiled graph and silently run without its fusion
sites. The script turns hook guards on before anything compiles (docs/distributed.md,
"torch.compile"), and checks every compiled variant against its eager twin (``rel err``).

Timing: ``benchmarks.timing.time_interleaved`` (providers round-robin, CUDA events, L2 flushed
before each call, p20 / median / p80 over ``--repeats``); compilation happens in an untimed
first call. Each row's speed-up is over the patched model in eager mode (same backend, same
shape), and the overhead over the bare model compiled the same way.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedadapter as fa  # noqa: E402
from benchmarks.models import bert  # noqa: E402
from benchmarks.providers import Step  # noqa: E402
from benchmarks.timing import quantiles, time_interleaved  # noqa: E402

N_ADAPTERS, WIDTH = 8, 48


def build_models(args, device, dtype):
    bare = bert(args.layers, args.hidden, seed=0).eval().to(device=device, dtype=dtype)
    patched = {}
    for backend in args.backends:
        m = copy.deepcopy(bare)
        torch.manual_seed(1)
        fa.patch(m, {f"task{i}": fa.AdapterConfig(bottleneck_size=WIDTH) for i in range(N_ADAPTERS)},
                 fusion="dynamic", placement="seq_bn", backend=backend)
        patched[backend] = m
    return bare, patched


def compiled(model, args, device, *, mode=None, freezing=False):
    kw = {"backend": args.compile_backend, "dynamic": False}
    if mode is not None:
        kw["mode"] = mode
    if freezing:
        # options make a distinct inductor wrapper, so this variant does not reuse the plain
        # compiled variant's cache entries (same code object, same guards otherwise)
        kw["options"] = {"freezing": True}
    return torch.compile(model, **kw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--backends", nargs="+", default=["torch"], help="fusedadapter backends (default torch)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    ap.add_argument("--shapes", nargs="+", default=["8x128", "1x32"], help="BxS token-id shapes (default 8x128 1x32)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-sample-s", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=0, help="CPU: torch threads (0 = torch's default)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.skip_nnmodule_hook_guards = False  # see the docstring: before any compile
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    bare, patched = build_models(args, device, dtype)
    inductor = args.compile_backend == "inductor"

    variants = {"bare eager": bare, "bare compiled": compiled(bare, args, device)}
    for backend, m in patched.items():
        variants[f"{backend} eager"] = m
        variants[f"{backend} compiled"] = compiled(m, args, device)
        if device.type == "cuda" and inductor:
            variants[f"{backend} cudagraphs"] = compiled(m, args, device, mode="reduce-overhead")
        if inductor:
            variants[f"{backend} frozen"] = compiled(m, args, device, freezing=True)

    rows = []
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {dtype}, "
          f"torch {torch.__version__}, compile backend {args.compile_backend}, BERT shape {args.layers} blocks "
          f"H={args.hidden}, {N_ADAPTERS} adapters r={WIDTH}, {args.repeats} interleaved repeats")
    for shape in args.shapes:
        b, s = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(1000, 30000, (b, s), generator=g).to(device)
        mask = torch.ones(b, s, dtype=torch.long, device=device)

        def make(name, fn):
            def run():
                if name.endswith("cudagraphs"):
                    torch.compiler.cudagraph_mark_step_begin()
                with torch.inference_mode():
                    return fn(input_ids=ids, attention_mask=mask).last_hidden_state
            return Step(run=run)

        steps = {name: make(name, fn) for name, fn in variants.items()}
        compile_s, errors = {}, {}
        for name, step in list(steps.items()):  # compile (untimed) and check against eager
            t0 = time.perf_counter()
            try:
                out = step.run()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                compile_s[name] = time.perf_counter() - t0
                ref_name = "bare eager" if name.startswith("bare") else name.split()[0] + " eager"
                ref = steps[ref_name].run() if ref_name != name else out
                err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                compile_s[name + " err"] = err
            except Exception as exc:  # a variant that cannot compile here is reported, not fatal
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                del steps[name]
        times = time_interleaved(steps, device, repeats=args.repeats, min_sample_s=args.min_sample_s, warmup=2,
                                 on_error=lambda n, e: errors.setdefault(n, f"{type(e).__name__}: {e}"))
        print(f"\nshape B={b} S={s}")
        head = (f"{'variant':<20} {'median ms':>10} {'p20':>9} {'p80':>9}   {'vs eager':>9} {'overhead vs bare':>17} "
                f"{'first call s':>12} {'rel err':>9}")
        print(head + "\n" + "-" * len(head))
        for name in variants:
            if name not in times:
                print(f"{name:<20} failed: {errors.get(name, '?')}")
                rows.append({"shape": shape, "variant": name, "error": errors.get(name)})
                continue
            q = quantiles(times[name])
            if name.startswith("bare"):
                eager_name, bare_name = "bare eager", name
            else:
                backend, kind = name.split()
                eager_name = f"{backend} eager"
                bare_name = "bare eager" if kind == "eager" else "bare compiled"
            vs = quantiles(times[eager_name])["median"] / q["median"] - 1 if eager_name in times else float("nan")
            ov = q["median"] / quantiles(times[bare_name])["median"] - 1 if bare_name in times else float("nan")
            print(f"{name:<20} {q['median']:>10.3f} {q['p20']:>9.3f} {q['p80']:>9.3f}   {100 * vs:>+8.1f}% "
                  f"{'' if name.startswith('bare') else f'{100 * ov:>+16.1f}%':>17} {compile_s.get(name, 0):>12.1f} "
                  f"{compile_s.get(name + ' err', 0):>9.1e}")
            rows.append({"shape": shape, "variant": name, "ms": q, "speedup_vs_eager": vs, "overhead_vs_bare": ov,
                         "first_call_s": compile_s.get(name), "rel_err_vs_eager": compile_s.get(name + " err"),
                         "samples_ms": times[name]})
    if args.json:
        meta = {"device": str(device), "dtype": str(dtype), "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "compile_backend": args.compile_backend, "layers": args.layers, "hidden": args.hidden,
                "adapters": N_ADAPTERS, "width": WIDTH, "repeats": args.repeats}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
