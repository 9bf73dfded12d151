"""``python -m benchmarks device-summary WORKDIR [--out OUTDIR]``: the summary step of ``device_check.sh``.

Reads what the script left in WORKDIR (``steps.tsv``: one ``name<TAB>exit code<TAB>seconds[<TAB>kind]``
line a step, kind ``real`` or ``stub``; ``pytest-*.xml``: the tests' JUnit reports; ``spills.json``:
the ptxas spill report; ``bench/results.json``: the GPU grid; ``bench-graphs/``, ``bench-switches/``,
``bench-configs-v1/``: their ``results.json``) and writes ``summary.json`` and ``summary.md`` into
WORKDIR (they go into the archive) and OUTDIR: whether it was a dry run, the GPU name, versions and
commit, every step's status, the test counts and failures, the spills, the issue-3 target row (bf16,
16384 tokens, H=768, N=8, r=48) for every fast provider (fraction of roofline with the roofline time,
speedup over ``reference`` and over ``torch``, forward+backward speedup over ``reference``, each
against its target), BERT-base with 8 fused adapters against the bare model (eager and CUDA graphs,
target <= 10% over), the target row per kernel switch (ratio to the same run's default) and the
files the archive will hold.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

from .env import git_commit, versions
from .results import load_rows

TARGET = {"tokens": 16384, "hidden": 768, "n": 8, "r": 48, "dtype": "bfloat16"}
KERNEL_SITE = "fusion_site"
# Issue 3's targets. "forward" there is the site's forward pass; we check it on the no-grad
# forward (the roofline counts inputs and output only, no activations saved for backward) and
# report the training forward beside it.
TARGETS = {"roofline_fraction_nograd": 0.5, "speedup_vs_reference_nograd": 20.0, "speedup_vs_torch_nograd": 1.5,
           "speedup_vs_reference_full": 5.0}


def _steps(out: Path) -> List[dict]:
    f = out / "steps.tsv"
    steps = []
    if f.exists():
        for line in f.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                steps.append({"step": parts[0], "rc": int(parts[1]) if parts[1].lstrip("-").isdigit() else parts[1],
                              "seconds": float(parts[2]) if parts[2].replace(".", "", 1).isdigit() else parts[2]})
    return steps


def _step_kinds(out: Path) -> Dict[str, str]:
    f = out / "steps.tsv"
    kinds = {}
    if f.exists():
        for line in f.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                kinds[parts[0]] = parts[3]
    return kinds


def step_status(rc, kind: str = "real") -> str:
    """A step's outcome in words: ok, stub (dry run), skipped (no time left), timed out, failed (exit N)."""
    if rc == "skipped":
        return "skipped (no time left)"
    if kind == "stub":
        return "stub (dry run)" if rc == 0 else f"stub failed (exit {rc})"
    if rc == 0:
        return "ok"
    if rc in (124, 137):
        return f"timed out (exit {rc})"
    return f"failed (exit {rc})"


