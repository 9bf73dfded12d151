"""BERT-base with 8 fused adapters against the bare model, eager and replayed as a CUDA graph:
``device_check.sh``'s ``bench-graphs`` step (issue 12: <= 10% over the bare model, both ways).

    python -m benchmarks.devicecheck_graphs --out DIR [--backends auto triton] [--repeats 7]
    python -m benchmarks.devicecheck_graphs --out DIR --device cpu --layers 2 --hidden 64   # smoke (eager only)

A random-init ``BertModel`` (``benchmarks.models.bert``: 12 blocks, H=768 at the defaults) in
``--dtype`` (bf16) on B x S token ids (8 x 128), no-grad forward, and the same model after
``fusedadapter.patch`` with 8 ``seq_bn`` adapters of width 48 and the dynamic fusion, per
``--backends`` entry. Each model is timed eager and as a ``torch.cuda.CUDAGraph`` captured after
warm-up (docs/compile.md, "CUDA graphs by hand": static inputs, the fold cached before capture),
every variant interleaved round-robin (:func:`benchmarks.timing.time_interleaved`, CUDA events).
Rows (``benchmarks.results``, ``kernel="bert_model"``): ``time`` (ms) per provider (``bare`` or the
backend) and mode (``eager`` / ``graph``); ``overhead`` (patched / bare - 1, the median over the
rounds of each round's ratio, same mode) with ``config.target = 0.10``; ``rel_err`` of each
replay against its eager output, and of each patched model against the patched ``reference``
backend (eager; the same weights); ``chooses`` (what ``auto`` runs here, in
``config.chosen``; where that backend is also listed, ``auto`` is not timed twice); ``error`` rows for a backend or a capture that failed (the rest goes on).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Dict, List

import torch

import fusedadapter as fa
from fusedadapter.dispatch import resolve_backend
from fusedadapter.patching import set_backend
from fusedadapter.testing import rel_err

from .models import bert, fusion_adapters
from .devicecheck_switches import print_rows
from .providers import Step
from .results import ResultWriter, make_row
from .timing import paired_quantiles, quantiles, time_interleaved

KERNEL = "bert_model"
TARGET_OVERHEAD = 0.10


def capture(model, ids: torch.Tensor, warmup: int = 3):
    """(graph, static output) of ``model(input_ids=ids)`` under no_grad: warm-up calls on a side stream
    (autotuning, extension loads and the fold cache happen there), then one capture. Replays read
    ``ids``' memory: copy new token ids into it (same shape) before ``graph.replay()``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(warmup):
            model(input_ids=ids)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = model(input_ids=ids).last_hidden_state
    return graph, out


def run(args) -> List[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.monotonic()
    rows: List[dict] = []

    def row(provider, mode, metric, unit, q, **more):
        cfg = dict(batch=args.batch, seq=args.seq, layers=args.layers, hidden=args.hidden, n=8, r=48,
                   dtype=args.dtype, repeats=args.repeats, **more)
        return make_row(kernel=KERNEL, provider=provider, mode=mode, metric=metric, unit=unit, x_name="tokens",
                        x_value=args.batch * args.seq, p20=q.get("p20"), median=q.get("median"), p80=q.get("p80"),
                        config=cfg, device=device)

    def error(provider, mode, exc):
        rows.append(row(provider, mode, "error", "", {}, error=f"{type(exc).__name__}: {exc}"[:2000]))

    bare = bert(args.layers, args.hidden, seed=0).eval().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, bare.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    models = {"bare": bare}
    for backend in args.backends:
        if backend == "auto":  # what auto runs at this site shape; not timed twice under two names
            try:
                chosen = resolve_backend("auto", device, dtype, args.batch * args.seq)[0]
            except Exception as exc:  # noqa: BLE001 - recorded, auto is still timed
                chosen = f"unknown ({type(exc).__name__}: {exc})"
            if chosen in args.backends:
                rows.append(row("auto", "-", "skipped", "", {}, error=f"auto chooses {chosen!r} here: timed as that"))
                continue
            rows.append(row("auto", "-", "chooses", "", {}, chosen=chosen))
        m = copy.deepcopy(bare)
        torch.manual_seed(1)
        fa.patch(m, fusion_adapters(8, 48), fusion="dynamic", placement="seq_bn", backend=backend)
        models[backend] = m.eval()
    eager_out: Dict[str, torch.Tensor] = {}
    steps: Dict[tuple, Step] = {}
    for name, m in models.items():
        try:
            with torch.no_grad():
                eager_out[name] = m(input_ids=ids).last_hidden_state.clone()
        except Exception as exc:
            error(name, "eager", exc)
            continue

        def eager(m=m):
            with torch.no_grad():
                return m(input_ids=ids)

        steps[(name, "eager")] = Step(eager)
    first = next((n for n in models if n != "bare" and n in eager_out), None)
    if first is not None:  # correctness rides along: the reference backend
        try:
            ref = set_backend(copy.deepcopy(models[first]), "reference")
            with torch.no_grad():
                want = ref(input_ids=ids).last_hidden_state
            del ref
            for name in args.backends:
                if name in eager_out:
                    e = rel_err(eager_out[name], want)
                    rows.append(row(name, "eager", "rel_err", "", {"p20": e, "median": e, "p80": e},
                                    against="reference"))
        except Exception as exc:
            error("reference", "eager", exc)
    if device.type == "cuda":
        for name in list(eager_out):
            if time.monotonic() - t0 > args.budget_s:
                rows.append(row(name, "graph", "skipped", "", {}, error="time budget exhausted before its capture"))
                continue
            try:
                graph, out = capture(models[name], ids)
                graph.replay()
                torch.cuda.synchronize()
                e = rel_err(out, eager_out[name])
                rows.append(row(name, "graph", "rel_err", "", {"p20": e, "median": e, "p80": e}, against="eager"))
                steps[(name, "graph")] = Step(graph.replay)
            except Exception as exc:
                error(name, "graph", exc)
    else:
        rows.append(row("-", "graph", "skipped", "", {}, error=f"CUDA graphs need a CUDA device, not {device.type}"))
    labels = {f"{n}|{mode}": step for (n, mode), step in steps.items()}
    failed: Dict[str, BaseException] = {}
    samples = time_interleaved(labels, device, repeats=args.repeats, min_sample_s=args.min_sample_s, warmup=2,
                               on_error=lambda n, e: failed.setdefault(n, e))
    for label, exc in failed.items():
        error(*label.split("|"), exc)
    for label, s in samples.items():
        name, mode = label.split("|")
        if s:
            rows.append(row(name, mode, "time", "ms", quantiles(s), samples_ms=[round(x, 6) for x in s]))
    for label, s in samples.items():
        name, mode = label.split("|")
        base = samples.get(f"bare|{mode}")
        if name == "bare" or not s or not base:
            continue
        q = {k: v - 1.0 for k, v in paired_quantiles(s, base).items()}
        rows.append(row(name, mode, "overhead", "fraction", q, target=TARGET_OVERHEAD,
                        met=bool(q["median"] <= TARGET_OVERHEAD)))
    if args.out:
        ResultWriter(args.out).add(rows)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for results.json / results.csv")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--backends", nargs="+", default=["auto", "triton"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-sample-s", type=float, default=0.05)
    ap.add_argument("--budget-s", type=float, default=30.0, help="start no capture after this many seconds")
    args = ap.parse_args(argv)
    print_rows(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
