"""The decoding benchmark (`python -m benchmarks decode`) on a tiny Llama: it runs from the CLI, every
variant generates the requested tokens with the KV cache, and the rows and the table are written."""

import json

from benchmarks.cli import main


def test_decode_benchmark_runs_from_the_cli(tmp_path, capsys):
    out = tmp_path / "decode"
    rc = main(["decode", "--model", "llama-tiny", "--backends", "torch", "--repeats", "2", "--warmup", "0",
               "--new-tokens", "3", "--prompt", "4", "--threads", "1", "--out", str(out)])
    assert rc == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    metrics = {(r["provider"], r["metric"]) for r in rows}
    assert {("bare", "tokens_per_s"), ("torch", "tokens_per_s"), ("torch", "ratio_vs_bare")} <= metrics
    ratio = next(r for r in rows if r["metric"] == "ratio_vs_bare")
    assert ratio["median"] > 0 and len(ratio["config"]["samples_ratio"]) == 2
    assert ratio["config"]["new_tokens"] == 3 and ratio["config"]["n"] == 8 and ratio["config"]["threads"] == 1
    md = (out / "summary-decode.md").read_text()
    assert "| torch |" in md and "ratio vs bare" in md
