"""What a result row says about where it was measured: device, versions, commit, time."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict

import torch

REPO = Path(__file__).resolve().parent.parent


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:
        return ""


@functools.lru_cache(maxsize=None)
def versions() -> Dict[str, str]:
    """torch / triton / transformers / adapters versions ('' where a package is absent)."""
    return {name: _version(name) for name in ("torch", "triton", "transformers", "adapters")}


@functools.lru_cache(maxsize=None)
def adapters_importable() -> bool:
    try:
        import adapters  # noqa: F401
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """HEAD's hash, with '+dirty' when tracked files differ from it. Outside a git checkout (a
    copied working tree), ``$BENCH_GIT_COMMIT`` if set, else ''."""
    env = os.environ.get("BENCH_GIT_COMMIT", "").strip()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        if not head:
            return env
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except Exception:
        return env


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except Exception as exc:
            return f"cuda (unavailable: {type(exc).__name__})"
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_status(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM) in bytes; -1 where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def rss_bytes() -> int:
    return _read_status("VmRSS")


def peak_rss_bytes() -> int:
    v = _read_status("VmHWM")
    if v < 0:
        import resource
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return v


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
