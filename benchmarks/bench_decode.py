"""Decoding speed: ``generate()`` with the KV cache on a patched Llama-shape model, tokens/s vs the bare model.

    python -m benchmarks decode [--backends torch cpu] [--repeats 7] [--threads 1] [--new-tokens 32]
                                [--prompt 16] [--device cpu] [--out bench-out/decode]

The model: ``LlamaForCausalLM`` from ``benchmarks.models``' ``llama-small`` config (H=768, 6 layers,
12 heads, 4 KV heads, FFN 2048, vocab 32000, random init), batch 1. The patched variants add 8
``seq_bn`` adapters of reduction factor 16 (width 48) and the ``dynamic`` fusion at every layer
(``fusedadapter.patch``, one variant per backend in ``--backends``); every variant shares the bare
model's parameter tensors. One sample is one greedy ``generate()`` call: a ``--prompt``-token prompt,
then ``--new-tokens`` tokens, one model call each with the KV cache (``min_new_tokens`` = ``max_new_tokens``,
so every call makes the same number of tokens); tokens/s = new tokens / wall time of the call.

Repeats are interleaved (``benchmarks.timing.time_interleaved``: each round runs every variant once,
the first one rotating), so load on a shared machine falls on all alike. Reported per variant:
tokens/s (median, p20, p80 over the repeats) and the ratio to the bare model's tokens/s, the
median of the per-round ratios with their p20-p80 (the target of issue 12: >= 0.85).
Rows (``kernel="decode"``) go to ``OUT/results.{csv,json}`` and the table to ``OUT/summary-decode.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import torch

import fusedadapter as fa

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.env import cpu_name, device_name  # noqa: E402
from benchmarks.providers import Step  # noqa: E402
from benchmarks.results import ResultWriter, make_row  # noqa: E402
from benchmarks.timing import quantiles, time_interleaved  # noqa: E402

N_ADAPTERS = 8
REDUCTION = 16


def build_models(backends, *, device="cpu", seed=0, model="llama-small") -> Dict[str, torch.nn.Module]:
    """{"bare": LlamaForCausalLM, backend: the same weights patched with 8 adapters + fusion, ...}."""
    from transformers import LlamaForCausalLM

    from .models import _config

    torch.manual_seed(seed)
    cfg = _config(model)
    try:
        bare = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    except (TypeError, ValueError):
        bare = LlamaForCausalLM(cfg)
    bare.eval().to(device)
    models = {"bare": bare}
    for backend in backends:
        m = LlamaForCausalLM(cfg) if not hasattr(LlamaForCausalLM, "_from_config") else \
            LlamaForCausalLM._from_config(cfg, attn_implementation=bare.config._attn_implementation)
        m.load_state_dict(bare.state_dict())
        m.eval().to(device)
        cfgs = [fa.AdapterConfig(reduction_factor=REDUCTION) for _ in range(N_ADAPTERS)]
        models[backend] = fa.patch(m, cfgs, fusion="dynamic", placement="seq_bn", backend=backend) or m
        models[backend].eval()
    return models


def decode_steps(models, *, prompt: int, new_tokens: int, device="cpu", seed=1) -> Dict[str, Step]:
    g = torch.Generator().manual_seed(seed)
    vocab = next(iter(models.values())).config.vocab_size
    ids = torch.randint(0, vocab, (1, prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    steps = {}
    for name, model in models.items():
        def run(model=model):
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=0)
            assert out.shape[1] == prompt + new_tokens, out.shape
            return out

        steps[name] = Step(run)
    return steps


def run_decode(backends, *, device="cpu", repeats=7, prompt=16, new_tokens=32, warmup=1, threads=None,
               model="llama-small"):
    """(rows, per-round samples in ms) of the decode benchmark (torch's thread count is restored after)."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_decode(backends, device=device, repeats=repeats, prompt=prompt, new_tokens=new_tokens,
                           warmup=warmup, model=model)
    finally:
        torch.set_num_threads(old_threads)


