"""Tables (console and markdown) and PNG plots from result rows.

Ratios are speedups against ``reference``: ``median(reference) / median(provider)`` at the same
point and mode (above 1 is faster). Where both were measured in the same interleaved repeats,
the markdown also gives the spread of the per-repeat ratio (p20-p80).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .providers import MODES, SITE_PROVIDERS

__all__ = ["site_table", "format_console", "markdown_summary", "write_plots", "paired_ratio", "POINT_KEYS",
           "MODE_LEGEND", "MODEL_MODE_LEGEND"]

# What one timed iteration is in each mode (benchmarks/providers.py, benchmarks/models.py).
MODE_LEGEND = ("modes: nograd = eval forward under torch.inference_mode (serving); "
               "forward = the forward of a fusion-training step (train mode, logit dropout on, adapters frozen, "
               "fusion query/key/value trainable); backward = that step's backward alone (its forward untimed); "
               "full = forward + backward")
MODEL_MODE_LEGEND = ("model modes: nograd = eval forward under torch.inference_mode; train = one fusion-training "
                     "step (base model and adapters frozen, fusion trained: forward, backward, AdamW step)")

POINT_KEYS = ("tokens", "hidden", "n", "r", "dtype")
PROVIDER_ORDER = list(SITE_PROVIDERS)


def _order(names: Iterable[str], order: Sequence[str]) -> List[str]:
    names = set(names)
    return [p for p in order if p in names] + sorted(names - set(order))


def _point(cfg: dict) -> Tuple:
    return tuple(cfg.get(k) for k in POINT_KEYS)


def _mode_rank(mode: str) -> int:
    return list(MODES).index(mode) if mode in MODES else len(MODES)


def paired_ratio(ref_samples: Sequence[float], samples: Sequence[float]) -> Optional[Dict[str, float]]:
    """Quantiles of reference/provider over repeats measured side by side (same repeat index)."""
    n = min(len(ref_samples), len(samples))
    if n == 0:
        return None
    r = np.asarray(ref_samples[:n], dtype=float) / np.asarray(samples[:n], dtype=float)
    q = np.quantile(r, [0.2, 0.5, 0.8])
    return {"p20": float(q[0]), "median": float(q[1]), "p80": float(q[2])}


def _index(rows, metric: str, kernel: str = "fusion_site"):
    """{(point, mode): {provider: row}} for one metric."""
    out: Dict[Tuple, Dict[str, dict]] = OrderedDict()
    for r in rows:
        if r.get("kernel") != kernel or r.get("metric") != metric or r.get("median") is None:
            continue
        key = (_point(r["config"]), r["mode"])
        out.setdefault(key, {})[r["provider"]] = r
    return out


def site_table(rows) -> Tuple[List[str], List[List[str]]]:
    """Headers and cells: one line per (point, mode), per provider ``median ms (speedup x)``."""
    idx = _index(rows, "time")
    providers = _order({p for d in idx.values() for p in d}, PROVIDER_ORDER)
    headers = ["tokens", "H", "N", "r", "dtype", "mode"] + providers
    keys = sorted(idx, key=lambda k: (k[0][4] or "", k[0][1] or 0, k[0][3] or 0, k[0][2] or 0, k[0][0] or 0,
                                      _mode_rank(k[1])))
    cells = []
    for key in keys:
        per = idx[key]
        ref = per.get("reference")
        line = [str(v) for v in key[0][:4]] + [str(key[0][4]), key[1]]
        for p in providers:
            r = per.get(p)
            if r is None:
                line.append("-")
            elif ref is None or p == "reference":
                line.append(f"{r['median']:.3f}")
            else:
                line.append(f"{r['median']:.3f} ({ref['median'] / r['median']:.2f}x)")
        cells.append(line)
    return headers, cells


def _text_table(headers, cells) -> str:
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join("{:>" + str(w) + "}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*c) for c in cells]
    return "\n".join(lines)


def _md_table(headers, cells) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def format_console(rows) -> str:
    headers, cells = site_table(rows)
    if not cells:
        return "(no fusion-site timings)"
    return ("median ms per call; (Nx) = speedup over `reference` (eager, AdapterHub's op sequence)\n"
            + MODE_LEGEND + "\n" + _text_table(headers, cells))


def _fmt_bytes(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    v = float(v)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(v) < 1024 or unit == "GiB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return str(v)


def _detail_table(rows) -> str:
    idx = _index(rows, "time")
    headers = ["point", "mode", "provider", "p20 ms", "median ms", "p80 ms", "speedup vs reference",
               "paired ratio p20-p80"]
    cells = []
    for (point, mode), per in sorted(idx.items(), key=lambda kv: (kv[0][0][4] or "", kv[0][0][1] or 0, kv[0][0][3] or 0,
                                                                   kv[0][0][2] or 0, kv[0][0][0] or 0,
                                                                   _mode_rank(kv[0][1]))):
        ref = per.get("reference")
        label = f"T={point[0]} H={point[1]} N={point[2]} r={point[3]} {point[4]}"
        for p in _order(per, PROVIDER_ORDER):
            r = per[p]
            sp = f"{ref['median'] / r['median']:.2f}x" if ref is not None else "-"
            pr = "-"
            if ref is not None and p != "reference":
                q = paired_ratio(ref["config"].get("samples_ms", []), r["config"].get("samples_ms", []))
                if q:
                    pr = f"{q['p20']:.2f}-{q['p80']:.2f}x"
            cells.append([label, mode, p, f"{r['p20']:.4f}", f"{r['median']:.4f}", f"{r['p80']:.4f}", sp, pr])
    return _md_table(headers, cells)


def _metric_table(rows, metrics: Sequence[str], fmt) -> Optional[str]:
    data: Dict[Tuple, Dict[str, str]] = OrderedDict()
    cols = set()
    for r in rows:
        if r.get("kernel") != "fusion_site" or r.get("metric") not in metrics or r.get("median") is None:
            continue
        key = (_point(r["config"]), r["mode"], r["metric"])
        data.setdefault(key, {})[r["provider"]] = fmt(r)
        cols.add(r["provider"])
    if not data:
        return None
    providers = _order(cols, PROVIDER_ORDER)
    headers = ["point", "mode", "metric"] + providers
    cells = []
    for (point, mode, metric), per in data.items():
        label = f"T={point[0]} H={point[1]} N={point[2]} r={point[3]} {point[4]}"
        cells.append([label, mode, metric] + [per.get(p, "-") for p in providers])
    return _md_table(headers, cells)


def _errors(rows) -> List[str]:
    out = []
    for r in rows:
        if r.get("metric") in ("error", "skipped"):
            cfg = r.get("config", {})
            where = f"T={cfg.get('tokens')} H={cfg.get('hidden')} N={cfg.get('n')} {cfg.get('dtype')}" \
                if r.get("kernel") == "fusion_site" else json.dumps({k: cfg.get(k) for k in ("model", "batch", "seq")})
            out.append(f"- {r['metric']}: {r['kernel']} {r['provider']} {r['mode']} at {where}: {cfg.get('error', '')}")
    return out


def _model_table(rows) -> Optional[str]:
    model_rows = [r for r in rows if r.get("kernel") == "model" and r.get("median") is not None]
    if not model_rows:
        return None
    per: Dict[Tuple, Dict[str, dict]] = OrderedDict()
    for r in model_rows:
        cfg = r["config"]
        key = (cfg.get("model"), cfg.get("batch"), cfg.get("seq"), cfg.get("dtype"), r["mode"], r["metric"])
        per.setdefault(key, {})[r["provider"]] = r
    providers = _order({p for d in per.values() for p in d}, ["bare", "reference", "adapterhub", "adapterhub+accelerate",
                                                              "torch", "triton", "cuda", "cpu"])
    headers = ["model", "B x S", "dtype", "mode", "metric"] + providers
    cells = []
    for (model, b, s, dt, mode, metric), d in per.items():
        line = [str(model), f"{b}x{s}", str(dt), mode, metric]
        for p in providers:
            r = d.get(p)
            if r is None:
                line.append("-")
            elif r["unit"] == "ms":
                line.append(f"{r['median']:.1f} [{r['p20']:.1f}-{r['p80']:.1f}]")
            elif r["unit"] == "%":
                line.append(f"{r['median']:+.1f}%")
            else:
                line.append(f"{r['median']:.0f}")
        cells.append(line)
    return _md_table(headers, cells)


def markdown_summary(rows, *, title: str, command: str, skipped: Optional[Dict[str, str]] = None,
                     plots: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    first = rows[0] if rows else {}
    lines = [f"# {title}", ""]
    lines += [f"- command: `{command}`",
              f"- device: {first.get('device_name', '?')} ({first.get('device_type', '?')})",
              f"- torch {first.get('torch_version', '?')}, triton {first.get('triton_version') or '-'}, "
              f"transformers {first.get('transformers_version', '?')}, adapters "
              f"{(first.get('config') or {}).get('adapters_version') or '-'}",
              f"- commit: {first.get('git_commit', '?')}; written {first.get('timestamp', '?')}", ""]
    for n in notes:
        lines.append(f"- {n}")
    if skipped:
        lines.append("")
        lines.append("Providers not run here:")
        for p, why in skipped.items():
            lines.append(f"- `{p}`: {why}")
    headers, cells = site_table(rows)
    if cells:
        lines += ["", "## Fusion site: median ms per call, (Nx) = speedup over `reference`", "",
                  MODE_LEGEND.replace("modes:", "Modes:", 1) + ".", "", _md_table(headers, cells)]
    roof = _metric_table(rows, ["roofline_fraction"], lambda r: f"{100 * r['median']:.1f}%")
    if roof:
        lines += ["", "## Fraction of roofline (roofline time / measured median)", "", roof]
    mem = _metric_table(rows, ["saved_bytes", "peak_rss", "peak_rss_delta", "cuda_peak"],
                        lambda r: _fmt_bytes(r["median"]))
    if mem:
        lines += ["", "## Memory", "",
                  "`saved_bytes`: tensors autograd keeps for backward in a training forward (inputs and parameters "
                  "not counted). `peak_rss`: peak resident memory of a fresh process running only that provider; "
                  "`peak_rss_delta`: its rise over the process's RSS before the first iteration. `cuda_peak`: CUDA "
                  "allocator peak above what was allocated before the iteration.", "", mem]
    err = _metric_table(rows, ["rel_err"], lambda r: f"{r['median']:.1e}")
    if err:
        lines += ["", "## Output check: max|y - y_reference| / max|y_reference| (no-grad, same dtype)", "", err]
    model = _model_table(rows)
    if model:
        lines += ["", "## Model level: median ms [p20-p80]; overhead = patched or AdapterHub time over the bare model", "",
                  MODEL_MODE_LEGEND.replace("model modes:", "Modes:", 1) + ".", "", model]
    if cells:
        lines += ["", "## Fusion site, all quantiles", "", _detail_table(rows)]
    errs = _errors(rows)
    if errs:
        lines += ["", "## Errors and skips", ""] + errs
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- plots
def _series(rows, metric: str, axis: str):
    """{(group key): {mode: {provider: [(x, p20, median, p80)]}}} for metric along axis ('tokens' or 'n')."""
    others = [k for k in POINT_KEYS if k != axis]
    out: Dict[Tuple, Dict[str, Dict[str, list]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        if r.get("kernel") != "fusion_site" or r.get("metric") != metric or r.get("median") is None:
            continue
        cfg = r["config"]
        group = tuple((k, cfg.get(k)) for k in others)
        out[group][r["mode"]][r["provider"]].append((cfg.get(axis), r["p20"], r["median"], r["p80"]))
    # keep groups with at least two x values
    keep = {}
    for g, modes in out.items():
        xs = {x for per in modes.values() for pts in per.values() for x, *_ in pts}
        if len(xs) >= 2:
            keep[g] = modes
    return keep


def _plot(series, axis: str, metric: str, ylabel: str, path: Path, scale: float = 1.0) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    written = []
    for group, modes in series.items():
        names = _order(modes, list(MODES))
        fig, axes = plt.subplots(1, len(names), figsize=(max(6.0, 4.2 * len(names)), 3.6), squeeze=False)
        for ax, mode in zip(axes[0], names):
            for prov in _order(modes[mode], PROVIDER_ORDER):
                pts = sorted(modes[mode][prov], key=lambda t: t[0])
                xs = [p[0] for p in pts]
                med = [p[2] * scale for p in pts]
                lo = [p[1] * scale for p in pts]
                hi = [p[3] * scale for p in pts]
                line, = ax.plot(xs, med, marker="o", label=prov)
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            xs_all = sorted({p[0] for pts in modes[mode].values() for p in pts})
            ax.set_xticks(xs_all)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_title(mode)
            ax.set_xlabel("tokens" if axis == "tokens" else "N (adapters)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        desc = ", ".join(f"{k}={v}" for k, v in group)
        fig.suptitle(f"{metric} vs {'tokens' if axis == 'tokens' else 'N'} ({desc})", fontsize=10)
        fig.tight_layout()
        suffix = "_".join(f"{k}{v}" for k, v in group)
        out = path.parent / f"{path.stem}_{suffix}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(str(out))
    return written


def write_plots(rows, out_dir) -> List[str]:
    """time and memory against tokens and against N (one PNG per fixed shape); returns the paths."""
    out_dir = Path(out_dir)
    written: List[str] = []
    mem_metric = "cuda_peak" if any(r.get("metric") == "cuda_peak" for r in rows) else "saved_bytes"
    mem_label = "CUDA peak (MiB)" if mem_metric == "cuda_peak" else "saved for backward (MiB)"
    for axis, name in (("tokens", "tokens"), ("n", "N")):
        written += _plot(_series(rows, "time", axis), axis, "time", "ms per call", out_dir / f"time_vs_{name}")
        written += _plot(_series(rows, mem_metric, axis), axis, mem_metric, mem_label, out_dir / f"memory_vs_{name}",
                         scale=1.0 / 2 ** 20)
    return written
