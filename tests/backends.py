"""The backend matrix: which fused backends run here, and why the others do not.

Tests parametrize over :func:`backend_params` instead of filtering a backend list at import: a
backend that cannot run here stays in the matrix as a skipped case whose reason is its
``BackendUnavailable`` message (``pytest -rs`` lists them), so a broken backend never silently
becomes zero tests.

``FUSEDADAPTER_REQUIRE_BACKENDS=torch,cpu,triton`` (set by .ci/run) goes further: a listed backend
that cannot run here fails the session (tests/conftest.py, ``pytest_sessionstart``).
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, List, Optional, Sequence

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST_BACKENDS = ("torch", "cpu", "triton", "cuda")  # every backend but the eager reference
REQUIRE_ENV = "FUSEDADAPTER_REQUIRE_BACKENDS"


@functools.lru_cache(maxsize=None)
def _availability(device: str, dtype: Optional[torch.dtype]) -> dict:
    import fusedadapter as fa

    return fa.available_backends(device, dtype)


def why_unavailable(backend: str, device: str = DEVICE, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if ``backend`` runs on ``device`` (at ``dtype`` if given), else why not (the
    ``BackendUnavailable`` message)."""
    return _availability(str(device), dtype).get(backend, f"no backend named {backend!r}")


def skip_reason(backend: str, device: str = DEVICE, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    why = why_unavailable(backend, device, dtype)
    if why is None:
        return None
    at = f" at {str(dtype).replace('torch.', '')}" if dtype is not None else ""
    return f"backend {backend!r} unavailable on {device}{at}: BackendUnavailable: {why}"


def runnable(names: Sequence[str] = FAST_BACKENDS, device: str = DEVICE,
             dtype: Optional[torch.dtype] = None) -> List[str]:
    """The backends of ``names`` that run here."""
    return [b for b in names if why_unavailable(b, device, dtype) is None]


def runnable_dtypes(backend: str, dtypes: Iterable[torch.dtype], device: str = DEVICE) -> List[torch.dtype]:
    """The dtypes of ``dtypes`` that ``backend`` accepts here (the Triton interpreter refuses bf16)."""
    return [d for d in dtypes if why_unavailable(backend, device, d) is None]


def backend_params(names: Sequence[str] = FAST_BACKENDS, device: str = DEVICE,
                   dtype: Optional[torch.dtype] = None) -> list:
    """One ``pytest.param`` per backend (id = its name); one that cannot run here is skipped, with
    its ``BackendUnavailable`` message as the reason."""
    out = []
    for b in names:
        why = skip_reason(b, device, dtype)
        out.append(pytest.param(b, id=b, marks=() if why is None else pytest.mark.skip(reason=why)))
    return out


def skip_unless_runnable(backend: str, device: str = DEVICE, dtype: Optional[torch.dtype] = None) -> None:
    """Inside a test: skip it, naming the ``BackendUnavailable`` message, unless ``backend`` runs."""
    why = skip_reason(backend, device, dtype)
    if why is not None:
        pytest.skip(why)


def required_backends(env=None) -> List[str]:
    """The backends ``FUSEDADAPTER_REQUIRE_BACKENDS`` (comma separated) says must run here."""
    value = (os.environ if env is None else env).get(REQUIRE_ENV, "")
    return [b.strip() for b in value.split(",") if b.strip()]


def missing_required(env=None) -> List[str]:
    """One line per required backend that runs on no device here (the CPU, and the GPU where there
    is one: the ``cpu`` backend runs on the CPU only, ``cuda`` on the GPU only); empty: all run."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for b in required_backends(env):
        whys = {d: why_unavailable(b, d) for d in devices}
        if all(w is not None for w in whys.values()):
            out.append(f"{b}: " + "; ".join(f"on {d}: {w}" for d, w in whys.items()))
    return out


def bridge_to_cuda(monkeypatch, name: str, op) -> None:
    """On a GPU machine, load backend ``name`` for CPU tensors as a bridge that runs ``op`` on CUDA
    (inputs copied there, outputs copied back; autograd flows through the copies), so the parity
    tests, which build their sites and the reference on CPU, run the kernels natively."""
    import fusedadapter.dispatch as dispatch

    def loader(device):
        if torch.device(device).type == "cuda":
            return op

        def bridged(*args):
            moved = [a.to("cuda") if isinstance(a, torch.Tensor) else a for a in args]
            out, probs = op(*moved)
            return out.to(device), probs.to(device)

        return bridged

    monkeypatch.setitem(dispatch._LOADERS, name, loader)
