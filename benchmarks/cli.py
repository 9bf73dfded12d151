"""``python -m benchmarks [PRESET | model | SCRIPT | table | report | device-summary] [options]``.

SCRIPT: one of the standalone benchmarks in :data:`SCRIPTS` (``decode``, ``train``, ``export``, ...).

With no arguments: the ``quick`` preset, a CPU sweep (< 3 minutes on 2 cores) that prints the
table and writes ``results.csv``, ``results.json``, ``summary.md`` and PNG plots to ``bench-out/``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional

from .grids import PRESETS, preset, sweep
from .layer import run_layer
from .providers import MODES, SITE_PROVIDERS
from .report import format_console, markdown_summary, paired_ratio, write_plots
from .results import ResultWriter, load_rows

DEFAULT_OUT = "bench-out"

# ``python -m benchmarks NAME [options]``: the standalone benchmarks (each also runs as
# ``python benchmarks/bench_*.py``), with their own options (``python -m benchmarks NAME --help``).
SCRIPTS: Dict[str, tuple] = {
    "decode": ("bench_decode", "generate() with the KV cache on a patched Llama-shape model vs bare"),
    "train": ("bench_train", "a model-level AdapterFusion stage-2 training step: patch, the eager reference and the "
              "stage-2 floor"),
    "train-forms": ("bench_train_forms", "one site's training forms (per-token vs folded): where each wins"),
    "native-cpu": ("bench_native_cpu", "the cpu backend (C++) vs the torch backend, one site on CPU"),
    "adapter-mask": ("bench_adapter_mask", "what a per-sample adapter_mask costs, one site on CPU"),
    "host-overhead": ("bench_host_overhead", "one eval call's host overhead: a one-token call minus its two GEMMs"),
    "model-overhead": ("bench_model_overhead", "BERT-base: bare vs patch vs AdapterHub vs accelerate, no-grad forward"),
    "adapterdrop": ("bench_adapterdrop", "AdapterDrop: a fused BERT-base with adapters pruned and layers skipped"),
    "compile": ("bench_compile", "torch.compile / CUDA graphs vs eager patched models"),
    "export": ("bench_export", "ONNX Runtime: the exported fused BERT vs the exported bare one"),
    "multitask": ("bench_multitask", "one routed forward of a mixed batch (K fusions over 8 shared adapters) vs K "
                  "separate forwards"),
}


def run_script(name: str, argv: List[str]) -> int:
    """Run the standalone benchmark ``name`` (a key of :data:`SCRIPTS`) with ``argv``."""
    import importlib

    module = importlib.import_module(f"benchmarks.{SCRIPTS[name][0]}")
    rc = module.main(argv)
    return rc if isinstance(rc, int) else 0  # some scripts' main returns its results


def _latest(rows: List[dict]) -> List[dict]:
    """One row per (kernel, provider, mode, metric, device type, point): the latest (a folder may
    hold several runs of the same points)."""
    keep: Dict[tuple, dict] = {}
    for r in rows:
        cfg = r.get("config") or {}
        point = tuple(cfg.get(k) for k in ("tokens", "hidden", "n", "r", "dtype", "model", "batch", "seq"))
        key = (r.get("kernel"), r.get("provider"), r.get("mode"), r.get("metric"), r.get("device_type"), point)
        if key not in keep or str(r.get("timestamp", "")) >= str(keep[key].get("timestamp", "")):
            keep[key] = r
    return list(keep.values())


def _finish(rows, out: Path, *, title: str, command: str, skipped, plots: bool, notes=()) -> str:
    paths = write_plots(rows, out) if plots else []
    md = markdown_summary(rows, title=title, command=command, skipped=skipped, plots=paths, notes=notes)
    (out / "summary.md").write_text(md)
    return md


def _headline(rows) -> List[str]:
    """Issue-2 lines: torch/reference speedup and reference vs AdapterHub, per mode, from paired repeats."""
    lines = []
    by = {}
    for r in rows:
        if r.get("kernel") == "fusion_site" and r.get("metric") == "time" and r.get("median"):
            by[(r["mode"], r["provider"], r["config"]["tokens"])] = r
    for (mode, prov, tokens), r in sorted(by.items()):
        ref = by.get((mode, "reference", tokens))
        if ref is None or prov == "reference":
            continue
        q = paired_ratio(ref["config"]["samples_ms"], r["config"]["samples_ms"])
        if prov == "adapterhub":
            ratio = ref["median"] / r["median"]
            lines.append(f"reference vs AdapterHub's own site, {mode}, {tokens} tokens: t_reference / t_adapterhub = "
                         f"{ratio:.3f} (median {ref['median']:.2f} ms vs {r['median']:.2f} ms; paired p20-p80 "
                         f"{q['p20']:.3f}-{q['p80']:.3f}; within +-15%: {'yes' if 0.85 <= ratio <= 1.15 else 'NO'})")
        else:
            lines.append(f"{prov} vs reference, {mode}, {tokens} tokens: {ref['median'] / r['median']:.1f}x faster "
                         f"(median {r['median']:.2f} ms vs {ref['median']:.2f} ms; paired ratio p20-p80 "
                         f"{q['p20']:.1f}-{q['p80']:.1f}x)")
    return lines


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _threads_for_busy_machine(opts) -> None:
    """On a CPU shared with other work, several torch threads wait on each other at every parallel
    region (a descheduled thread stalls the rest for a time slice): timings swing by 10-100x and a
    run takes minutes longer. Unless --threads was given, such a run uses one thread (and says so;
    the thread count is in every row's config)."""
    import os

    import torch

    if opts.device != "cpu" or opts.threads or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if torch.get_num_threads() > 1 and load > 0.5 * cores:
        opts.threads = 1
        print(f"note: load average {load:.1f} on {cores} cores (other work is running): timing with 1 torch thread, "
              f"which measures steadily there; pass --threads N to override", file=sys.stderr)


def _add_layer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: bench-out/)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the preset's; cpu)")
    p.add_argument("--providers", nargs="+", choices=SITE_PROVIDERS, help="subset of providers (default: all that run)")
    p.add_argument("--modes", nargs="+", choices=MODES, help="subset of modes")
    p.add_argument("--repeats", type=int, help="interleaved repeats (>= 5 for committed results)")
    p.add_argument("--min-sample-s", type=float, help="minimum seconds one sample lasts (inner iterations)")
    p.add_argument("--rss", choices=("none", "max", "all"), help="per-provider subprocess peak RSS: at no point, "
                   "at the point with the most tokens (max), or at all points (CPU only)")
    p.add_argument("--budget-s", type=float, help="start no new point after this many seconds")
    p.add_argument("--tokens", type=int, nargs="+", help="custom sweep: token counts (replaces the preset's grid)")
    p.add_argument("--n", type=int, nargs="+", help="custom sweep: adapter counts")
    p.add_argument("--hidden", type=int, nargs="+", help="custom sweep: hidden sizes")
    p.add_argument("--reduction", type=int, nargs="+", help="custom sweep: reduction factors (width = H // reduction)")
    p.add_argument("--dtype", nargs="+", help="custom sweep: dtypes (float32, bfloat16, float16); "
                   "every sweep runs at each")
    p.add_argument("--base", default=None, help='custom sweep base point as JSON, e.g. \'{"tokens": 256, "hidden": 768}\'')
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, the core count)")
    p.add_argument("--allow-interpreter", action="store_true", help="time Triton on CPU through its interpreter")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _layer(name: str, args, argv: List[str]) -> int:
    overrides = dict(device=args.device, providers=args.providers, modes=tuple(args.modes) if args.modes else None,
                     repeats=args.repeats, min_sample_s=args.min_sample_s, rss=args.rss, budget_s=args.budget_s,
                     allow_interpreter=args.allow_interpreter or None, progress=not args.no_progress,
                     threads=args.threads)
    points, opts = preset(name, **overrides)
    if any(v for v in (args.tokens, args.n, args.hidden, args.reduction, args.dtype)) or args.base:
        base = points[0].spec
        if args.base:
            base = replace(base, **json.loads(args.base))
        points = []
        for dt in args.dtype or [base.dtype]:  # every sweep at every dtype given
            points += sweep(replace(base, dtype=dt), tokens=args.tokens or (), n=args.n or (),
                            hidden=args.hidden or (), reduction=args.reduction or ())
    if opts.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if opts.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"preset {name!r} needs a CUDA device, and torch sees none here", file=sys.stderr)
            return 2
    out = Path(args.out)
    writer = ResultWriter(out)
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    opts.extra_config = {"preset": name}
    t0 = time.monotonic()
    _threads_for_busy_machine(opts)
    print(f"fusedadapter benchmarks: preset {name!r}, {len(points)} point(s), modes {list(opts.modes)}, "
          f"{opts.repeats} interleaved repeats, device {opts.device}"
          + (f", {opts.threads or _torch_threads()} thread(s)" if opts.device == "cpu" else "")
          + f"; writing to {out}/", flush=True)
    rows, skipped = run_layer(points, opts, sink=writer.add)
    for p, why in skipped.items():
        print(f"  skipped provider {p}: {why}")
    (out / "skipped.json").write_text(json.dumps(skipped, indent=1))
    notes = [f"preset `{name}`: {PRESETS[name]['help']}", f"wall time {time.monotonic() - t0:.0f} s"]
    if opts.device == "cpu":
        notes.append("Triton on CPU runs only through its interpreter (a test tool): never timed here.")
    head = _headline(rows) if name == "site-768" else []
    _finish(rows, out, title=f"fusedadapter benchmark: {name}", command=command, skipped=skipped,
                 plots=not args.no_plots, notes=notes + head)
    print()
    print(format_console(rows))
    for line in head:
        print(line)
    errors = [r for r in rows if r["metric"] == "error"]
    if errors:
        print(f"\n{len(errors)} provider error(s): see {out / 'summary.md'}")
    print(f"\nwrote {writer.csv_path}, {writer.json_path}, {out / 'summary.md'} and plots "
          f"({time.monotonic() - t0:.0f} s)")
    return 0


