"""benchmarks/device_check.sh in its dry-run mode (DEVICE_CHECK_DRY_RUN=1): what a GPU run would bring
back, checked on a CPU machine. The lender returns at most 8 files, at most 2 folders deep, at most
16 MiB each and 64 MiB in all; the archive must hold the test reports and the benchmark results, and
summary.md must say it was a dry run and list each step with its status."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH_STEPS = ["bench", "bench-graphs", "bench-switches", "bench-multitask", "bench-multitask-train",
               "bench-configs-v1"]
STEPS = ["env", "build-cuda", "spills", "tests-triton", "tests-cuda", *BENCH_STEPS, "summary"]
GPU_STEPS = ["build-cuda", "spills", "tests-triton", "tests-cuda", *BENCH_STEPS]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None or shutil.which("tar") is None:
        pytest.skip("needs bash, coreutils' timeout and tar")
    out = tmp_path_factory.mktemp("device_check") / "OUT"
    env = dict(os.environ, DEVICE_CHECK_DRY_RUN="1", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               BENCH_GIT_COMMIT="0123456789abcdef0123456789abcdef01234567", TMPDIR=str(out.parent))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)  # a hang still fails
    return out, proc


def _files(out: Path):
    return [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]


def test_dry_run_exits_zero_and_fits_what_comes_back(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = _files(out)
    assert 1 <= len(files) <= 8, files
    for p in out.rglob("*"):
        assert len(p.relative_to(out).parts) - 1 <= 2, p  # at most 2 folders deep
        assert not p.is_symlink(), p
    sizes = [p.stat().st_size for p in files]
    assert max(sizes) <= 16 * 2 ** 20 and sum(sizes) <= 64 * 2 ** 20
    assert {p.name for p in files} == {"device_check.tar.gz", "summary.md", "summary.json", "device_check.log"}
    assert not list(out.parent.glob("device_check.*")), "the work folder is left behind"


def test_archive_holds_the_reports_and_results(dry_run):
    out, _ = dry_run
    with tarfile.open(out / "device_check.tar.gz") as tar:
        names = {m.name.lstrip("./") for m in tar.getmembers() if m.isfile()}
        for need in ("env.txt", "steps.tsv", "pytest-triton.xml", "pytest-triton.log", "pytest-cuda.xml",
                     "pytest-cuda.log", "build-cuda.log", "spills.json", "bench/results.json", "bench/results.csv",
                     "bench/skipped.json", "bench/summary.md", "bench-graphs/results.json",
                     "bench-graphs/results.csv", "bench-switches/results.json", "bench-switches/results.csv",
                     "bench-configs-v1/results.json", "bench-multitask/results.json", "bench-multitask/train.json",
                     "summary.md", "summary.json"):
            assert need in names, (need, sorted(names))
        assert any(n.startswith("bench/") and n.endswith(".png") for n in names), sorted(names)
        member = next(m for m in tar.getmembers() if m.name.lstrip("./") == "bench/results.json")
        rows = json.load(tar.extractfile(member))["rows"]
        xml = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("pytest-triton.xml"))).read()
    target = [r for r in rows if r["config"].get("tokens") == 16384 and r["config"].get("dtype") == "bfloat16"
              and r["metric"] == "time"]
    assert {r["provider"] for r in target} >= {"triton", "torch", "reference"}
    assert all(r["config"].get("stub") for r in rows)  # stub rows say so
    assert b"<testcase" in xml


def test_summary_says_dry_run_and_lists_every_step(dry_run):
    out, _ = dry_run
    md = (out / "summary.md").read_text()
    data = json.loads((out / "summary.json").read_text())
    assert "DRY RUN" in md and "- dry run: yes" in md
    assert data["dry_run"] is True
    assert data["git_commit"].startswith("0123456789abcdef")
    for name in STEPS[:-1]:  # the summary step records itself after writing the summary
        assert name in data["step_status"], (name, data["step_status"])
        assert f"| {name} | " in md
    assert data["step_status"]["env"] == "ok"
    for name in GPU_STEPS:
        assert data["step_status"][name] == "stub (dry run)"
    assert data["pytest"]["tests"] > 0 and data["pytest"]["failures"] == 0
    assert set(data["pytest"]["files"]) == {"pytest-triton.xml", "pytest-cuda.xml"}
    assert data["spills"]["target_spilling"] == []
    assert data["target"]["triton"]["time_ms_nograd"] > 0
    assert any(e["path"] == "bench/results.json" for e in data["archive"])
    assert "## Archive contents" in md
    # the target row's roofline time and ratio to torch; BERT-base eager and CUDA graphs; every switch
    assert data["target"]["triton"]["roofline_fraction_nograd"] > 0
    assert "roofline_ms_nograd" in md and "speedup_vs_torch_nograd" in md
    from benchmarks.devicecheck_switches import CUDA_SETTINGS, SETTINGS

    want = {f"triton[{k}]" for k in SETTINGS} | {f"cuda[{k}]" for k in CUDA_SETTINGS} | {
        "torch[default]", "triton[configs-v1]", "torch[configs-v1]"}
    assert set(data["switches"]) == want, sorted(data["switches"])
    assert data["switches"]["triton[gemm2-v2]"]["nograd"]["vs_default"] > 0
    assert data["switches"]["triton[new]"]["full"]["vs_torch"] > 0
    assert data["switches"]["triton[configs-v1]"]["nograd"]["ms_default"] > 0
    assert "FUSEDADAPTER_TRITON_SPLIT_BF16=0" in md and "FUSEDADAPTER_TRITON_GEMM2=v2" in md
    graphs = data["graphs"]
    assert {"bare", "auto", "triton"} <= set(graphs) and set(graphs["triton"]) == {"eager", "graph"}
    assert graphs["triton"]["graph"]["overhead"] is not None and graphs["triton"]["graph"]["met"] in (True, False)
    assert "## BERT-base (B=8, S=128, bf16)" in md
    mt = data["multitask"]
    assert {"K=4", "K=2", "K=8"} <= set(mt) and mt["K=4"]["routed"]["vs_separate"] > 0
    assert {"separate", "routed", "routed-per-group", "routed-interleaved"} <= set(mt["K=4"])
    assert "## Multi-task serving (bench-multitask" in md and "| 4 | routed |" in md
    assert set(data["multitask_train"]) >= {"K=4", "meta"} and data["multitask_train"]["meta"]["mode"] == "train"
    assert "## Multi-task training steps (bench-multitask-train" in md


def test_step_status_words():
    sys.path.insert(0, str(REPO))
    from benchmarks.devicecheck import step_status

    assert step_status(0) == "ok"
    assert step_status(0, "stub") == "stub (dry run)"
    assert step_status(124).startswith("timed out")
    assert step_status("skipped").startswith("skipped")
    assert step_status(2) == "failed (exit 2)"


def _run_module(args, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    proc = subprocess.run([sys.executable, "-m", *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_switches_step_runs_here(tmp_path):
    # the real bench-switches code on a tiny fp16 site through the Triton interpreter (the GPU run must
    # work the first time): rows per setting, each setting's output checked against the reference
    pytest.importorskip("triton")
    from benchmarks.results import load_rows

    _run_module(["benchmarks.devicecheck_switches", "--out", str(tmp_path), "--device", "cpu", "--tokens", "24",
                 "--hidden", "32", "--n", "3", "--reduction", "4", "--dtype", "float16", "--settings", "default",
                 "gemm2-v2", "new", "--modes", "nograd", "--repeats", "1", "--min-sample-s", "0"],
                TRITON_INTERPRET="1")
    rows = load_rows(tmp_path / "results.json")
    times = {(r["provider"], r["config"]["switch"]) for r in rows if r["metric"] == "time"}
    assert times == {("triton", "default"), ("triton", "gemm2-v2"), ("triton", "new"), ("torch", "default")}
    errs = [r["median"] for r in rows if r["metric"] == "rel_err"]
    assert len(errs) == 4 and max(errs) < 1e-2


def test_graphs_step_runs_here(tmp_path):
    # the real bench-graphs code on a tiny BERT on CPU: eager rows, overhead rows, the graph rows
    # skipped with the reason (CUDA graphs need CUDA)
    from benchmarks.results import load_rows

    _run_module(["benchmarks.devicecheck_graphs", "--out", str(tmp_path), "--device", "cpu", "--dtype", "float32",
                 "--layers", "1", "--hidden", "32", "--batch", "2", "--seq", "8", "--backends", "torch",
                 "--repeats", "1", "--min-sample-s", "0"])
    rows = load_rows(tmp_path / "results.json")
    got = {(r["provider"], r["mode"], r["metric"]) for r in rows}
    assert {("bare", "eager", "time"), ("torch", "eager", "time"), ("torch", "eager", "overhead"),
            ("torch", "eager", "rel_err"), ("-", "graph", "skipped")} <= got, got
    assert not [r for r in rows if r["metric"] == "error"]
    err = next(r["median"] for r in rows if r["metric"] == "rel_err")
    assert err < 1e-5  # the torch backend against the reference, fp32
