"""The ``cpu`` and ``cuda`` backends: the C++/CUDA extension in ``csrc/``, built on first use.

``load_native_op(name, device)`` returns ``torch.ops.fusedadapter.fusion_<name>`` (schema:
:data:`fusedadapter.ops.FUSION_SCHEMA`), compiling the extension with ninja through
``torch.utils.cpp_extension.load`` the first time (a message is printed while it compiles; later
processes reuse the cached build) and registering the ops' fake implementations and autograd
(:func:`fusedadapter.kernel_ops.register_kernel_op`). It raises
:class:`fusedadapter.errors.BackendUnavailable` with the reason when the backend cannot run here
(no C++ compiler, no ninja, no CUDA, a failed build); ``backend="auto"`` then falls back to
``torch`` with one warning.

Build knobs (environment variables, printed when a build starts; ``python -m
fusedadapter.extension`` builds ahead of time and prints them):

``FUSEDADAPTER_BUILD_DIR``       build cache (default ``$TORCH_EXTENSIONS_DIR/fusedadapter`` or
                                 ``~/.cache/fusedadapter``), one sub-folder per torch install
``FUSEDADAPTER_CUDA_ARCH_LIST``  CUDA architectures, default ``8.0;9.0`` (``+PTX`` adds PTX)
``FUSEDADAPTER_SKIP_CUDA``       ``1``: never build the CUDA extension (backend ``cuda`` unavailable)
``FUSEDADAPTER_CPU_ISA``         run-time cap on the CPU kernels: ``avx512bf16`` (default),
                                 ``avx512`` or ``generic`` (ATen BLAS + scalar epilogue only)
``FUSEDADAPTER_CPU_ONEDNN``      run-time: the cpu backend's float32 backward products on oneDNN's
                                 matmul (x86 with AVX-512, where torch has it; from 16 rows; MKL's
                                 sgemm runs AVX2 code on AMD CPUs). Default ``1``; ``0`` / ``off``:
                                 ATen's BLAS (csrc/cpu_kernels.h has the measurements). Read when the
                                 extension loads, like ``FUSEDADAPTER_CPU_ISA``
``FUSEDADAPTER_VERBOSE_BUILD``   ``1``: show the compiler output
``MAX_JOBS``                     parallel compile jobs (read by torch; default: all cores)
``CXX``                          the C++ compiler (default ``c++``)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .errors import BackendUnavailable
from .kernel_ops import register_kernel_op

__all__ = ["load_native_op", "build_settings", "cuda_arch_flags"]

_lock = threading.RLock()
_ops: Dict[str, Callable] = {}
_errors: Dict[str, str] = {}
_libs: List[torch.library.Library] = []  # keep the fake/autograd registrations alive

_TRUE = ("1", "true", "yes", "on")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def build_settings() -> Dict[str, object]:
    """The build knobs as read from the environment now."""
    root = os.environ.get("FUSEDADAPTER_BUILD_DIR")
    if not root:
        ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR")
        root = os.path.join(ext_dir, "fusedadapter") if ext_dir else os.path.join(Path.home(), ".cache", "fusedadapter")
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    cu = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    # one cache per torch install (two virtual environments must not rebuild each other's copy)
    where = hashlib.sha1(os.path.dirname(torch.__file__).encode()).hexdigest()[:8]
    tag = f"torch{torch.__version__.split('+')[0]}-{cu}-{py}-{sysconfig.get_platform()}-{where}"
    return {
        "build_dir": os.path.join(root, tag),
        "cuda_arch_list": os.environ.get("FUSEDADAPTER_CUDA_ARCH_LIST", "8.0;9.0"),
        "skip_cuda": _env_flag("FUSEDADAPTER_SKIP_CUDA"),
        "cpu_isa": os.environ.get("FUSEDADAPTER_CPU_ISA", "avx512bf16"),
        "cpu_onednn": os.environ.get("FUSEDADAPTER_CPU_ONEDNN", "(unset: 1)"),
        "verbose": _env_flag("FUSEDADAPTER_VERBOSE_BUILD"),
        "max_jobs": os.environ.get("MAX_JOBS", f"(unset: {os.cpu_count()})"),
        "cxx": os.environ.get("CXX", "c++"),
    }


def cuda_arch_flags(arch_list: str) -> List[str]:
    """nvcc -gencode flags for an arch list such as ``"8.0;9.0"`` or ``"90+PTX"``."""
    flags = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item[:-4] if ptx else item
        num = num.replace(".", "")
        if not num.isdigit():
            raise ValueError(f"FUSEDADAPTER_CUDA_ARCH_LIST: cannot read architecture {item!r} (expected e.g. 8.0;9.0)")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError("FUSEDADAPTER_CUDA_ARCH_LIST is empty")
    return flags


def _openmp_parallel() -> bool:
    """Whether torch's ATen parallel backend is OpenMP (its parallel_for then inlines OpenMP)."""
    return "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()


