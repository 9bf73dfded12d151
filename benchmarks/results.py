"""Result rows with one fixed schema, appended to ``results.csv`` and ``results.json``.

Every measurement is one row: what was measured (``kernel``, ``provider``, ``mode``,
``metric``, ``unit``), along which axis (``x_name``, ``x_value``), the quantiles over the
interleaved repeats (``p20``, ``median``, ``p80``), the full point (``config``: JSON, with the
dtype, token count, hidden size, N, widths, repeats ...), and where it was measured
(``device_type``, ``device_name``, versions, ``git_commit``, ``timestamp``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch

from .env import device_name, git_commit, timestamp, versions

__all__ = ["SCHEMA", "Row", "make_row", "ResultWriter", "load_rows"]

SCHEMA = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value", "p20", "median", "p80", "config",
          "device_type", "device_name", "torch_version", "triton_version", "transformers_version", "git_commit",
          "timestamp")

Row = Dict[str, object]


def _num(v) -> Optional[float]:
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else v


def make_row(*, kernel: str, provider: str, mode: str, metric: str, unit: str, x_name: str, x_value,
             p20=None, median=None, p80=None, config: Optional[dict] = None, device="cpu") -> Row:
    device = torch.device(device)
    v = versions()
    return {
        "kernel": kernel, "provider": provider, "mode": mode, "metric": metric, "unit": unit,
        "x_name": x_name, "x_value": x_value,
        "p20": _num(p20), "median": _num(median), "p80": _num(p80),
        "config": dict(config or {}),
        "device_type": device.type, "device_name": device_name(device),
        "torch_version": v["torch"], "triton_version": v["triton"], "transformers_version": v["transformers"],
        "git_commit": git_commit(), "timestamp": timestamp(),
    }


class ResultWriter:
    """Appends rows to ``<out>/results.csv`` and ``<out>/results.json`` (``{"schema", "rows"}``)."""

    def __init__(self, out_dir):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out / "results.csv"
        self.json_path = self.out / "results.json"
        self.rows: List[Row] = []

    def add(self, rows: Iterable[Row]) -> None:
        rows = list(rows)
        if not rows:
            return
        self.rows.extend(rows)
        new_csv = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
        with self.csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=SCHEMA)
            if new_csv:
                w.writeheader()
            for r in rows:
                w.writerow({k: (json.dumps(r[k], sort_keys=True) if k == "config" else ("" if r[k] is None else r[k]))
                            for k in SCHEMA})
        data = {"schema": list(SCHEMA), "rows": []}
        if self.json_path.exists():
            try:
                data = json.loads(self.json_path.read_text())
            except json.JSONDecodeError:
                pass
        data["schema"] = list(SCHEMA)
        data.setdefault("rows", []).extend(rows)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
        tmp.replace(self.json_path)


def load_rows(path) -> List[Row]:
    """Rows from a ``results.json`` (or every ``results.json`` under a folder)."""
    path = Path(path)
    files = sorted(path.rglob("results.json")) if path.is_dir() else [path]
    rows: List[Row] = []
    for f in files:
        data = json.loads(f.read_text())
        for r in data.get("rows", []):
            r = dict(r)
            r.setdefault("_source", str(f))
            rows.append(r)
    return rows
