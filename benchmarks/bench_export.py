"""ONNX Runtime time of the exported fused model against the exported bare model (CPU, float32).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks export [--repeats 5] [--json out.json] [--md out.md]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export.py ...     # the same

A BERT-base-shaped ``BertModel`` (random init, 12 blocks, H=768) and the same model after
``fusedadapter.patch`` with 8 ``seq_bn`` adapters of width 48 (reduction factor 16) and the
``dynamic`` fusion, both exported with the standard call ``torch.onnx.export(..., dynamo=True)``
(dynamic batch and sequence axes, onnxscript's optimizer on) and run by ONNX Runtime's CPU
provider with one intra-op and one inter-op thread (the machine is shared), at B=8, S=128.
The fusion weights are perturbed away from AdapterHub's init (as trained weights would be).

Checked first (docs/algorithm.md §4 oracle, ``fusedadapter.testing``): the exported fused file at B x S in
{1x8, 4x128} against the eager reference (float32 ``ref``, float64 ``truth``).

Timed, interleaved (every round runs every variant once, the first one rotating, so a busy
machine slows all alike: :func:`benchmarks.timing.time_interleaved`): ``ort_fused``, ``ort_bare``, and PyTorch (one thread) ``torch_bare``,
``torch_fused`` (the patched model, backend auto) and ``torch_reference`` (the patched model on
the eager reference backend, AdapterHub's op sequence). Overheads are the median (p20, p80) over
rounds of each round's ``variant / bare`` ratio minus one (ORT variants over ``ort_bare``, PyTorch
ones over ``torch_bare``), and "of mins" (best over best). A benchmark script, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import warnings

import torch

if __package__ in (None, ""):  # run as a script: make the repository's `benchmarks` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fusedadapter as fa  # noqa: E402
from benchmarks.models import bert  # noqa: E402
from benchmarks.providers import Step  # noqa: E402
from benchmarks.timing import paired_quantiles, quantiles, time_interleaved  # noqa: E402
from fusedadapter.export import custom_domain_ops  # noqa: E402
from fusedadapter.patching import fusion_sites  # noqa: E402
from fusedadapter.testing import oracle_check, perturb_  # noqa: E402

B, S, N_ADAPTERS, RF = 8, 128, 8, 16


class Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def inputs(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, s // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def build(layers=12, hidden=768):
    bare = bert(layers, hidden, seed=0).eval()  # BERT-base at the defaults
    fused = fa.patch(copy.deepcopy(bare), {f"task{i}": fa.AdapterConfig(reduction_factor=RF) for i in range(N_ADAPTERS)},
                     fusion="dynamic")
    g = torch.Generator().manual_seed(1)
    for _, _, site in fusion_sites(fused):
        perturb_(site, g)
    return Hidden(bare).eval(), Hidden(fused).eval()


def export(model, path):
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (), path, kwargs=inputs(2, 16), dynamo=True, verbose=False,
                          dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}})
    return time.perf_counter() - t0


def session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ort_run(sess, x):
    return torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in x.items()})[0])


def parity(fused, sess):
    rows = {}
    for b, s in [(1, 8), (4, 128)]:
        x = inputs(b, s, seed=b * s)
        got = ort_run(sess, x)
        outs = []
        for dt in (torch.float32, torch.float64):
            m = copy.deepcopy(fused).to(dt)
            fa.patching.set_backend(m.model, "reference")
            with torch.no_grad():
                outs.append(m(**x))
        ok, err, bound = oracle_check(got, outs[0], outs[1], torch.float32)
        rows[f"{b}x{s}"] = {"passed": ok, "err": err, "bound": bound}
        del outs
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--variants", default="ort_bare,ort_fused,torch_bare,torch_fused,torch_reference",
                    help="comma-separated subset to time (ort_bare and ort_fused always)")
    ap.add_argument("--no-parity", action="store_true", help="skip the oracle check of the exported file")
    ap.add_argument("--layers", type=int, default=12, help="BERT blocks (default 12: BERT-base)")
    ap.add_argument("--hidden", type=int, default=768, help="BERT width (default 768)")
    ap.add_argument("--batch", type=int, default=B)
    ap.add_argument("--seq", type=int, default=S)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import onnx
    import onnxruntime as ort

    bare, fused = build(args.layers, args.hidden)
    tmp = tempfile.mkdtemp(prefix="bench_export_")
    paths = {"bare": os.path.join(tmp, "bare.onnx"), "fused": os.path.join(tmp, "fused.onnx")}
    export_s = {k: export(m, paths[k]) for k, m in (("bare", bare), ("fused", fused))}
    # torch.onnx writes the weights next to the graph (<name>.onnx.data)
    sizes = {k: sum(os.path.getsize(q) for q in (p, p + ".data") if os.path.exists(q)) for k, p in paths.items()}
    custom = custom_domain_ops(onnx.load(paths["fused"], load_external_data=False))
    sessions = {k: session(p) for k, p in paths.items()}
    par = None if args.no_parity else parity(fused, sessions["fused"])
    print("parity", json.dumps(par), "custom-domain nodes", custom, flush=True)

    x = inputs(args.batch, args.seq, seed=7)
    ref_model = copy.deepcopy(fused)
    fa.patching.set_backend(ref_model.model, "reference")
    steps = {
        "ort_bare": Step(run=lambda: sessions["bare"].run(None, {k: v.numpy() for k, v in x.items()})),
        "ort_fused": Step(run=lambda: sessions["fused"].run(None, {k: v.numpy() for k, v in x.items()})),
        "torch_bare": Step(run=lambda: bare(**x)),
        "torch_fused": Step(run=lambda: fused(**x)),
        "torch_reference": Step(run=lambda: ref_model(**x)),
    }
    wanted = set(args.variants.split(",")) | {"ort_bare", "ort_fused"}
    steps = {k: v for k, v in steps.items() if k in wanted}
    with torch.no_grad():  # one warm-up call each, then one call per variant and round, interleaved
        ms = time_interleaved(steps, "cpu", repeats=args.repeats, min_sample_s=0.0, warmup=1)
    times = {k: [t / 1e3 for t in v] for k, v in ms.items()}

    def overhead(name, base):
        if name not in times or base not in times:
            return None
        q = paired_quantiles(times[name], times[base])
        return {"median": q["median"] - 1, "p20": q["p20"] - 1, "p80": q["p80"] - 1,
                "of_mins": min(times[name]) / min(times[base]) - 1}

    result = {
        "shape": {"model": "bert-base (random init)" if (args.layers, args.hidden) == (12, 768)
                  else f"bert L={args.layers} H={args.hidden} (random init)", "batch": args.batch, "seq": args.seq,
                  "adapters": N_ADAPTERS, "width": args.hidden // RF, "fusion": "dynamic", "dtype": "float32"},
        "threads": {"torch": torch.get_num_threads(), "ort_intra_op": 1, "ort_inter_op": 1},
        "repeats": args.repeats,
        "median_s": {k: quantiles(v)["median"] for k, v in times.items()},
        "min_s": {k: min(v) for k, v in times.items()},
        "overhead": {"ort_fused/ort_bare": overhead("ort_fused", "ort_bare"),
                     "torch_fused/torch_bare": overhead("torch_fused", "torch_bare"),
                     "torch_reference/torch_bare": overhead("torch_reference", "torch_bare")},
        "ort_fused_vs_torch_reference_speedup": paired_quantiles(times["torch_reference"], times["ort_fused"])["median"]
        if "torch_reference" in times else None,
        "export_s": export_s,
        "onnx_bytes": sizes,
        "custom_domain_nodes": custom,
        "parity": par,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "onnxscript": __import__("onnxscript").__version__,
                     "transformers": __import__("transformers").__version__},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "command": "OMP_NUM_THREADS=1 python benchmarks/bench_export.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    if args.md:
        o = result["overhead"]

        def pct(d):
            if d is None:
                return "not timed"
            return f"{100 * d['median']:+.1f}% ({100 * d['p20']:+.1f}..{100 * d['p80']:+.1f}; of mins {100 * d['of_mins']:+.1f}%)"

        med = result["median_s"]
        lines = [
            f"| what (B={args.batch}, S={args.seq}, 8 adapters r={args.hidden // RF}, fp32, 1 thread, {args.repeats} interleaved rounds) | median time | "
            f"overhead over bare, median (p20..p80; of mins) |",
            "| --- | --- | --- |",
            f"| ONNX Runtime, exported bare | {med['ort_bare'] * 1e3:.0f} ms | |",
            f"| ONNX Runtime, exported fused | {med['ort_fused'] * 1e3:.0f} ms | {pct(o['ort_fused/ort_bare'])} |",
        ]
        for key, label, over in (("torch_bare", "PyTorch bare", None),
                                 ("torch_fused", "PyTorch fused (backend auto)", "torch_fused/torch_bare"),
                                 ("torch_reference", "PyTorch eager reference (AdapterHub's op sequence)",
                                  "torch_reference/torch_bare")):
            if key in med:
                lines.append(f"| {label} | {med[key] * 1e3:.0f} ms | {pct(o[over]) if over else ''} |")
        with open(args.md, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