def _source_dir() -> Path:
    from . import csrc  # the csrc/ folder, installed as fusedadapter.csrc

    return Path(csrc.SOURCE_DIR)


def _describe(settings: Dict[str, object], kind: str) -> str:
    knobs = [f"MAX_JOBS={settings['max_jobs']}", f"CXX={settings['cxx']}", f"FUSEDADAPTER_CPU_ISA={settings['cpu_isa']}",
             f"FUSEDADAPTER_CPU_ONEDNN={settings['cpu_onednn']}"]
    if kind == "cuda":
        knobs += [f"FUSEDADAPTER_CUDA_ARCH_LIST={settings['cuda_arch_list']}",
                  f"FUSEDADAPTER_SKIP_CUDA={int(bool(settings['skip_cuda']))}"]
    return ", ".join(knobs)


def _is_stale(build_dir: str, name: str, files: List[Path]) -> bool:
    lib = Path(build_dir) / f"{name}.so"
    if not lib.exists():
        return True
    built = lib.stat().st_mtime
    return any(f.exists() and f.stat().st_mtime > built for f in files)


def _check_toolchain(kind: str, settings: Dict[str, object]) -> None:
    from torch.utils import cpp_extension

    if kind == "cuda":
        if settings["skip_cuda"]:
            raise BackendUnavailable("backend 'cuda' is disabled by FUSEDADAPTER_SKIP_CUDA=1")
        if torch.version.cuda is None:
            raise BackendUnavailable(f"backend 'cuda' needs a CUDA build of torch (this is {torch.__version__})")
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend 'cuda' needs a CUDA device (torch.cuda.is_available() is False)")
        if cpp_extension.CUDA_HOME is None:
            raise BackendUnavailable("backend 'cuda' needs the CUDA toolkit (nvcc) to build its extension; set CUDA_HOME")
    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable(f"backend {kind!r} builds its C++ extension with ninja, which was not found "
                                 f"(pip install ninja)")
    cxx = str(settings["cxx"])
    if shutil.which(cxx) is None:
        raise BackendUnavailable(f"backend {kind!r} needs a C++ compiler to build its extension; {cxx!r} was not found "
                                 f"(install g++ or clang, or set CXX)")


