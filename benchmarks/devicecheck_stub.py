"""Dry-run stubs of ``device_check.sh``'s GPU steps: ``python benchmarks/devicecheck_stub.py STEP WORKDIR``.

With ``DEVICE_CHECK_DRY_RUN=1`` (a CPU machine) each GPU step of the script runs this instead, and
it writes the files that step writes in a real run, in the same places and formats (its log is
its standard output, which the script redirects as it redirects the real step's), so that the
summary and the packing run on them as they would on a GPU: a JUnit report and log (tests-*),
the build and spill logs, for ``bench`` the result rows (written by the real
``benchmarks.results.ResultWriter``), ``skipped.json``, ``summary.md`` and the plots (written by
the real ``benchmarks.report``), and for ``bench-graphs``, ``bench-switches`` and
``bench-configs-v1`` the rows of ``benchmarks.devicecheck_graphs`` / ``devicecheck_switches`` /
``benchmarks gpu`` (results.json, results.csv, skipped.json). Every stub row and test case says it is a stub; none is a
measurement. Run as a file (not ``-m benchmarks...``) so that the test stubs need no torch import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from xml.sax.saxutils import quoteattr

REPO = Path(__file__).resolve().parent.parent
STUB_NOTE = "dry run stub (DEVICE_CHECK_DRY_RUN=1): not a measurement"

# The test cases a real run reports, one per group the device check covers (names as pytest writes them).
TEST_CASES = {
    "tests-triton": [
        ("tests.test_triton", "test_gpu_parity_small_sites[torch.bfloat16-train]"),
        ("tests.test_triton", "test_gpu_parity_big_shapes[h768_n8]"),
        ("tests.test_triton", "test_gpu_autotune"),
        ("tests.test_triton", "test_gpu_hash_mask_matches_cuda_torch"),
        ("tests.test_gpu_triton", "test_gpu_adapter_mask_parity[bf16-train-token]"),
        ("tests.test_gpu_triton", "test_gpu_every_config[0]"),
        ("tests.test_gpu_triton", "test_gpu_numerics[test_adversarially_large_logits_do_not_overflow]"),
        ("tests.test_gpu_triton", "test_gpu_switch_sides[new-bf16]"),
        ("tests.test_gpu_graphs", "test_reduce_overhead_compile_follows_masks_and_weights[triton]"),
        ("tests.test_gpu_graphs", "test_graph_by_hand_replays_eager_and_takes_copied_inputs[cuda]"),
        ("tests.test_triton_grouped", "test_half_precision_on_a_gpu[torch.bfloat16]"),
    ],
    "tests-cuda": [
        ("tests.test_native", "test_cuda_parity[torch.bfloat16-train]"),
        ("tests.test_native", "test_cuda_gradcheck_opcheck_and_dropout_replay"),
        ("tests.test_native", "test_cuda_sources_compile"),
        ("tests.test_gpu_graphs", "test_graph_by_hand_cuda_backend"),
    ],
}


def _junit(path: Path, cases) -> None:
    body = []
    for cls, name in cases:
        skip = name == "test_cuda_sources_compile"  # skipped on a CUDA machine (the build step compiles)
        inner = (f'<skipped type="pytest.skip" message={quoteattr("stub: skipped where CUDA is present")}/>'
                 if skip else f"<system-out>{STUB_NOTE}</system-out>")
        body.append(f'    <testcase classname={quoteattr(cls)} name={quoteattr(name)} time="0.001">{inner}</testcase>')
    skipped = sum("test_cuda_sources_compile" == n for _, n in cases)
    path.write_text('<?xml version="1.0" encoding="utf-8"?>\n<testsuites name="pytest tests">\n'
                    f'  <testsuite name="pytest" errors="0" failures="0" skipped="{skipped}" tests="{len(cases)}" '
                    'time="0.01" hostname="dry-run">\n' + "\n".join(body) + "\n  </testsuite>\n</testsuites>\n")


def _tests(step: str, work: Path) -> None:
    tag = step.split("-", 1)[1]
    _junit(work / f"pytest-{tag}.xml", TEST_CASES[step])
    print(f"{len(TEST_CASES[step])} stub test cases")


def _spills(work: Path) -> None:
    row = {"kernel": "fwd_gemm1", "variant": "bf16 shared-x eval relu", "target": True, "shared": 0,
           "config": {"BLOCK_M": 64, "BLOCK_R": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
           "spill_stores": 0, "spill_loads": 0, "stack_frame": 0, "stub": True}
    summary = {"compiled": 1, "spilling": 0, "target_spilling": [], "ptxas_missing": [], "arch": 90,
               "triton": "stub", "stub": True}
    (work / "spills.json").write_text(json.dumps({"rows": [row], "summary": summary}, indent=1))


def _bench(work: Path) -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.devicecheck import TARGET
    from benchmarks.report import markdown_summary, write_plots
    from benchmarks.results import ResultWriter, make_row

    out = work / "bench"
    writer = ResultWriter(out)
    rows = []
    # stub times (ms) per provider and mode, at the target point and two more token counts (for a plot)
    stub_ms = {"reference": 10.0, "torch": 1.0, "triton": 0.4, "cuda": 0.5}
    for tokens in (1024, 4096, TARGET["tokens"]):
        cfg = dict(TARGET, tokens=tokens, stub=True, note=STUB_NOTE)
        for prov, ms in stub_ms.items():
            for mode, f in (("nograd", 1.0), ("forward", 1.2), ("backward", 2.0), ("full", 3.2)):
                t = ms * f * tokens / TARGET["tokens"]
                rows.append(make_row(kernel="fusion_site", provider=prov, mode=mode, metric="time", unit="ms",
                                     x_name="tokens", x_value=tokens, p20=0.95 * t, median=t, p80=1.05 * t,
                                     config=cfg))
            if prov in ("triton", "cuda"):
                rows.append(make_row(kernel="fusion_site", provider=prov, mode="nograd", metric="roofline_fraction",
                                     unit="fraction", x_name="tokens", x_value=tokens, p20=0.5, median=0.5, p80=0.5,
                                     config=dict(cfg, roofline_ms=0.5 * ms * tokens / TARGET["tokens"])))
    writer.add(rows)
    skipped = {"adapterhub": "stub: `adapters` is not installed on the GPU machine"}
    (out / "skipped.json").write_text(json.dumps(skipped, indent=1))
    plots = write_plots(rows, out)
    md = markdown_summary(rows, title="fusedadapter benchmark: gpu (DRY RUN STUB)", command="benchmarks/devicecheck_stub.py bench",
                          skipped=skipped, plots=plots, notes=[STUB_NOTE])
    (out / "summary.md").write_text(md)
    print(f"wrote {len(rows)} stub rows, {len(plots)} plot(s)")


def _writer_rows(out: Path, rows) -> None:
    from benchmarks.results import ResultWriter

    ResultWriter(out).add(rows)
    (out / "skipped.json").write_text("{}")


def _switches(work: Path) -> None:
    """bench-switches: the target row per setting (benchmarks.devicecheck_switches' rows, stub times)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.devicecheck import TARGET
    from benchmarks.devicecheck_switches import CUDA_SETTINGS, SETTINGS
    from benchmarks.results import make_row

    rows = []
    labels = [("triton", s) for s in SETTINGS] + [("cuda", s) for s in CUDA_SETTINGS] + [("torch", "default")]
    for i, (prov, setting) in enumerate(labels):
        cfg = dict(TARGET, switch=setting, stub=True, note=STUB_NOTE)
        rows.append(make_row(kernel="fusion_site", provider=prov, mode="nograd", metric="rel_err", unit="",
                             x_name="tokens", x_value=TARGET["tokens"], p20=1e-3, median=1e-3, p80=1e-3, config=cfg))
        for mode, f in (("nograd", 1.0), ("full", 3.2)):
            t = (1.0 if prov == "torch" else 0.4 + 0.01 * i) * f
            rows.append(make_row(kernel="fusion_site", provider=prov, mode=mode, metric="time", unit="ms",
                                 x_name="tokens", x_value=TARGET["tokens"], p20=0.95 * t, median=t, p80=1.05 * t,
                                 config=cfg))
    _writer_rows(work / "bench-switches", rows)
    print(f"wrote {len(rows)} stub rows")


def _configs_v1(work: Path) -> None:
    """bench-configs-v1: the bench stub's target rows for triton and torch (no plots)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.results import load_rows

    rows = [dict(r, config=dict(r["config"], switch="configs-v1")) for r in load_rows(work / "bench" / "results.json")
            if r["provider"] in ("triton", "torch") and r["mode"] in ("nograd", "full") and r["metric"] == "time"
            and r["config"].get("tokens") == 16384]
    _writer_rows(work / "bench-configs-v1", rows)
    print(f"wrote {len(rows)} stub rows")


def _graphs(work: Path) -> None:
    """bench-graphs: BERT-base rows as benchmarks.devicecheck_graphs writes them (stub times)."""
    sys.path.insert(0, str(REPO))
    from benchmarks.devicecheck_graphs import KERNEL, TARGET_OVERHEAD
    from benchmarks.results import make_row

    cfg = dict(batch=8, seq=128, layers=12, hidden=768, n=8, r=48, dtype="bfloat16", stub=True, note=STUB_NOTE)
    rows = []
    stub_ms = {("bare", "eager"): 4.0, ("bare", "graph"): 3.0, ("auto", "eager"): 4.3, ("auto", "graph"): 3.2,
               ("triton", "eager"): 4.3, ("triton", "graph"): 3.2}
    for (prov, mode), t in stub_ms.items():
        rows.append(make_row(kernel=KERNEL, provider=prov, mode=mode, metric="time", unit="ms", x_name="tokens",
                             x_value=1024, p20=0.98 * t, median=t, p80=1.02 * t, config=cfg))
        if prov != "bare":
            ov = t / stub_ms[("bare", mode)] - 1
            rows.append(make_row(kernel=KERNEL, provider=prov, mode=mode, metric="overhead", unit="fraction",
                                 x_name="tokens", x_value=1024, p20=ov, median=ov, p80=ov,
                                 config=dict(cfg, target=TARGET_OVERHEAD, met=ov <= TARGET_OVERHEAD)))
        if mode == "graph":
            rows.append(make_row(kernel=KERNEL, provider=prov, mode=mode, metric="rel_err", unit="", x_name="tokens",
                                 x_value=1024, p20=0.0, median=0.0, p80=0.0, config=dict(cfg, against="eager")))
    _writer_rows(work / "bench-graphs", rows)
    print(f"wrote {len(rows)} stub rows")


def _multitask(work: Path, ks=(4, 2, 8), file_name="results.json", mode="serve") -> None:
    """bench-multitask: benchmarks/bench_multitask.py's JSON (stub times) for K = 4, 2, 8 (and
    bench-multitask-train's, K = 4, as train.json)."""
    results = {}
    for k in ks:
        base = 1.0 + 0.1 * k
        rows = {"separate": {"median_ms": base, "p20_ms": 0.98 * base, "p80_ms": 1.02 * base, "samples_ms": [base],
                             "tokens_per_s": 4096 / (base * 1e-3)}}
        for name, f in (("routed", 1.6), ("routed-per-group", 1.2), ("routed-interleaved", 1.4)):
            t = base / f
            rows[name] = {"median_ms": t, "p20_ms": 0.98 * t, "p80_ms": 1.02 * t, "samples_ms": [t],
                          "tokens_per_s": 4096 / (t * 1e-3), "speedup_median": f, "speedup_p20": 0.97 * f,
                          "speedup_p80": 1.03 * f, "speedup_of_mins": f}
        results[f"K={k}"] = {"max_rel_err_vs_separate": 1e-3, **rows}
    meta = {"shape": {"B": 32, "S": 128, "hidden": 768, "pool": 8, "width": 48}, "mode": mode, "backend": "triton",
            "resolved": "triton", "device": "cuda", "dtype": "bfloat16", "repeats": 7, "stub": True, "note": STUB_NOTE}
    (work / "bench-multitask").mkdir(parents=True, exist_ok=True)
    (work / "bench-multitask" / file_name).write_text(
        json.dumps({"meta": meta, "results": results, "skipped_for_budget": []}, indent=1))
    print(f"wrote {len(results)} stub points")


STUBS = {"bench-switches": _switches, "bench-configs-v1": _configs_v1, "bench-graphs": _graphs,
         "bench-multitask": _multitask,
         "bench-multitask-train": lambda work: _multitask(work, (4,), "train.json", "train")}


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    step, work = argv[0], Path(argv[1])
    work.mkdir(parents=True, exist_ok=True)
    if step in TEST_CASES:
        _tests(step, work)
    elif step == "build-cuda":
        print("cuda: not built")
    elif step == "spills":
        _spills(work)
    elif step == "bench":
        _bench(work)
    elif step in STUBS:
        STUBS[step](work)
    else:
        print(f"devicecheck_stub: unknown step {step!r}", file=sys.stderr)
        return 2
    print(f"devicecheck_stub: {step}: wrote its files ({STUB_NOTE})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
