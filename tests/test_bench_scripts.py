"""Smoke runs of the standalone benchmarks (benchmarks/bench_*.py) on tiny settings, through the
CLI's script table (``python -m benchmarks NAME``): each still runs on the shared harness. Never
timings: only that a run finishes, prints its table and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import cli  # noqa: E402
from benchmarks.results import SCHEMA, load_rows  # noqa: E402

TINY = {
    "native-cpu": ["--tokens", "1", "8", "--dtypes", "float32", "--hidden", "32", "--adapters", "2", "--width", "4",
                   "--repeats", "5", "--sample-ms", "1"],
    "adapter-mask": ["--batch", "2", "--seq", "3", "--hidden", "32", "--adapters", "3", "--width", "4", "--repeats", "5",
                     "--sample-ms", "1"],
    "host-overhead": ["--inner", "2", "--repeats", "5"],
    "model-overhead": ["--layers", "1", "--hidden", "64", "--batch", "1", "--seq", "8", "--repeats", "5"],
    "adapterdrop": ["--layers", "2", "--hidden", "64", "--batch", "1", "--seq", "8", "--repeats", "5", "--kept", "8", "4",
                    "--skipped", "0", "1", "--backends", "torch"],
    "train": ["--layers", "1", "--hidden", "64", "--shapes", "1x8", "--n-adapters", "2", "--r", "4", "--repeats", "5",
              "--threads", "1", "--clock", "thread"],
    "train-forms": ["--tokens", "8", "--backends", "torch", "--repeats", "5"],
    "compile": ["--device", "cpu", "--layers", "1", "--hidden", "64", "--shapes", "1x8", "--compile-backend", "aot_eager",
                "--repeats", "5", "--min-sample-s", "0"],
    "export": ["--layers", "1", "--hidden", "64", "--batch", "2", "--seq", "8", "--repeats", "5", "--no-parity"],
}
JSON_FLAG = {"train-forms": "--out"}
SCHEMA_ROWS = {"native-cpu": "native_cpu", "adapter-mask": "adapter_mask", "model-overhead": "model_overhead",
               "train": "train_step", "host-overhead": "host_overhead"}


@pytest.fixture
def threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # some scripts set one thread


@pytest.mark.parametrize("name", list(TINY))
def test_script_runs_tiny_through_the_cli(name, tmp_path, capsys, threads):
    assert set(TINY) <= set(cli.SCRIPTS)
    out = tmp_path / "out.json"
    argv = list(TINY[name])
    if name != "host-overhead":
        argv += [JSON_FLAG.get(name, "--json"), str(out)]
    if name in SCHEMA_ROWS:
        argv += ["--out", str(tmp_path / "rows")]
    if name == "export":
        pytest.importorskip("onnxruntime")
    assert cli.main([name] + argv) == 0
    printed = capsys.readouterr().out
    assert printed.strip(), "the script prints its table"
    if name != "host-overhead":
        assert out.is_file() and json.loads(out.read_text())
    else:
        assert "host overhead" in printed
    if name in SCHEMA_ROWS:  # rows of the shared schema, as the layer and model benchmarks write them
        rows = load_rows(tmp_path / "rows")
        assert rows and all(tuple(k for k in row if k != "_source") == SCHEMA for row in rows)
        assert {row["kernel"] for row in rows} == {SCHEMA_ROWS[name]}
        times = [row for row in rows if row["metric"] == "time"]
        assert times and all(row["p20"] <= row["median"] <= row["p80"] for row in times)
    if name == "train":  # every provider that runs here (AdapterHub's where `adapters` imports), against the floor
        from benchmarks import bench_train

        ratios = {row["provider"]: row for row in rows if row["metric"] == "x_floor"}
        assert {row["provider"] for row in times} == set(ratios) == set(bench_train.available()[0])
        assert ratios["floor"]["median"] == 1.0 and all(len(r["config"]["samples_ms"]) == 5 for r in times)


def test_every_script_has_a_cli_entry_and_runs_as_a_file():
    names = {m for m, _ in cli.SCRIPTS.values()}
    for m in names:
        assert (REPO / "benchmarks" / f"{m}.py").is_file(), m
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_native_cpu.py"), *TINY["native-cpu"],
                        "--threads", "1"], cwd="/", env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "speedup" in r.stdout