def _pytest_one(f: Path) -> dict:
    try:
        root = ET.parse(f).getroot()
    except ET.ParseError as exc:
        return {"error": f"unreadable JUnit XML {f.name}: {exc}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    res = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": []}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            res[k] += int(s.get(k, 0))
        res["time_s"] += float(s.get("time", 0.0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                res["failed"].append(f"{case.get('classname')}::{case.get('name')}")
    res["passed"] = res["tests"] - res["failures"] - res["errors"] - res["skipped"]
    return res


def _pytest(out: Path) -> Optional[dict]:
    """The JUnit reports (``pytest.xml`` and ``pytest-*.xml``) added up, with one entry per file in ``files``."""
    files = sorted(out.glob("pytest*.xml"))
    if not files:
        return None
    per = {f.name: _pytest_one(f) for f in files}
    good = [r for r in per.values() if "error" not in r]
    if not good:
        return {"error": "; ".join(r["error"] for r in per.values()), "files": per}
    res = {k: sum(r[k] for r in good) for k in ("tests", "failures", "errors", "skipped", "passed")}
    res["time_s"] = sum(r["time_s"] for r in good)
    res["failed"] = [name for r in good for name in r["failed"]]
    res["files"] = per
    return res


def _spills(out: Path) -> Optional[dict]:
    f = out / "spills.json"
    if not f.exists():
        return None
    try:
        data = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        return {"error": f"unreadable spills.json: {exc}"}
    summ = dict(data.get("summary", {}))
    summ["rows"] = [{k: r.get(k) for k in ("kernel", "variant", "target", "config", "spill_stores", "spill_loads",
                                           "stack_frame", "ptxas_regs", "error")} for r in data.get("rows", [])]
    return summ


def _archive_listing(out: Path) -> List[dict]:
    """The files under WORKDIR (what the archive will hold), with sizes; summary.* counted in."""
    names = []
    for root, _, files in os.walk(out):
        for name in files:
            p = Path(root) / name
            names.append({"path": str(p.relative_to(out)), "bytes": p.stat().st_size})
    for extra in ("summary.json", "summary.md"):
        if not any(e["path"] == extra for e in names):
            names.append({"path": extra, "bytes": None})
    return sorted(names, key=lambda e: e["path"])


def _match(cfg: dict) -> bool:
    return all(cfg.get(k) == v for k, v in TARGET.items())


def target_row(rows) -> Dict[str, dict]:
    """{provider: metrics at the issue-3 target point}."""
    t: Dict[tuple, float] = {}
    roof: Dict[tuple, float] = {}
    roof_ms: Dict[tuple, float] = {}
    for r in rows:
        if r.get("kernel") != "fusion_site" or not _match(r.get("config", {})) or r.get("median") is None:
            continue
        if r["metric"] == "time":
            t[(r["provider"], r["mode"])] = r["median"]
        elif r["metric"] == "roofline_fraction":
            roof[(r["provider"], r["mode"])] = r["median"]
            if r.get("config", {}).get("roofline_ms"):
                roof_ms[(r["provider"], r["mode"])] = r["config"]["roofline_ms"]
    out: Dict[str, dict] = {}
    for prov in sorted({p for p, _ in t}):
        m: Dict[str, Optional[float]] = {}
        for mode in ("nograd", "forward", "backward", "full"):
            if (prov, mode) not in t:
                continue
            m[f"time_ms_{mode}"] = t[(prov, mode)]
            ref, tor = t.get(("reference", mode)), t.get(("torch", mode))
            if ref:
                m[f"speedup_vs_reference_{mode}"] = ref / t[(prov, mode)]
            if tor:
                m[f"speedup_vs_torch_{mode}"] = tor / t[(prov, mode)]
            if (prov, mode) in roof:
                m[f"roofline_fraction_{mode}"] = roof[(prov, mode)]
            if (prov, mode) in roof_ms:
                m[f"roofline_ms_{mode}"] = roof_ms[(prov, mode)]
        # the targets are the GPU kernels' (triton, cuda); torch and reference are the baselines
        m["targets_met"] = {k: (m[k] >= v) for k, v in TARGETS.items() if k in m and prov in ("triton", "cuda")}
        out[prov] = m
    return out


SWITCH_NOTES = {"default": "the defaults", "nosplit": "bf16 w_query without the hi/lo split (FUSEDADAPTER_TRITON_SPLIT_BF16=0; "
                "cuda: FUSEDADAPTER_CUDA_SPLIT_BF16=0)",
                "gemm2-v2": "FUSEDADAPTER_TRITON_GEMM2=v2 (p once per tile, w_out precast)",
                "presplit": "FUSEDADAPTER_TRITON_PRESPLIT=1 (w_query hi/lo made once)",
                "precast": "FUSEDADAPTER_TRITON_PRECAST=1 (weights cast to bf16 once)",
                "new": "gemm2-v2 + presplit + precast", "new-nosplit": "gemm2-v2 + precast + nosplit"}


def _times(rows, kernel=KERNEL_SITE, match=True):
    return {(r["provider"], r.get("config", {}).get("switch", "default"), r["mode"]): r for r in rows
            if r.get("kernel") == kernel and r.get("metric") == "time" and r.get("median")
            and (not match or _match(r.get("config", {})))}


def switch_rows(out: Path, main_rows) -> Dict[str, dict]:
    """``bench-switches``: {provider[setting]: {mode: {ms, p20, p80, vs_default, vs_torch, rel_err}}}, ratios
    within that run (interleaved); ``bench-configs-v1``: {triton[configs-v1]: {mode: {ms, ms_default}}}
    against the main bench (another process)."""
    res: Dict[str, dict] = {}
    f = out / "bench-switches" / "results.json"
    if f.exists():
        rows = load_rows(f)
        t = _times(rows)
        errs = {(r["provider"], r["config"].get("switch")): r["median"] for r in rows if r.get("metric") == "rel_err"}
        for (prov, setting, mode), r in sorted(t.items()):
            d = {"ms": r["median"], "p20": r["p20"], "p80": r["p80"], "rel_err": errs.get((prov, setting))}
            base = t.get((prov, "default", mode))
            if base and setting != "default":
                d["vs_default"] = base["median"] / r["median"]  # > 1: the switch is faster
            tor = t.get(("torch", "default", mode))
            if tor and prov != "torch":
                d["vs_torch"] = tor["median"] / r["median"]
            res.setdefault(f"{prov}[{setting}]", {})[mode] = d
        for r in rows:
            if r.get("metric") in ("skipped", "error"):
                res.setdefault(f"{r['provider']}[{r['config'].get('switch')}]", {})[r["mode"]] = {
                    "error": r["config"].get("error")}
    f = out / "bench-configs-v1" / "results.json"
    if f.exists():
        base = _times(main_rows)
        for (prov, _, mode), r in sorted(_times(load_rows(f)).items()):
            b = base.get((prov, "default", mode))
            res.setdefault(f"{prov}[configs-v1]", {})[mode] = {"ms": r["median"], "ms_default": b["median"] if b else None}
    return res


def graph_rows(out: Path) -> Dict[str, dict]:
    """``bench-graphs``: {provider: {mode: {ms, overhead, met, rel_err, error}}} (BERT-base, 8 fused adapters)."""
    f = out / "bench-graphs" / "results.json"
    res: Dict[str, dict] = {}
    if not f.exists():
        return res
    for r in load_rows(f):
        if r.get("kernel") != "bert_model":
            continue
        d = res.setdefault(r["provider"], {}).setdefault(r["mode"], {})
        if r["metric"] == "time":
            d["ms"] = r["median"]
        elif r["metric"] == "overhead":
            d.update(overhead=r["median"], overhead_p20=r["p20"], overhead_p80=r["p80"], met=r["config"].get("met"))
        elif r["metric"] == "rel_err":
            d[f"rel_err_vs_{r['config'].get('against')}"] = r["median"]
        elif r["metric"] in ("error", "skipped"):
            d["error"] = r["config"].get("error")
        elif r["metric"] == "chooses":
            d["error"] = f"auto chooses {r['config'].get('chosen')!r} here"
    return res


# issue 16: a routed forward of K fusions vs the K separate forwards, on a GPU
MULTITASK_TARGET = 1.5


def multitask_rows(out: Path, name: str = "results.json") -> Dict[str, dict]:
    """``bench-multitask`` (benchmarks/bench_multitask.py's JSON; ``train.json``: bench-multitask-train's
    training steps): {"K=k": {variant: {ms, p20, p80, tokens_per_s, vs_separate, vs_separate_p20,
    vs_separate_p80}}, "max_rel_err": ...}, plus "skipped" (the K points the step's budget left out)
    and "meta"."""
    f = out / "bench-multitask" / name
    if not f.exists():
        return {}
    try:
        data = json.loads(f.read_text())
    except ValueError as exc:
        return {"error": f"bench-multitask/{name}: {exc}"}
    res: Dict[str, dict] = {"meta": data.get("meta", {}), "skipped": data.get("skipped_for_budget", [])}
    for point, rows in data.get("results", {}).items():
        d = {"max_rel_err": rows.get("max_rel_err_vs_separate")}
        for name, r in rows.items():
            if isinstance(r, dict):
                d[name] = {"ms": r["median_ms"], "p20": r["p20_ms"], "p80": r["p80_ms"],
                           "tokens_per_s": r["tokens_per_s"], "vs_separate": r.get("speedup_median"),
                           "vs_separate_p20": r.get("speedup_p20"), "vs_separate_p80": r.get("speedup_p80")}
        res[point] = d
    return res


def _multitask_lines(mt, train: bool = False) -> List[str]:
    title = "Multi-task training steps" if train else "Multi-task serving"
    if not mt:
        return []
    if "error" in mt:
        return ["", f"## {title}: {mt['error']}"]
    meta = mt.get("meta", {})
    shape = meta.get("shape", {})
    target = (" (no target: the grouped backward against one op call per fusion)" if train else
              f"; issue 16's target: routed >= {MULTITASK_TARGET}x the K separate forwards")
    lines = ["", f"## {title} (bench-multitask{'-train' if train else ''}: B={shape.get('B')} S={shape.get('S')}, "
                 f"{meta.get('dtype')}, backend {meta.get('resolved')}{target})", "",
             "| K | variant | median ms (p20-p80) | tokens/s | vs separate (p20-p80) | target |", "|---|---|---|---|---|---|"]
    for point, d in mt.items():
        if not point.startswith("K="):
            continue
        for name, r in d.items():
            if not isinstance(r, dict):
                continue
            vs = r.get("vs_separate")
            span = f" ({r['vs_separate_p20']:.3f}-{r['vs_separate_p80']:.3f})" if vs else ""
            met = "" if train or name != "routed" or vs is None else ("met" if vs >= MULTITASK_TARGET else "MISSED")
            lines.append(f"| {point[2:]} | {name} | {r['ms']:.3f} ({r['p20']:.3f}-{r['p80']:.3f}) | "
                         f"{r['tokens_per_s']:.0f} | " + (f"{vs:.3f}x{span}" if vs else "-") + f" | {met} |")
        lines.append(f"| {point[2:]} | max rel err vs separate | {d.get('max_rel_err')} | | | |")
    if mt.get("skipped"):
        lines += ["", "Not run (the step's time): " + ", ".join(mt["skipped"])]
    lines += ["", "`routed`: one fusion_triton_grouped call per site; `routed-per-group`: the same call group by "
                  "group (FUSEDADAPTER_GROUPED_TRITON=0's path)."]
    return lines


def _switch_lines(switches) -> List[str]:
    if not switches:
        return []
    lines = ["", "## The target row per switch (bench-switches: one process, interleaved, fixed configs; "
                 "bench-configs-v1: autotuned, its own process)", "",
             "| provider[setting] | mode | median ms (p20-p80) | vs default | vs torch | rel_err |", "|---|---|---|---|---|---|"]
    for name, modes in switches.items():
        for mode, d in modes.items():
            if "error" in d:
                lines.append(f"| {name} | {mode} | {d['error']} | | | |")
                continue
            span = f" ({d['p20']:.4f}-{d['p80']:.4f})" if d.get("p20") else ""
            vs_d = d.get("vs_default") or (d["ms_default"] / d["ms"] if d.get("ms_default") else None)
            lines.append(f"| {name} | {mode} | {d['ms']:.4f}{span} | "
                         + (f"{vs_d:.3f}x" if vs_d else "-") + " | "
                         + (f"{d['vs_torch']:.2f}x" if d.get("vs_torch") else "-") + " | "
                         + (f"{d['rel_err']:.2e}" if d.get("rel_err") is not None else "-") + " |")
    lines += ["", "Settings: " + "; ".join(f"`{k}` {v}" for k, v in SWITCH_NOTES.items())
              + ". `vs default` > 1: faster than the defaults."]
    return lines


def _graph_lines(graphs) -> List[str]:
    if not graphs:
        return []
    lines = ["", "## BERT-base (B=8, S=128, bf16), 8 fused adapters vs the bare model (bench-graphs)", "",
             "| provider | mode | median ms | overhead over bare (p20-p80) | <= 10% | rel_err |", "|---|---|---|---|---|---|"]
    for prov, modes in graphs.items():
        for mode, d in modes.items():
            if "error" in d and "ms" not in d:
                lines.append(f"| {prov} | {mode} | {d['error']} | | | |")
                continue
            ov = (f"{100 * d['overhead']:+.1f}% ({100 * d['overhead_p20']:+.1f} to {100 * d['overhead_p80']:+.1f})"
                  if d.get("overhead") is not None else "-")
            met = "-" if d.get("met") is None else ("met" if d["met"] else "MISSED")
            err = d.get("rel_err_vs_eager", d.get("rel_err_vs_reference"))
            lines.append(f"| {prov} | {mode} | {d.get('ms', float('nan')):.3f} | {ov} | {met} | "
                         + ("-" if err is None else f"{err:.2e}") + " |")
    return lines


def summarize(outdir, out_copy=None) -> int:
    out = Path(outdir)
    steps = _steps(out)
    kinds = _step_kinds(out)
    dry = os.environ.get("DEVICE_CHECK_DRY_RUN", "0") == "1" or "stub" in kinds.values()
    rows = []
    bench = out / "bench" / "results.json"
    if bench.exists():
        rows = load_rows(bench)
    gpu = next((r["device_name"] for r in rows if r.get("device_type") == "cuda"), None)
    if gpu is None:
        try:
            import torch

            gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        except Exception as exc:  # pragma: no cover
            gpu = f"unknown ({exc})"
    rates = {r["metric"]: r["median"] for r in rows if r.get("provider") == "device" and r.get("median")
             and _match(r.get("config", {}))}
    errors = [f"{r['provider']} {r['mode']} {r['config'].get('tokens')}x{r['config'].get('hidden')} "
              f"N={r['config'].get('n')} {r['config'].get('dtype')}: {r['config'].get('error')}"
              for r in rows if r.get("metric") == "error"]
    skipped = {}
    if (out / "bench" / "skipped.json").exists():
        skipped = json.loads((out / "bench" / "skipped.json").read_text())
    data = {
        "dry_run": dry, "skipped_providers": skipped,
        "gpu": gpu, "versions": versions(), "steps": steps,
        # device_check.sh sets BENCH_GIT_COMMIT (the caller's, benchmarks/.git_commit or git's): it wins
        "git_commit": os.environ.get("BENCH_GIT_COMMIT", "").strip() or git_commit(),
        "step_status": {s["step"]: step_status(s["rc"], kinds.get(s["step"], "real")) for s in steps},
        "pytest": _pytest(out), "spills": _spills(out), "archive": _archive_listing(out),
        "target_point": TARGET, "targets": TARGETS, "rates_at_target": rates, "target": target_row(rows),
        "bench_rows": len(rows), "bench_errors": errors, "switches": switch_rows(out, rows),
        "graphs": graph_rows(out), "multitask": multitask_rows(out),
        "multitask_train": multitask_rows(out, "train.json"),
    }
    v = data["versions"]
    lines = ["# fusedadapter device check" + (" (DRY RUN)" if dry else ""), ""]
    if dry:
        lines += ["**Dry run** (`DEVICE_CHECK_DRY_RUN=1`): no GPU step ran; each was replaced by a stub that wrote "
                  "the files it would write. Every test result and number below is a stub, not a measurement.", ""]
    lines += [f"- dry run: {'yes' if dry else 'no'}", f"- GPU: {gpu}",
              f"- torch {v['torch']}, triton {v['triton'] or '-'}, transformers {v['transformers']}",
              f"- commit: {data['git_commit'] or 'unknown (pass BENCH_GIT_COMMIT)'}", ""]
    lines += ["| step | status | exit code | seconds |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {data['step_status'][s['step']]} | {s['rc']} | {s['seconds']} |" for s in steps]
    p = data["pytest"]
    if p and "error" not in p:
        lines += ["", f"Tests: {p['passed']} passed, {p['failures']} failed, {p['errors']} errors, "
                      f"{p['skipped']} skipped ({p['time_s']:.0f} s)"]
        lines += [f"- FAILED {name}" for name in p["failed"][:50]]
        for name, r in p["files"].items():
            lines.append(f"- {name}: " + (r["error"] if "error" in r else
                                          f"{r['passed']} passed, {r['failures']} failed, {r['errors']} errors, "
                                          f"{r['skipped']} skipped"))
    elif p:
        lines += ["", f"Tests: {p['error']}"]
    else:
        lines += ["", "Tests: no JUnit report (the test steps did not run or were killed)"]
    sp = data["spills"]
    if sp and "error" not in sp:
        lines += ["", f"Spills (ptxas -v, sm_{sp.get('arch', 90)}, triton {sp.get('triton')}): {sp.get('compiled')} "
                      f"target-row compiles, {sp.get('spilling')} spill; target-row configs spilling: "
                      f"{len(sp.get('target_spilling', []))}"
                      + (" (interrupted by its time limit: the rest was not compiled)" if sp.get("interrupted") else "")]
        lines += [f"- spills: {lab}" for lab in sp.get("target_spilling", [])]
    elif sp:
        lines += ["", f"Spills: {sp['error']}"]
    else:
        lines += ["", "Spills: no spills.json (the spills step did not finish)"]
    lines += ["", f"## Issue-3 target point: {json.dumps(TARGET)}", ""]
    if rates:
        lines.append(f"Measured rates: matmul {rates.get('matmul_tflops', float('nan')):.0f} TFLOP/s, "
                     f"copy {rates.get('copy_gbps', float('nan')):.0f} GB/s")
        lines.append("")
    cols = ["roofline_fraction_nograd", "roofline_ms_nograd", "roofline_fraction_forward", "speedup_vs_reference_nograd",
            "speedup_vs_torch_nograd", "speedup_vs_reference_forward", "speedup_vs_reference_full",
            "time_ms_nograd", "time_ms_full"]
    lines += ["| provider | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for prov, m in data["target"].items():
        cells = []
        for c in cols:
            val = m.get(c)
            if val is None:
                cells.append("-")
                continue
            txt = (f"{100 * val:.1f}%" if c.startswith("roofline_fraction") else
                   f"{1e3 * val:.1f} us" if c.startswith("roofline_ms") else
                   f"{val:.3f}" if c.startswith("time") else f"{val:.2f}x")
            met = m["targets_met"].get(c)
            cells.append(txt + ("" if met is None else (" (met)" if met else " (MISSED)")))
        lines.append(f"| {prov} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (issue 3): " + ", ".join(f"{k} >= {v}" for k, v in TARGETS.items())
              + "; the roofline target is checked on the no-grad forward (50% = twice the roofline time, "
                "`roofline_ms_nograd`, from the matmul and copy rates measured in the run)."]
    lines += _graph_lines(data["graphs"])
    lines += _switch_lines(data["switches"])
    lines += _multitask_lines(data["multitask"])
    lines += _multitask_lines(data["multitask_train"], train=True)
    if skipped:
        lines += ["", "Providers not run:"] + [f"- {p}: {why}" for p, why in skipped.items()]
    if errors:
        lines += ["", "## Benchmark errors", ""] + [f"- {e}" for e in errors[:40]]
    lines += ["", "Full grid: bench/summary.md (and bench/results.json, bench/results.csv) in device_check.tar.gz.",
              "", "## Archive contents (device_check.tar.gz)", ""]
    lines += [f"- {e['path']}" + ("" if e["bytes"] is None else f" ({e['bytes']} bytes)") for e in data["archive"]]
    text = "\n".join(lines) + "\n"
    for folder in [out] + ([Path(out_copy)] if out_copy else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text(json.dumps(data, indent=1))
        (folder / "summary.md").write_text(text)
    print(text)
    return 0