def _run_decode(backends, *, device, repeats, prompt, new_tokens, warmup, model):
    device = torch.device(device)
    avail = fa.available_backends(device)
    backends = [b for b in backends if avail.get(b) is None]
    models = build_models(backends, device=device, model=model)
    steps = decode_steps(models, prompt=prompt, new_tokens=new_tokens, device=device)
    failed = {}
    samples = time_interleaved(steps, device, repeats=repeats, min_sample_s=0.0, warmup=warmup,
                               on_error=lambda n, e: failed.setdefault(n, e))
    mcfg = models["bare"].config
    base_cfg = dict(model=model, layers=mcfg.num_hidden_layers, hidden=mcfg.hidden_size, n=N_ADAPTERS,
                    reduction_factor=REDUCTION, r=mcfg.hidden_size // REDUCTION,
                    batch=1, prompt=prompt, new_tokens=new_tokens, dtype="float32", threads=torch.get_num_threads(),
                    repeats=repeats, cpu=cpu_name() if device.type == "cpu" else device_name(device),
                    load_avg=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    rows = []

    def row(provider, metric, unit, q, **more):
        return make_row(kernel="decode", provider=provider, mode="generate", metric=metric, unit=unit,
                        x_name="new_tokens", x_value=new_tokens, p20=q.get("p20"), median=q.get("median"),
                        p80=q.get("p80"), config=dict(base_cfg, **more), device=device)

    for name, exc in failed.items():
        rows.append(row(name, "error", "", {}, error=f"{type(exc).__name__}: {exc}"))
    bare = samples.get("bare") or []
    for name, s in samples.items():
        if not s:
            continue
        tps = [new_tokens / (ms * 1e-3) for ms in s]
        rows.append(row(name, "time", "ms", quantiles(s), samples_ms=[round(x, 3) for x in s]))
        rows.append(row(name, "tokens_per_s", "tokens/s", quantiles(tps),
                        samples_tokens_per_s=[round(x, 2) for x in tps]))
        if name != "bare" and bare:
            n = min(len(s), len(bare))
            ratio = list(np.asarray(bare[:n]) / np.asarray(s[:n]))  # tokens/s ratio = inverse time ratio
            rows.append(row(name, "ratio_vs_bare", "x", quantiles(ratio), samples_ratio=[round(x, 4) for x in ratio]))
    return rows, samples


def markdown(rows, command: str) -> str:
    by = {(r["provider"], r["metric"]): r for r in rows}
    providers = [p for p, m in by if m == "tokens_per_s"]
    cfg = rows[0]["config"] if rows else {}
    lines = ["# Decoding with the KV cache: patched Llama-shape model vs bare", "",
             f"`{command}`", "",
             f"LlamaForCausalLM ({cfg.get('model')}) H={cfg.get('hidden')}, {cfg.get('layers')} layers, batch 1, prompt {cfg.get('prompt')} tokens, {cfg.get('new_tokens')} new "
             f"tokens per generate() call (greedy), {cfg.get('dtype')}, {cfg.get('threads')} torch thread(s), "
             f"{cfg.get('repeats')} interleaved repeats; patched: {N_ADAPTERS} seq_bn adapters rf {REDUCTION} + dynamic "
             f"fusion per layer. Device: {rows[0]['device_name'] if rows else '-'}; load average at the end "
             f"{cfg.get('load_avg')}.", "",
             "| variant | tokens/s median | p20 | p80 | ratio vs bare (median of per-round ratios) | p20-p80 |",
             "|---|---|---|---|---|---|"]
    for p in providers:
        t = by[(p, "tokens_per_s")]
        rt = by.get((p, "ratio_vs_bare"))
        ratio = "1 (baseline)" if p == "bare" else (f"{rt['median']:.3f}x" if rt else "-")
        spread = "" if not rt else f"{rt['p20']:.3f}-{rt['p80']:.3f}"
        lines.append(f"| {p} | {t['median']:.1f} | {t['p20']:.1f} | {t['p80']:.1f} | {ratio} | {spread} |")
    errs = [r for r in rows if r["metric"] == "error"]
    lines += [f"- {r['provider']}: error {r['config'].get('error')}" for r in errs]
    lines += ["", "Target (issue 12): patched tokens/s >= 0.85x the bare model's."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks decode", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["torch", "cpu"], help="fused backends to patch with")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench-out/decode")
    ap.add_argument("--model", default="llama-small", choices=["llama-small", "llama-tiny"],
                    help="llama-tiny: H=64, 2 layers (a smoke test of the benchmark itself)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    rows, _ = run_decode(args.backends, device=args.device, repeats=args.repeats, prompt=args.prompt,
                         new_tokens=args.new_tokens, warmup=args.warmup, threads=args.threads, model=args.model)
    out = Path(args.out)
    ResultWriter(out).add(rows)
    command = "python -m benchmarks decode " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    md = markdown(rows, command.strip())
    (out / "summary-decode.md").write_text(md)
    print(md)
    print(f"wrote {out / 'results.json'}, {out / 'summary-decode.md'} ({time.monotonic() - t0:.0f} s)")
    return 0 if not any(r["metric"] == "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