def _build(kind: str) -> Callable:
    from torch.utils import cpp_extension

    from . import csrc

    settings = build_settings()
    _check_toolchain(kind, settings)
    src = _source_dir()
    name = f"fusedadapter_{kind}"
    build_dir = os.path.join(str(settings["build_dir"]), kind)
    os.makedirs(build_dir, exist_ok=True)
    sources = [src / f for f in (csrc.CPU_SOURCES if kind == "cpu" else csrc.CUDA_SOURCES)]
    headers = [src / f for f in csrc.HEADERS]
    missing = [str(p) for p in sources if not p.exists()]
    if missing:
        raise BackendUnavailable(f"backend {kind!r}: extension sources missing: {missing}")
    cflags = ["-O3", "-fno-math-errno"]
    ldflags: List[str] = []
    if kind == "cpu" and _openmp_parallel():
        # ATen's parallel_for is inline OpenMP in torch's OpenMP builds: without -fopenmp the kernels'
        # parallel loops (the packed GEMMs, the epilogues) ran on one thread whatever
        # torch.get_num_threads() said. Linked against libgomp.so.1, the runtime torch has loaded.
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    cuda_cflags: List[str] = []
    if kind == "cuda":
        cuda_cflags = ["-O3", "-lineinfo"] + cuda_arch_flags(str(settings["cuda_arch_list"]))
    if _is_stale(build_dir, name, sources + headers):
        print(f"fusedadapter: compiling the {kind!r} backend's C++ extension (first use; cached in {build_dir}); "
              f"{_describe(settings, kind)}", file=sys.stderr, flush=True)
    try:
        cpp_extension.load(name=name, sources=[str(s) for s in sources], extra_cflags=cflags,
                           extra_ldflags=ldflags or None,
                           extra_cuda_cflags=cuda_cflags or None, extra_include_paths=[str(src)],
                           build_directory=build_dir, verbose=bool(settings["verbose"]), with_cuda=kind == "cuda",
                           is_python_module=False)
    except Exception as exc:  # compiler errors, linker errors, a broken toolchain
        text = str(exc).strip().splitlines()
        tail = "\n".join(text[-15:])
        raise BackendUnavailable(f"backend {kind!r}: building the C++ extension failed ({type(exc).__name__}); "
                                 f"set FUSEDADAPTER_VERBOSE_BUILD=1 for the full log:\n{tail}") from exc
    lib = torch.library.Library("fusedadapter", "FRAGMENT")
    _libs.append(lib)
    register_kernel_op(f"fusion_{kind}", {}, {}, lib=lib, define=False)
    if kind == "cpu":
        from . import cpu_train

        cpu_train.register(lib)
    return getattr(torch.ops.fusedadapter, f"fusion_{kind}").default


def _load(kind: str) -> Callable:
    op = _ops.get(kind)
    if op is not None:
        return op
    with _lock:
        if kind in _ops:
            return _ops[kind]
        if kind in _errors:
            raise BackendUnavailable(_errors[kind])
        try:
            op = _build(kind)
        except BackendUnavailable as exc:
            _errors[kind] = str(exc)
            raise
        _ops[kind] = op
        return op


def load_native_op(name: str, device) -> Callable:
    """The op of backend ``name`` (``"cpu"`` or ``"cuda"``) for ``device``; builds on first use."""
    device = torch.device(device)
    if name not in ("cpu", "cuda"):
        raise ValueError(f"load_native_op: unknown native backend {name!r}; expected 'cpu' or 'cuda'")
    if device.type != name:
        raise BackendUnavailable(f"backend {name!r} runs on {name.upper() if name == 'cuda' else 'CPU'} tensors, "
                                 f"not on {device.type!r}")
    return _load(name)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fusedadapter.extension [cpu] [cuda]``: build ahead of time, print the knobs."""
    kinds = (argv if argv is not None else sys.argv[1:]) or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    settings = build_settings()
    for k, v in settings.items():
        print(f"{k}: {v}")
    status = 0
    for kind in kinds:
        try:
            _load(kind)
            print(f"{kind}: ok")
            if kind == "cpu":
                isa = torch.ops.fusedadapter._cpu_config()
                print(f"cpu kernels: detected isa {isa[0]}, active {isa[1]} (0 generic, 1 avx512, 2 avx512bf16), "
                      f"small_m_max {isa[2]}, bf16_min_m {isa[3]}, vector math {'yes' if isa[4] else 'no'}, "
                      f"fp32 gemm {isa[5]} (0 packed, 1 blas, 2 onednn), onednn backward from {isa[6]} rows "
                      f"(op {'found' if isa[7] else 'missing'})")
        except BackendUnavailable as exc:
            print(f"{kind}: unavailable: {exc}")
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
