"""Compile every CUDA source of the extension without a GPU: a CI check that fails on a compile error.

``python -m fusedadapter.csrc.compile_check [--arch 9.0] [--jobs 2]``

Each ``.cu`` file is compiled with nvcc (``-c``, the flags torch's ``cpp_extension`` uses, one
``-gencode`` per ``--arch``) and each CUDA host ``.cpp`` with the C++ compiler (``-fsyntax-only``,
with the CUDA headers), against the installed torch's headers. A CPU-only torch wheel ships every
header but ``c10/cuda/impl/cuda_cmake_macros.h`` (generated when torch is built with CUDA); a
two-line stand-in is written to a temporary folder for that case. Nothing is linked or run, so
this proves the sources compile, not that they are correct (that needs a GPU: ``cuda`` parity
runs in ``benchmarks/device_check.sh``).
"""

from __future__ import annotations

import argparse
import glob
import re
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
STAND_IN = "#pragma once\n// stand-in for the header a CUDA build of torch generates\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit folder (with include/cuda_runtime.h and bin/nvcc)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a wrapper script on PATH: look for the toolkit path it execs
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            for tok in text.replace('"', " ").split():
                if tok.endswith("/bin/nvcc"):
                    cands.append(tok[: -len("/bin/nvcc")])
        except OSError:
            pass
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


def _torch_includes() -> List[str]:
    from torch.utils.cpp_extension import include_paths

    return include_paths()


def _arch_flags(archs: List[str]) -> List[str]:
    out = []
    for a in archs:
        num = a.replace(".", "").replace("+PTX", "")
        out.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return out


_FUNC = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                   r"(\d+) bytes spill loads")


def ptxas_spills(log: str) -> List[dict]:
    """Per kernel function in ``nvcc -Xptxas -v`` output: {"function", "stack_frame", "spill_stores",
    "spill_loads"} (bytes), names demangled with c++filt where it exists."""
    rows = [{"function": m.group(1), "stack_frame": int(m.group(2)), "spill_stores": int(m.group(3)),
             "spill_loads": int(m.group(4))} for m in _FUNC.finditer(log)]
    filt = shutil.which("c++filt")
    if rows and filt:
        try:
            names = subprocess.run([filt], input="\n".join(r["function"] for r in rows), capture_output=True,
                                   text=True, timeout=30).stdout.splitlines()
            if len(names) == len(rows):
                for r, n in zip(rows, names):
                    r["function"] = n
        except (OSError, subprocess.SubprocessError):
            pass
    return rows


def _run(cmd: List[str]) -> Tuple[int, str, float]:
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr, time.time() - t0


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="compile the CUDA sources of fusedadapter's extension (no GPU needed)")
    ap.add_argument("--arch", action="append", default=None, help="CUDA arch, e.g. 9.0 (repeatable; default 9.0)")
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    ap.add_argument("--cxx", default=os.environ.get("CXX", "c++"))
    args = ap.parse_args(argv)
    archs = args.arch or ["9.0"]
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("compile_check: no CUDA toolkit found (set CUDA_HOME)", file=sys.stderr)
        return 2
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    src = Path(__file__).resolve().parent
    cu_files = sorted(src.glob("*.cu"))
    from . import CUDA_SOURCES

    host_files = [src / f for f in CUDA_SOURCES if f.endswith(".cpp")]
    with tempfile.TemporaryDirectory(prefix="fa-cuda-check-") as tmp:
        includes = _torch_includes()
        if not any(os.path.exists(os.path.join(i, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for i in includes):
            stub = Path(tmp) / "stub" / "c10" / "cuda" / "impl"
            stub.mkdir(parents=True)
            (stub / "cuda_cmake_macros.h").write_text(STAND_IN)
            includes = includes + [str(Path(tmp) / "stub")]
        inc = [f"-I{p}" for p in includes + [str(src), os.path.join(cuda_home, "include"),
                                             sysconfig.get_paths()["include"]]]
        jobs = []
        for f in cu_files:
            jobs.append((f.name, [nvcc, "-c", str(f), "-o", os.path.join(tmp, f.stem + ".o"), "-std=c++20", "-O2",
                                  "-Xcompiler", "-fPIC", "-Xptxas", "-v", *NVCC_FLAGS, *_arch_flags(archs), *inc]))
        for f in host_files:
            jobs.append((f.name, [args.cxx, "-fsyntax-only", "-std=c++20", "-fPIC", "-Wall", str(f), *inc]))
        print(f"compile_check: nvcc {nvcc}, archs {archs}, {len(cu_files)} .cu + {len(host_files)} host .cpp, "
              f"{args.jobs} jobs", flush=True)
        failed = 0
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for (name, _), (rc, out, secs) in zip(jobs, pool.map(lambda j: _run(j[1]), jobs)):
                status = "ok" if rc == 0 else f"FAILED (exit {rc})"
                print(f"  {name}: {status} in {secs:.1f}s", flush=True)
                if rc != 0 or "warning" in out.lower():
                    print("\n".join(line for line in out.splitlines() if not line.startswith("ptxas info"))[-8000:],
                          flush=True)
                failed += rc != 0
                spills = ptxas_spills(out)
                if spills:  # ptxas -v: every kernel's spills (reported, not an error)
                    bad = [r for r in spills if r["spill_stores"] or r["spill_loads"] or r["stack_frame"]]
                    print(f"  {name}: ptxas -v: {len(spills)} kernel(s), {len(bad)} with spills or a stack frame",
                          flush=True)
                    for r in bad:
                        print(f"    {r['function'][:110]}: stack {r['stack_frame']} B, spill stores "
                              f"{r['spill_stores']} B, loads {r['spill_loads']} B", flush=True)
    if failed:
        print(f"compile_check: {failed} file(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