def _model(args, argv) -> int:
    from .models import ModelSpec, run_models

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    writer = ResultWriter(out)
    specs = [ModelSpec(model=m, batch=args.batch, seq=args.seq, n=args.n_adapters, r=args.r, dtype=args.dtype)
             for m in args.models]
    rows, skipped = run_models(specs, device=args.device, providers=args.providers, modes=tuple(args.modes),
                               repeats=args.repeats, warmup=args.warmup, sink=writer.add)
    for p, why in skipped.items():
        print(f"  skipped provider {p}: {why}")
    command = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    md = markdown_summary(rows, title="fusedadapter benchmark: model level", command=command, skipped=skipped)
    (out / "summary-model.md").write_text(md)
    print(md)
    return 0


def _table(args) -> int:
    from .table import write_table

    data = write_table(args.results, args.output)
    print(json.dumps(data["table"], indent=1))
    print(f"wrote {args.output} from {len(data['sources'])} result file(s)")
    return 0


def _report(args) -> int:
    out = Path(args.folder)
    rows = _latest(load_rows(out))
    if not rows:
        raise SystemExit(f"no results.json under {out}")
    _finish(rows, out, title=args.title, command=args.command or "(several commands; see config.preset)",
                 skipped=None, plots=not args.no_plots, notes=_headline(rows))
    print(format_console(rows))
    print(f"\nwrote {out / 'summary.md'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["quick"] + argv
    if argv and argv[0] in SCRIPTS:  # a standalone benchmark, with its own options
        return run_script(argv[0], argv[1:])
    if argv and argv[0] == "_rss":  # internal: one provider's peak RSS in a fresh process
        from .layer import rss_worker

        print(json.dumps(rss_worker(argv[1])))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="subcommand")
    for name, p in PRESETS.items():
        sp = sub.add_parser(name, help=p["help"])
        _add_layer_args(sp)
    mp = sub.add_parser("model", help="model level: bare vs patched vs AdapterHub (BERT-base, small Llama)")
    mp.add_argument("--out", default=DEFAULT_OUT)
    mp.add_argument("--device", default="cpu")
    from .models import MODELS

    mp.add_argument("--models", nargs="+", default=["bert-base", "llama-small"], choices=MODELS)
    mp.add_argument("--batch", type=int, default=8)
    mp.add_argument("--seq", type=int, default=128)
    mp.add_argument("--n-adapters", type=int, default=8)
    mp.add_argument("--r", type=int, default=48)
    mp.add_argument("--dtype", default="float32")
    mp.add_argument("--providers", nargs="+")
    mp.add_argument("--modes", nargs="+", default=["nograd", "train"], choices=["nograd", "train"])
    mp.add_argument("--repeats", type=int, default=5)
    mp.add_argument("--warmup", type=int, default=1)
    mp.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    for name, (_, text) in SCRIPTS.items():
        sub.add_parser(name, help=f"{text} (python -m benchmarks {name} --help)")
    tp = sub.add_parser("table", help="regenerate fusedadapter/dispatch_table.json from benchmarks/results/")
    from .table import RESULTS_DIR, TABLE_PATH

    tp.add_argument("--results", default=str(RESULTS_DIR))
    tp.add_argument("--output", default=str(TABLE_PATH))
    rp = sub.add_parser("report", help="rewrite summary.md and plots from the results.json in a folder")
    rp.add_argument("folder")
    rp.add_argument("--title", default="fusedadapter benchmark results")
    rp.add_argument("--command", default=None, help="the command(s) that produced the results, for the summary")
    rp.add_argument("--no-plots", action="store_true")
    dp = sub.add_parser("device-summary", help="(device_check.sh) summarise a GPU run into OUTDIR/summary.{json,md}")
    dp.add_argument("outdir", help="the folder the steps wrote into (device_check.sh's work folder)")
    dp.add_argument("--out", default=None, help="also write summary.{json,md} here (device_check.sh's OUTDIR)")
    args = parser.parse_args(argv)
    if args.subcommand in PRESETS:
        return _layer(args.subcommand, args, argv)
    if args.subcommand == "model":
        return _model(args, argv)
    if args.subcommand == "table":
        return _table(args)
    if args.subcommand == "report":
        return _report(args)
    if args.subcommand == "device-summary":
        from .devicecheck import summarize

        return summarize(args.outdir, args.out)
    parser.print_help()
    return 2
