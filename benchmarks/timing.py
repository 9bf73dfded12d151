"""Interleaved timing: every repeat runs each provider once, round-robin, so load on a shared
machine falls on all of them alike; quantiles are taken over the repeats.

A sample is the mean time of ``inner`` iterations (calibrated so one sample lasts at least
``min_sample_s``). On CPU each iteration is timed with ``time.perf_counter`` around its timed
part (or another ``clock``: ``time.thread_time`` counts this thread's CPU time, so time spent
descheduled on a busy machine does not inflate a sample); on CUDA with a pair of CUDA events per
iteration, after zeroing a buffer larger than L2 (as ``triton.testing.do_bench`` does) so no
iteration reads its inputs from a warm cache.

Every benchmark here times through :func:`time_interleaved` and summarises with
:func:`quantiles` / :func:`paired_quantiles` (the standalone ``bench_*.py`` scripts included).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .providers import Step

__all__ = ["quantiles", "paired_quantiles", "time_interleaved", "calibrate", "sync", "cuda_peak_bytes"]


def quantiles(samples: Sequence[float]) -> Dict[str, float]:
    """p20, median, p80 (linear interpolation) of ``samples``; NaN when empty."""
    if len(samples) == 0:
        return {"p20": math.nan, "median": math.nan, "p80": math.nan}
    q = np.quantile(np.asarray(samples, dtype=np.float64), [0.2, 0.5, 0.8])
    return {"p20": float(q[0]), "median": float(q[1]), "p80": float(q[2])}


def paired_quantiles(num: Sequence[float], den: Sequence[float]) -> Dict[str, float]:
    """Quantiles of ``num[i] / den[i]`` over repeats measured side by side (the same repeat index
    of :func:`time_interleaved`): a load swing that hits one round hits both."""
    n = min(len(num), len(den))
    return quantiles([num[i] / den[i] for i in range(n)])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_FLUSH: Dict[int, torch.Tensor] = {}


def _flush_buffer(device: torch.device) -> torch.Tensor:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _FLUSH:
        _FLUSH[idx] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)  # 256 MiB > any L2
    return _FLUSH[idx]


def _sample(step: Step, inner: int, device: torch.device, clock: Callable[[], float] = time.perf_counter) -> float:
    """Mean milliseconds of ``inner`` iterations of ``step``'s timed part (``clock``: CPU only)."""
    if device.type == "cuda":
        flush = _flush_buffer(device)
        pairs = []
        for _ in range(inner):
            if step.prep is not None:
                step.prep()
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step.run()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return sum(s.elapsed_time(e) for s, e in pairs) / inner
    total = 0.0
    for _ in range(inner):
        if step.prep is not None:
            step.prep()
        t0 = clock()
        step.run()
        total += clock() - t0
    return total * 1e3 / inner


def calibrate(step: Step, device: torch.device, *, min_sample_s: float, warmup: int, max_inner: int = 1000,
              warmup_budget_s: float = 0.5, clock: Callable[[], float] = time.perf_counter) -> int:
    """Run up to ``warmup`` iterations (compiles, autotunes, fills caches; at least one, and no
    more once they took ``warmup_budget_s``), return the inner count for ``min_sample_s``."""
    t = math.inf
    spent = 0.0
    for i in range(max(1, warmup)):
        one = _sample(step, 1, device, clock)
        t, spent = min(t, one), spent + one * 1e-3
        # on CUDA the first call may compile or autotune: time at least a second one
        if spent > warmup_budget_s and (i >= 1 or device.type != "cuda"):
            break
    if t <= 0 or not math.isfinite(t):
        return max_inner
    return int(max(1, min(max_inner, math.ceil(min_sample_s * 1e3 / t))))


def time_interleaved(steps: Dict[str, Step], device, *, repeats: int = 5, min_sample_s: float = 0.02,
                     warmup: int = 2, on_error=None, inner: Optional[int] = None,
                     clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """{provider: [ms per iteration, one per repeat]}, the providers interleaved round-robin.

    The starting provider rotates with the repeat. A provider that raises is dropped from the
    remaining repeats and reported through ``on_error(name, exc)``. ``inner`` fixes the iterations
    per sample (after the warmup) instead of calibrating them to ``min_sample_s``; ``min_sample_s=0``
    times single iterations.
    """
    device = torch.device(device)
    counts: Dict[str, int] = {}
    live = []
    max_inner = 100 if device.type == "cuda" else 1000  # CUDA: each iteration also flushes L2
    for name, step in steps.items():
        try:
            n = calibrate(step, device, min_sample_s=min_sample_s, warmup=warmup, max_inner=max_inner, clock=clock)
            counts[name] = n if inner is None else inner
            live.append(name)
        except Exception as exc:  # a backend that fails is recorded and skipped, never fatal
            if on_error is None:
                raise
            on_error(name, exc)
    out: Dict[str, List[float]] = {name: [] for name in live}
    for r in range(repeats):
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        for name in order:
            if name not in out:
                continue
            try:
                out[name].append(_sample(steps[name], counts[name], device, clock))
            except Exception as exc:
                if on_error is None:
                    raise
                on_error(name, exc)
                del out[name]
        live = [n for n in live if n in out]
    return out


def cuda_peak_bytes(step: Step, device) -> Optional[int]:
    """The CUDA allocator's peak over one iteration, above what was allocated before it."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if step.prep is not None:
        step.prep()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step.run()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)
