"""Regenerate ``fusedadapter/dispatch_table.json`` (what ``backend="auto"`` reads) from the
committed results under ``benchmarks/results/``.

The rule: for each mode (``table``: the no-grad rows, serving; ``training``: the ``full`` rows,
forward + backward of a fusion-training step) and each (device type, dtype, token bucket) with
fusion-site timings, the fastest of the non-reference backends that have results there. Where
two result files time the same provider at the same point and mode, the newer row (timestamp)
counts. "Fastest" compares the backends on the
points (shape x mode) they were all measured at, by the geometric mean of their median times; a
backend measured at fewer points is dropped until such common points exist. A device type with
no results is absent from the table (``auto`` then uses ``torch``). ``reference`` and
``adapterhub`` are baselines, never chosen; Triton rows from a CPU device (the interpreter)
are ignored.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fusedadapter.dispatch import TOKEN_BUCKETS, token_bucket

from .env import REPO
from .results import load_rows

__all__ = ["build_table", "write_table", "RESULTS_DIR", "TABLE_PATH"]

RESULTS_DIR = REPO / "benchmarks" / "results"
TABLE_PATH = REPO / "fusedadapter" / "dispatch_table.json"
CANDIDATES = ("torch", "triton", "cuda", "cpu")
# results mode -> the table it feeds ("table": no-grad calls; "training": fusion-training steps)
MODE_TABLES = {"nograd": "table", "full": "training"}
TABLE_MODES = ("table", "training")


def _bucket_order() -> List[str]:
    edges = list(TOKEN_BUCKETS)
    return [token_bucket(e) for e in edges] + [token_bucket(edges[-1] + 1)]


def _choose(per_point: Dict[Tuple, Dict[str, float]]) -> Optional[str]:
    providers = {p for d in per_point.values() for p in d}
    while providers:
        common = [k for k, d in per_point.items() if providers <= set(d)]
        if common:
            score = {p: sum(math.log(per_point[k][p]) for k in common) / len(common) for p in providers}
            return min(sorted(score), key=lambda p: score[p])
        counts = {p: sum(p in d for d in per_point.values()) for p in providers}
        providers.discard(min(sorted(counts), key=lambda p: counts[p]))
    return None


def _relative(path: str) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO))
    except ValueError:
        return str(p)


def build_table(results_dir=RESULTS_DIR) -> dict:
    results_dir = Path(results_dir)
    rows = load_rows(results_dir) if results_dir.exists() else []
    # (table mode, device, dtype, bucket) -> point -> provider -> (timestamp, median)
    groups: Dict[Tuple[str, str, str, str], Dict[Tuple, Dict[str, Tuple[str, float]]]] = defaultdict(
        lambda: defaultdict(dict))
    sources = {}
    for r in rows:
        if r.get("kernel") != "fusion_site" or r.get("metric") != "time" or not r.get("median"):
            continue
        prov, dev = r.get("provider"), r.get("device_type")
        if prov not in CANDIDATES or (prov == "triton" and dev == "cpu"):
            continue
        mode = MODE_TABLES.get(r.get("mode"))
        if mode is None:
            continue
        cfg = r["config"]
        key = (mode, dev, cfg["dtype"], token_bucket(int(cfg["tokens"])))
        point = (cfg.get("tokens"), cfg.get("hidden"), cfg.get("n"), cfg.get("r"), r.get("mode"))
        stamp = str(r.get("timestamp") or "")
        old = groups[key][point].get(prov)
        if old is None or stamp >= old[0]:
            groups[key][point][prov] = (stamp, float(r["median"]))
            src = _relative(r.get("_source", "?"))
            sources.setdefault(src, {"file": src, "git_commit": r.get("git_commit"), "device_name": r.get("device_name")})
    out: Dict[str, Dict[str, Dict[str, Dict[str, str]]]] = {m: {} for m in TABLE_MODES}
    for (mode, dev, dtype, bucket), per_point in groups.items():
        choice = _choose({pt: {p: v[1] for p, v in d.items()} for pt, d in per_point.items()})
        if choice is not None:
            out[mode].setdefault(dev, {}).setdefault(dtype, {})[bucket] = choice
    order = _bucket_order()
    out = {m: {dev: {dt: {b: per[b] for b in sorted(per, key=order.index)} for dt, per in sorted(dts.items())}
               for dev, dts in sorted(t.items())} for m, t in out.items()}
    data = {
        "comment": ("Written by `python -m benchmarks table` from benchmarks/results/*/results.json: per device type, "
                    "dtype and token bucket, the non-reference backend with the lowest geometric-mean median time "
                    "over the points (shape) all candidates were measured at; `table` from the no-grad rows, "
                    "`training` from the forward+backward (`full`) rows of a fusion-training step (the newer row "
                    "where two files time one point). A device type, dtype or bucket absent here uses the torch "
                    "backend (a training call without a training row: the no-grad choice)."),
        "sources": sorted(sources.values(), key=lambda s: s["file"]),
        "table": out["table"],
    }
    if out["training"]:
        data["training"] = out["training"]
    return data


def write_table(results_dir=RESULTS_DIR, path=TABLE_PATH) -> dict:
    data = build_table(results_dir)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    return data
