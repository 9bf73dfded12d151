"""Named grids (presets) of fusion-site points, and a builder for custom sweeps.

A grid is a base point plus sweeps along axes (tokens, N, hidden, reduction, dtype); each
sweep point keeps the base's other values. A point reached by two sweeps is measured once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Sequence

from .layer import LayerOptions, Point
from .providers import MODES, SiteShape

__all__ = ["sweep", "PRESETS", "preset"]


def sweep(base: SiteShape, *, tokens: Sequence[int] = (), n: Sequence[int] = (), hidden: Sequence[int] = (),
          reduction: Sequence[int] = (), dtype: Sequence[str] = (), modes: Optional[Sequence[str]] = None
          ) -> List[Point]:
    """``modes``: limit these points to some modes (None: the run's)."""
    points: List[Point] = []
    seen = set()
    only = tuple(modes) if modes else None

    def add(spec: SiteShape, axis: str):
        if spec.key() not in seen:
            seen.add(spec.key())
            points.append(Point(spec, axis, only))

    for t in tokens:
        add(replace(base, tokens=int(t)), "tokens")
    for v in n:
        add(replace(base, n=int(v)), "N")
    for v in hidden:
        add(replace(base, hidden=int(v)), "hidden")
    for v in reduction:
        add(replace(base, reduction=int(v)), "reduction")
    for v in dtype:
        add(replace(base, dtype=str(v)), "dtype")
    if not points:
        add(base, "tokens")
    return points


def _quick() -> List[Point]:
    # The default run: a CPU sweep that fits in < 3 minutes on 2 cores.
    base = SiteShape(tokens=256, hidden=768, n=8, reduction=16, dtype="float32")
    return sweep(base, tokens=(16, 64, 256, 1024), n=(1, 2, 4, 8, 16))


def _tiny() -> List[Point]:
    # For tests of the CLI itself: seconds.
    base = SiteShape(tokens=8, hidden=32, n=2, reduction=8, dtype="float32")
    return sweep(base, tokens=(4, 8), n=(1, 2))


def _site768() -> List[Point]:
    # Issue 2: CPU fp32, one site, H=768, N=8, r=48, 1024 tokens.
    return [Point(SiteShape(tokens=1024, hidden=768, n=8, reduction=16, dtype="float32"), "tokens")]


def _cpu() -> List[Point]:
    # The committed CPU results: every token bucket of the dispatch table, fp32 and bf16, plus
    # the N, hidden-size and width sweeps at moderate sizes.
    base = SiteShape(tokens=256, hidden=768, n=8, reduction=16, dtype="float32")
    pts = sweep(base, tokens=(1, 8, 16, 64, 256, 1024, 4096, 8192), n=(1, 2, 4, 8, 16, 32), reduction=(2, 16, 64))
    pts += sweep(replace(base, dtype="bfloat16"), tokens=(1, 8, 16, 64, 256, 1024, 4096, 8192))
    # At H=4096 the fused backends re-fold the weights (O(H^2 R), float64) on every training call,
    # seconds each on this CPU: the hidden sweep keeps to the no-grad and full modes.
    pts += sweep(replace(base, tokens=64), hidden=(768, 1024, 4096), modes=("nograd", "full"))
    return _dedupe(pts)


def _cpu_train() -> List[Point]:
    # The training rows of the dispatch table (issue 11): a fusion-training step (mode full) in
    # every token bucket, fp32 and bf16, H=768, N=8, r=48, and wide adapters (r=384, R > 2H).
    base = SiteShape(tokens=256, hidden=768, n=8, reduction=16, dtype="float32")
    pts = sweep(base, tokens=(1, 16, 64, 256, 1024, 4096), reduction=(2,))
    pts += sweep(replace(base, dtype="bfloat16"), tokens=(1, 16, 256, 1024, 8192))
    pts += sweep(replace(base, tokens=1024, reduction=2), tokens=(1024,))
    return _dedupe(pts)


def _gpu() -> List[Point]:
    # device_check.sh: the issue-3 target row first, then the grid.
    target = SiteShape(tokens=16384, hidden=768, n=8, reduction=16, dtype="bfloat16")
    pts = [Point(target, "tokens")]
    pts += sweep(target, tokens=(256, 1024, 4096, 16384, 65536), n=(1, 2, 4, 8, 16, 32), hidden=(768, 1024, 4096),
                 reduction=(2, 16, 64))
    pts += sweep(replace(target, dtype="float16"), tokens=(1024, 16384))
    pts += sweep(replace(target, dtype="float32"), tokens=(1024, 16384))
    pts += sweep(replace(target, tokens=16), tokens=(1, 16))
    return _dedupe(pts)


def _dedupe(points: List[Point]) -> List[Point]:
    seen, out = set(), []
    for p in points:
        if p.spec.key() not in seen:
            seen.add(p.spec.key())
            out.append(p)
    return out


PRESETS: Dict[str, dict] = {
    "quick": {"points": _quick, "opts": dict(repeats=5, min_sample_s=0.02, warmup=2, rss="max"),
              "help": "default: CPU fp32, H=768 r=48, tokens 16-1024 at N=8 and N 1-16 at 256 tokens (< 3 min on 2 idle cores)"},
    "tiny": {"points": _tiny, "opts": dict(repeats=5, min_sample_s=0.0, warmup=1, rss="max", rss_modes=("full",),
                                        threads=1),
             "help": "a few-second grid for testing the CLI"},
    "site-768": {"points": _site768, "opts": dict(repeats=9, min_sample_s=0.05, warmup=2, rss="all",
                                                   modes=("nograd", "full")),
                 "help": "issue 2: CPU fp32, H=768, N=8, r=48, 1024 tokens; torch vs reference vs AdapterHub"},
    "cpu": {"points": _cpu, "opts": dict(repeats=5, min_sample_s=0.03, warmup=2, rss="max"),
            "help": "the committed CPU grid: all token buckets, fp32 and bf16, N / hidden / width sweeps"},
    "cpu-train": {"points": _cpu_train, "opts": dict(repeats=5, min_sample_s=0.03, warmup=2, rss="none",
                                                      modes=("full",)),
                  "help": "the training rows of the dispatch table: mode full, every token bucket, fp32 and bf16"},
    "gpu": {"points": _gpu, "opts": dict(repeats=7, min_sample_s=0.01, warmup=3, rss="none", device="cuda"),
            "help": "the GPU grid of device_check.sh (issue-3 target row first)"},
}


def preset(name: str, **overrides) -> tuple:
    """(points, LayerOptions) of preset ``name``; ``overrides`` replace option fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[name]
    opts = dict(modes=MODES)
    opts.update(p["opts"])
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return p["points"](), LayerOptions(**opts)
