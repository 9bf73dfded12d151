"""Layer level: one fusion site per point, every provider interleaved, every mode.

Rows per point (``kernel="fusion_site"``):

- ``time`` (ms): quantiles over the interleaved repeats, per provider and mode;
- ``rel_err`` (no unit): max|y - y_ref| / max|y_ref| of the no-grad output against ``reference``
  at the same dtype (a fast provider that computes something else is not fast);
- on CPU, ``saved_bytes`` (mode ``forward``): bytes autograd saves for backward in a training
  forward, and, in a fresh subprocess per provider (one process's peak never goes down),
  ``peak_rss`` and ``peak_rss_delta`` (bytes);
- on CUDA, ``cuda_peak`` (bytes above what was allocated before the iteration), and for the
  forward modes ``roofline_fraction`` (roofline time / measured time, see :mod:`.roofline`),
  with the rates as ``matmul_tflops`` / ``copy_gbps`` rows;
- ``error`` rows (median empty, the message in ``config["error"]``) for a provider that failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fusedadapter.testing import rel_err

from .env import REPO
from .providers import GRAD_MODES, MODES, SiteShape, setup_site, site_providers
from .results import Row, make_row
from .roofline import Rates, measure_rates, roofline_ms
from .timing import cuda_peak_bytes, quantiles, time_interleaved

__all__ = ["Point", "LayerOptions", "run_layer", "rss_worker"]

KERNEL = "fusion_site"


@dataclass(frozen=True)
class Point:
    spec: SiteShape
    x_name: str = "tokens"
    modes: Optional[Tuple[str, ...]] = None   # None: the run's modes (LayerOptions.modes)

    @property
    def x_value(self):
        return {"tokens": self.spec.tokens, "N": self.spec.n, "hidden": self.spec.hidden,
                "reduction": self.spec.reduction, "dtype": self.spec.dtype}[self.x_name]


@dataclass
class LayerOptions:
    device: str = "cpu"
    providers: Optional[List[str]] = None
    modes: Sequence[str] = MODES
    repeats: int = 5
    min_sample_s: float = 0.02
    warmup: int = 2
    rss: str = "max"            # "none" | "max" (the point with the most tokens) | "all"
    rss_modes: Sequence[str] = ("nograd", "full")
    roofline: bool = True       # CUDA only
    budget_s: Optional[float] = None   # stop starting new points after this many seconds
    allow_interpreter: bool = False
    progress: bool = True
    threads: Optional[int] = None      # torch.set_num_threads for the run (and its RSS subprocesses)
    extra_config: Dict[str, object] = field(default_factory=dict)


def _config(spec: SiteShape, opts: LayerOptions, **more) -> dict:
    cfg = spec.to_dict()
    cfg.update(repeats=opts.repeats, threads=torch.get_num_threads(), adapters_version=_adapters_version(),
               **opts.extra_config)
    cfg.update(more)
    return cfg


def _adapters_version() -> str:
    from .env import versions

    return versions()["adapters"]


def _rows(point: Point, provider: str, mode: str, metric: str, unit: str, q: Dict[str, float], opts: LayerOptions,
          **more) -> Row:
    return make_row(kernel=KERNEL, provider=provider, mode=mode, metric=metric, unit=unit, x_name=point.x_name,
                    x_value=point.x_value, p20=q.get("p20"), median=q.get("median"), p80=q.get("p80"),
                    config=_config(point.spec, opts, **more), device=opts.device)


def _single(v) -> Dict[str, float]:
    return {"p20": v, "median": v, "p80": v}


def _error_row(point: Point, provider: str, mode: str, exc: BaseException, opts: LayerOptions) -> Row:
    msg = f"{type(exc).__name__}: {exc}"
    return _rows(point, provider, mode, "error", "", {}, opts, error=msg[:2000])


def rss_points(points: Sequence[Point], how: str) -> List[Point]:
    if how == "none":
        return []
    if how == "all":
        return list(points)
    # "max": the one point with the most tokens (then the most adapters, the widest hidden size)
    return [max(points, key=lambda p: (p.spec.tokens, p.spec.n, p.spec.hidden, p.spec.bottleneck))] if points else []


def _run_rss(point: Point, provider: str, mode: str, opts: LayerOptions) -> Dict[str, int]:
    payload = json.dumps({"spec": point.spec.to_dict(), "provider": provider, "mode": mode, "device": opts.device,
                          "threads": torch.get_num_threads()})
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "_rss", payload], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_worker(payload: str) -> Dict[str, int]:
    """In a fresh process: warm the provider up on a 1-token site (libraries, kernels), build the
    measured site, reset the peak RSS, run two iterations; report peak and peak above the start."""
    d = json.loads(payload)
    spec = SiteShape.from_dict(d["spec"])
    provider, mode, device = d["provider"], d["mode"], d["device"]
    torch.set_num_threads(int(d["threads"]))
    from .env import peak_rss_bytes, reset_peak_rss, rss_bytes

    tiny = setup_site(SiteShape.from_dict({**d["spec"], "tokens": 1}), device)
    step = tiny.step(provider, mode)
    if step.prep:
        step.prep()
    step.run()
    del tiny, step
    case = setup_site(spec, device)
    step = case.step(provider, mode)
    before = rss_bytes()
    reset_ok = reset_peak_rss()
    for _ in range(2):
        if step.prep:
            step.prep()
        step.run()
    peak = peak_rss_bytes()
    return {"peak_rss": peak, "peak_rss_delta": peak - before, "rss_before": before, "hwm_reset": reset_ok}


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
    except Exception:  # tqdm missing: a silent stand-in
        class _Bar:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Bar()


def run_layer(points: Sequence[Point], opts: LayerOptions, sink=None) -> Tuple[List[Row], Dict[str, str]]:
    """Measure every point; returns (rows, {provider: why skipped}). ``sink(rows)`` gets each
    point's rows as soon as they exist (so a killed run keeps what it measured)."""
    device = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    providers, skipped = site_providers(device, opts.providers, allow_interpreter=opts.allow_interpreter)
    all_rows: List[Row] = []

    def emit(rows):
        all_rows.extend(rows)
        if sink is not None:
            sink(rows)

    rates: Dict[str, Rates] = {}
    rss_jobs: List[Tuple[Point, str, str]] = []
    t_start = time.monotonic()
    rss_set = {p.spec.key() for p in rss_points(points, opts.rss)} if device.type == "cpu" else set()
    bar = _progress(len(points), opts.progress, "fusion sites")
    for point in points:
        spec = point.spec
        if opts.budget_s is not None and time.monotonic() - t_start > opts.budget_s:
            emit([_rows(point, "-", "-", "skipped", "", {}, opts, error="time budget exhausted")])
            bar.update(1)
            continue
        bar.set_postfix_str(spec.label())
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        opts.extra_config["load_avg_1m"] = None if load is None else round(load, 2)
        rows: List[Row] = []
        try:
            case = setup_site(spec, device)
        except Exception as exc:
            emit([_error_row(point, "reference", "setup", exc, opts)])
            bar.update(1)
            continue
        live = list(providers)
        # correctness rides along: every provider's no-grad output against the reference's
        try:
            ref_out = case.output("reference")
        except Exception as exc:
            ref_out = None
            rows.append(_error_row(point, "reference", "nograd", exc, opts))
        for p in list(live):
            try:
                out = case.output(p)
                if ref_out is not None:
                    rows.append(_rows(point, p, "nograd", "rel_err", "", _single(rel_err(out, ref_out)), opts))
            except Exception as exc:
                rows.append(_error_row(point, p, "nograd", exc, opts))
                live.remove(p)
        if device.type == "cuda" and opts.roofline and spec.dtype not in rates:
            try:
                rates[spec.dtype] = measure_rates(device, spec.torch_dtype)
                rd = rates[spec.dtype].to_dict()
                rows.append(_rows(point, "device", "-", "matmul_tflops", "TFLOP/s", _single(rd["matmul_tflops"]), opts,
                                  matmul_dtype=rd["matmul_dtype"]))
                rows.append(_rows(point, "device", "-", "copy_gbps", "GB/s", _single(rd["copy_gbps"]), opts))
            except Exception as exc:
                rows.append(_error_row(point, "device", "roofline", exc, opts))
        timed: Dict[str, object] = {}
        modes = [m for m in opts.modes if point.modes is None or m in point.modes]
        for mode in modes:
            if not live:
                break
            steps = {}
            for p in list(live):
                try:
                    steps[p] = case.step(p, mode)
                except Exception as exc:
                    rows.append(_error_row(point, p, mode, exc, opts))
            failed: Dict[str, BaseException] = {}
            samples = time_interleaved(steps, device, repeats=opts.repeats, min_sample_s=opts.min_sample_s,
                                       warmup=opts.warmup, on_error=lambda n, e: failed.setdefault(n, e))
            for p, exc in failed.items():
                rows.append(_error_row(point, p, mode, exc, opts))
            for p, s in samples.items():
                if len(s) == 0:
                    continue
                q = quantiles(s)
                rows.append(_rows(point, p, mode, "time", "ms", q, opts, samples_ms=[round(x, 6) for x in s]))
                if device.type == "cuda" and mode in ("nograd", "forward") and spec.dtype in rates:
                    try:
                        roof = roofline_ms(spec, case.folded_weight_bytes(), rates[spec.dtype])
                        frac = {"p20": roof / q["p80"], "median": roof / q["median"], "p80": roof / q["p20"]}
                        rows.append(_rows(point, p, mode, "roofline_fraction", "fraction", frac, opts,
                                          roofline_ms=roof, **rates[spec.dtype].to_dict()))
                    except Exception as exc:
                        rows.append(_error_row(point, p, mode, exc, opts))
            timed.update(samples)
            if device.type == "cuda":  # memory, outside the timed loop
                for p in samples:
                    try:
                        peak = cuda_peak_bytes(steps[p], device)
                        rows.append(_rows(point, p, mode, "cuda_peak", "bytes", _single(peak), opts))
                    except Exception as exc:
                        rows.append(_error_row(point, p, mode, exc, opts))
            if spec.key() in rss_set and mode in opts.rss_modes:
                rss_jobs.extend((point, p, mode) for p in samples)
        if device.type == "cpu" and any(m in GRAD_MODES for m in modes):
            for p in timed:
                try:
                    rows.append(_rows(point, p, "forward", "saved_bytes", "bytes", _single(case.saved_bytes(p)), opts))
                except Exception as exc:
                    rows.append(_error_row(point, p, "forward", exc, opts))
        del case
        emit(rows)
        bar.update(1)
    bar.close()
    if rss_jobs:
        emit(_rss_rows(rss_jobs, opts))
    return all_rows, skipped


def _rss_rows(jobs, opts: LayerOptions) -> List[Row]:
    """Peak RSS of each (point, provider, mode) in its own fresh process, after all timing (two
    at a time: memory does not mind sharing the CPU)."""
    from concurrent.futures import ThreadPoolExecutor

    rows: List[Row] = []
    bar = _progress(len(jobs), opts.progress, "peak RSS (subprocesses)")

    def one(job):
        point, p, mode = job
        try:
            r = _run_rss(point, p, mode, opts)
            return [_rows(point, p, mode, "peak_rss", "bytes", _single(r["peak_rss"]), opts, hwm_reset=r["hwm_reset"]),
                    _rows(point, p, mode, "peak_rss_delta", "bytes", _single(r["peak_rss_delta"]), opts,
                          hwm_reset=r["hwm_reset"])]
        except Exception as exc:
            return [_error_row(point, p, mode, exc, opts)]
        finally:
            bar.update(1)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for out in pool.map(one, jobs):
            rows.extend(out)
    bar.close()
    return rows

