"""The issue-3 target row with each kernel switch flipped, in one process: ``device_check.sh``'s
``bench-switches`` step.

    python -m benchmarks.devicecheck_switches --out DIR [--budget-s 40] [--repeats 7]

One fusion site (bf16, 16384 tokens, H=768, N=8, r=48, relu; ``benchmarks.providers.setup_site``),
timed with :func:`benchmarks.timing.time_interleaved` (CUDA events, every provider interleaved
round-robin, p20 / median / p80 over the repeats) in the modes ``nograd`` and ``full``:

* ``triton`` once per setting of :data:`SETTINGS` (the module switches of ``kernels/fusion.py``,
  set around each call, so every setting runs in the same process, interleaved with the others):
  ``default``; ``nosplit`` (bf16 w_query without the hi/lo split, FUSEDADAPTER_TRITON_SPLIT_BF16=0);
  ``precast`` (FUSEDADAPTER_TRITON_PRECAST=1); ``presplit`` (FUSEDADAPTER_TRITON_PRESPLIT=1);
  ``gemm2-v2`` (FUSEDADAPTER_TRITON_GEMM2=v2); ``new`` (the three new paths together) and
  ``new-nosplit`` (and no split);
* ``cuda`` with and without its bf16 split (FUSEDADAPTER_CUDA_SPLIT_BF16, read per call) where the
  extension loads; ``torch`` once (the baseline of the ">= 1.5x the torch backend" target).

Autotuning is off here (``FUSEDADAPTER_TRITON_AUTOTUNE=0`` unless set otherwise: each kernel runs
``configs.GPU_DEFAULT``), so each setting costs one compile per kernel variant and the ratios
compare the switch alone; ``bench`` (autotuned) and ``bench-configs-v1`` time the config lists.
Rows: ``results.json`` / ``results.csv`` (``benchmarks.results``), ``config.switch`` naming the
setting, ``rel_err`` of each setting's no-grad output against ``reference``, ``skipped`` rows for
settings the time budget left out (compiles first, then timing; the order of :data:`SETTINGS`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Dict, List

import torch

from fusedadapter.testing import rel_err

from .providers import SiteShape, Step, setup_site
from .results import ResultWriter, make_row
from .timing import quantiles, time_interleaved

KERNEL = "fusion_site"
# setting -> (kernels.fusion attributes, environment); "nosplit" leaves bf16 out of SPLIT_WEIGHTS_QUERY
SETTINGS: Dict[str, tuple] = {
    "default": ({}, {}),
    "nosplit": ({"SPLIT_WEIGHTS_QUERY": "fp16-only"}, {}),
    "gemm2-v2": ({"GEMM2": "v2"}, {}),
    "presplit": ({"PRESPLIT": True}, {}),
    "precast": ({"PRECAST": True}, {}),
    "new": ({"GEMM2": "v2", "PRESPLIT": True, "PRECAST": True}, {}),
    "new-nosplit": ({"GEMM2": "v2", "PRECAST": True, "SPLIT_WEIGHTS_QUERY": "fp16-only"}, {}),
}
CUDA_SETTINGS = {"default": {}, "nosplit": {"FUSEDADAPTER_CUDA_SPLIT_BF16": "0"}}


@contextlib.contextmanager
def switched(attrs: dict, env: dict):
    """``kernels.fusion`` attributes and environment variables set for the block, restored after."""
    from fusedadapter.kernels import fusion

    attrs = {k: ({torch.float16} if v == "fp16-only" else v) for k, v in attrs.items()}
    old_attrs = {k: getattr(fusion, k) for k in attrs}
    old_env = {k: os.environ.get(k) for k in env}
    try:
        for k, v in attrs.items():
            setattr(fusion, k, v)
        os.environ.update(env)
        yield
    finally:
        for k, v in old_attrs.items():
            setattr(fusion, k, v)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wrap(step: Step, attrs: dict, env: dict) -> Step:
    def run():
        with switched(attrs, env):
            return step.run()

    def prep():
        with switched(attrs, env):
            step.prep()

    return Step(run, prep if step.prep is not None else None)


def _providers(case, settings: List[str], with_cuda: bool):
    """{label: (provider, setting, attrs, env)}: triton per setting, cuda with/without its split, torch."""
    out = {}
    for s in settings:
        attrs, env = SETTINGS[s]
        out[f"triton[{s}]"] = ("triton", s, attrs, env)
    if with_cuda:
        for s, env in CUDA_SETTINGS.items():
            out[f"cuda[{s}]"] = ("cuda", s, {}, env)
    out["torch"] = ("torch", "default", {}, {})
    return out


def run(spec: SiteShape, device, settings: List[str], modes: List[str], *, repeats: int, budget_s: float,
        min_sample_s: float = 0.02, with_cuda: bool = True, out_dir=None) -> List[dict]:
    t0 = time.monotonic()
    device = torch.device(device)
    case = setup_site(spec, device)
    rows: List[dict] = []
    autotune = os.environ.get("FUSEDADAPTER_TRITON_AUTOTUNE", "1") != "0"

    def row(provider, setting, mode, metric, unit, q, **more):
        cfg = dict(spec.to_dict(), switch=setting, repeats=repeats, autotune=autotune, **more)
        return make_row(kernel=KERNEL, provider=provider, mode=mode, metric=metric, unit=unit, x_name="tokens",
                        x_value=spec.tokens, p20=q.get("p20"), median=q.get("median"), p80=q.get("p80"), config=cfg,
                        device=device)

    if with_cuda:
        try:
            case.output("cuda")
        except Exception as exc:  # the extension did not build or load: recorded, the rest goes on
            rows.append(row("cuda", "default", "nograd", "error", "", {}, error=f"{type(exc).__name__}: {exc}"[:2000]))
            with_cuda = False
    provs = _providers(case, settings, with_cuda)
    ref = case.output("reference")
    live = {}
    for label, (prov, setting, attrs, env) in provs.items():  # compiles (and correctness) first, in order
        if time.monotonic() - t0 > budget_s:
            rows.append(row(prov, setting, "-", "skipped", "", {}, error="time budget exhausted before its compile"))
            continue
        try:
            with switched(attrs, env):
                err = rel_err(case.output(prov), ref)
            rows.append(row(prov, setting, "nograd", "rel_err", "", {"p20": err, "median": err, "p80": err}))
            live[label] = provs[label]
        except Exception as exc:
            rows.append(row(prov, setting, "nograd", "error", "", {}, error=f"{type(exc).__name__}: {exc}"[:2000]))
    for mode in modes:
        steps, failed = {}, {}
        for label, (prov, setting, attrs, env) in live.items():
            if time.monotonic() - t0 > budget_s:
                rows.append(row(prov, setting, mode, "skipped", "", {}, error="time budget exhausted"))
                continue
            try:
                steps[label] = _wrap(case.step(prov, mode), attrs, env)
            except Exception as exc:
                failed[label] = exc
        samples = time_interleaved(steps, device, repeats=repeats, min_sample_s=min_sample_s, warmup=2,
                                   on_error=lambda n, e: failed.setdefault(n, e))
        for label, exc in failed.items():
            prov, setting = live[label][:2]
            rows.append(row(prov, setting, mode, "error", "", {}, error=f"{type(exc).__name__}: {exc}"[:2000]))
        for label, s in samples.items():
            if s:
                prov, setting = live[label][:2]
                rows.append(row(prov, setting, mode, "time", "ms", quantiles(s), samples_ms=[round(x, 6) for x in s]))
    if out_dir is not None:
        ResultWriter(out_dir).add(rows)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for results.json / results.csv")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--reduction", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--modes", nargs="+", default=["nograd", "full"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-sample-s", type=float, default=0.02)
    ap.add_argument("--budget-s", type=float, default=40.0, help="start no compile or timing after this many seconds")
    ap.add_argument("--no-cuda", action="store_true", help="leave the cuda backend out")
    args = ap.parse_args(argv)
    if "fusedadapter.kernels.fusion" not in sys.modules:  # read when the kernels are defined (first Triton call)
        os.environ.setdefault("FUSEDADAPTER_TRITON_AUTOTUNE", "0")
    spec = SiteShape(tokens=args.tokens, hidden=args.hidden, n=args.n, reduction=args.reduction, dtype=args.dtype)
    rows = run(spec, args.device, args.settings, args.modes, repeats=args.repeats, budget_s=args.budget_s,
               min_sample_s=args.min_sample_s, with_cuda=not args.no_cuda and args.device.startswith("cuda"),
               out_dir=args.out)
    print_rows(rows, "switch")
    return 0


def print_rows(rows, *config_keys) -> None:
    """One console line per row: provider, the ``config_keys`` values, mode, metric, median or error."""
    for r in rows:
        what = f"{r['median']:.4f} {r['unit']}" if r["median"] is not None else r["config"].get("error", "")
        keys = "".join(f"{r['config'].get(k, '-')!s:13s}" for k in config_keys)
        print(f"{r['provider']:8s} {keys}{r['mode']:7s} {r['metric']:9s} {what}")


if __name__ == "__main__":
    sys.exit(main())
