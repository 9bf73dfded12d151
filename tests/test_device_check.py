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
SWITCH_STEPS = ["bench-nosplit", "bench-configs-v1", "bench-precast"]
STEPS = ["env", "build-cuda", "spills", "tests-triton", "tests-cuda", "bench", *SWITCH_STEPS, "summary"]
GPU_STEPS = ["build-cuda", "spills", "tests-triton", "tests-cuda", "bench", *SWITCH_STEPS]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("bash") is None or shutil.which("timeout") is None or shutil.which("tar") is None:
        pytest.skip("needs bash, coreutils' timeout and tar")
    out = tmp_path_factory.mktemp("device_check") / "OUT"
    env = dict(os.environ, DEVICE_CHECK_DRY_RUN="1", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               BENCH_GIT_COMMIT="0123456789abcdef0123456789abcdef01234567", TMPDIR=str(out.parent))
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "device_check.sh"), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)
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
                     "bench/skipped.json", "bench/summary.md", "bench-nosplit/results.json",
                     "bench-configs-v1/results.json", "bench-precast/results.json", "summary.md", "summary.json"):
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
    assert set(data["switches"]) == set(SWITCH_STEPS)
    assert data["switches"]["bench-nosplit"]["triton"]["nograd"]["ms"] > 0
    assert "FUSEDADAPTER_TRITON_SPLIT_BF16=0" in md


def test_step_status_words():
    sys.path.insert(0, str(REPO))
    from benchmarks.devicecheck import step_status

    assert step_status(0) == "ok"
    assert step_status(0, "stub") == "stub (dry run)"
    assert step_status(124).startswith("timed out")
    assert step_status("skipped").startswith("skipped")
    assert step_status(2) == "failed (exit 2)"
