"""The benchmark CLI on a tiny grid: the files it writes and their schema (never timings)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results import SCHEMA  # noqa: E402
from conftest import adapters_available  # noqa: E402

MODES = {"nograd", "forward", "backward", "full"}


def _cli(*args, cwd=REPO, timeout=300):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    providers = ["reference", "torch"] + (["adapterhub"] if adapters_available() else [])
    stdout = _cli("tiny", "--out", str(out), "--providers", *providers, "--no-progress")
    return out, stdout, providers


def test_cli_writes_results_summary_and_plots(tiny_run):
    out, stdout, providers = tiny_run
    for name in ("results.csv", "results.json", "summary.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 2
    assert any(p.name.startswith("time_vs_tokens") for p in pngs) and any(p.name.startswith("time_vs_N") for p in pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # the printed table has each provider's ratio to reference
    assert "reference" in stdout and "torch" in stdout and "x)" in stdout
    md = (out / "summary.md").read_text()
    assert "speedup over `reference`" in md and "## Memory" in md and "![time_vs_tokens" in md


def test_csv_and_json_share_the_fixed_schema(tiny_run):
    out, _, providers = tiny_run
    with (out / "results.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == SCHEMA
        csv_rows = list(reader)
    data = json.loads((out / "results.json").read_text())
    assert tuple(data["schema"]) == SCHEMA
    rows = data["rows"]
    assert len(rows) == len(csv_rows) > 0
    for r, c in zip(rows, csv_rows):
        assert tuple(r) == SCHEMA
        assert json.loads(c["config"]) == r["config"]
        assert r["kernel"] == "fusion_site" and r["device_type"] == "cpu" and r["torch_version"]
        assert r["timestamp"] and isinstance(r["config"], dict)
        for k in ("tokens", "hidden", "n", "r", "dtype", "repeats"):
            assert k in r["config"], k
    times = [r for r in rows if r["metric"] == "time"]
    assert {r["provider"] for r in times} == set(providers)
    assert {r["mode"] for r in times} == MODES
    for r in times:
        assert r["unit"] == "ms" and r["x_name"] in ("tokens", "N")
        assert r["p20"] <= r["median"] <= r["p80"]
        assert len(r["config"]["samples_ms"]) == r["config"]["repeats"] >= 5
    metrics = {r["metric"] for r in rows}
    assert {"time", "rel_err", "saved_bytes", "peak_rss", "peak_rss_delta"} <= metrics
    assert not [r for r in rows if r["metric"] == "error"], [r["config"].get("error") for r in rows if r["metric"] == "error"]
    for r in rows:
        if r["metric"] == "rel_err":
            assert r["median"] < 1e-4  # every provider computes the reference's result


def test_report_rewrites_summary(tiny_run):
    out, _, _ = tiny_run
    (out / "summary.md").unlink()
    _cli("report", str(out), "--no-plots")
    assert "## Fusion site" in (out / "summary.md").read_text()


def test_dispatch_table_from_results(tmp_path):
    from benchmarks.results import ResultWriter, make_row
    from benchmarks.table import build_table
    from fusedadapter.dispatch import token_bucket

    w = ResultWriter(tmp_path / "cpu-test")

    def row(provider, tokens, ms, dtype="float32", device="cpu", mode="nograd"):
        cfg = {"tokens": tokens, "hidden": 64, "n": 2, "r": 8, "dtype": dtype}
        return make_row(kernel="fusion_site", provider=provider, mode=mode, metric="time", unit="ms", x_name="tokens",
                        x_value=tokens, p20=ms, median=ms, p80=ms, config=cfg, device=device)

    w.add([row("reference", 8, 0.1), row("torch", 8, 2.0), row("cpu", 8, 1.0), row("triton", 8, 0.01),
           row("torch", 1024, 1.0), row("cpu", 1024, 3.0), row("torch", 8, 1.0, dtype="bfloat16"),
           row("torch", 8, 5.0, mode="full"), row("cpu", 8, 4.0, mode="full")])
    data = build_table(tmp_path)
    assert set(data) == {"comment", "sources", "table", "training"}
    assert data["table"] == {"cpu": {"bfloat16": {token_bucket(8): "torch"},
                                     "float32": {token_bucket(8): "cpu", token_bucket(1024): "torch"}}}
    assert data["sources"] and data["sources"][0]["git_commit"] is not None
    # the training table comes from the training-step (full) rows alone
    assert data["training"] == {"cpu": {"float32": {token_bucket(8): "cpu"}}}
    w.add([row("torch", 8, 3.0, mode="full")])  # a newer measurement of the same point wins
    assert build_table(tmp_path)["training"] == {"cpu": {"float32": {token_bucket(8): "torch"}}}
    assert build_table(tmp_path)["table"] == data["table"]


def test_committed_dispatch_table_is_readable():
    from fusedadapter.dispatch import TOKEN_BUCKETS, dispatch_table, token_bucket

    names = {token_bucket(t) for t in (*TOKEN_BUCKETS, TOKEN_BUCKETS[-1] + 1)}
    data = dispatch_table()
    assert set(data) <= {"comment", "sources", "table", "training"}
    for table in (data["table"], data.get("training", {})):
        for dev, dtypes in table.items():
            for dtype, buckets in dtypes.items():
                assert set(buckets) <= names
                assert set(buckets.values()) <= {"torch", "triton", "cuda", "cpu"}
                if dev == "cpu":
                    assert "triton" not in buckets.values()


def test_device_summary_reads_the_target_row(tmp_path):
    from benchmarks.devicecheck import TARGET, summarize
    from benchmarks.results import ResultWriter, make_row

    w = ResultWriter(tmp_path / "bench")
    cfg = dict(TARGET)
    rows = []
    for prov, ms in (("reference", 10.0), ("torch", 1.0), ("triton", 0.4)):
        for mode, f in (("nograd", 1.0), ("full", 3.0)):
            rows.append(make_row(kernel="fusion_site", provider=prov, mode=mode, metric="time", unit="ms",
                                 x_name="tokens", x_value=cfg["tokens"], p20=ms * f, median=ms * f, p80=ms * f,
                                 config=cfg))
    rows.append(make_row(kernel="fusion_site", provider="triton", mode="nograd", metric="roofline_fraction",
                         unit="fraction", x_name="tokens", x_value=cfg["tokens"], p20=0.6, median=0.6, p80=0.6,
                         config=cfg))
    w.add(rows)
    (tmp_path / "steps.tsv").write_text("tests\t0\t12\nbench\t0\t100\n")
    assert summarize(tmp_path) == 0
    data = json.loads((tmp_path / "summary.json").read_text())
    tri = data["target"]["triton"]
    assert tri["speedup_vs_reference_nograd"] == pytest.approx(25.0)
    assert tri["speedup_vs_torch_nograd"] == pytest.approx(2.5)
    assert tri["targets_met"] == {"roofline_fraction_nograd": True, "speedup_vs_reference_nograd": True,
                                  "speedup_vs_torch_nograd": True, "speedup_vs_reference_full": True}
    assert data["steps"][0] == {"step": "tests", "rc": 0, "seconds": 12.0}
    assert "| triton |" in (tmp_path / "summary.md").read_text()


def test_printed_table_and_summary_say_what_the_modes_mean(tiny_run):
    out, stdout, _ = tiny_run
    md = (out / "summary.md").read_text()
    for text in (stdout, md):
        for phrase in ("nograd = eval forward under torch.inference_mode", "forward = the forward of a fusion-training step",
                       "backward = that step's backward alone", "full = forward + backward"):
            assert phrase in text, phrase
