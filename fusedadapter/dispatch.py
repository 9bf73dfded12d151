"""Which backend runs a fusion site: one registry, one ``auto`` rule.

``auto`` reads ``dispatch_table.json`` (shipped in the package, written from committed
benchmark results by ``python -m benchmarks table``): for (device type, dtype, token bucket) it
names the backend that measured fastest, in two modes: ``table`` from the no-grad rows (serving)
and ``training`` from the training-step rows (forward + backward with the fusion weights trained;
a training call is one under autograd where a fusion or adapter weight requires grad). A training
call whose (device, dtype, bucket) has no training row uses the no-grad choice. A device type with
no committed results uses the ``torch`` backend. When the table names a backend that cannot run here (no compiler, no
Triton, no GPU), ``auto`` warns once and uses ``torch``. A backend requested by name that
cannot run raises :class:`BackendUnavailable`.
"""

from __future__ import annotations

import json
import threading
import warnings
from importlib import resources
from typing import Callable, Dict, Optional, Tuple

import torch

from . import cpu_train
from .errors import BackendUnavailable  # re-exported: fusedadapter.dispatch.BackendUnavailable
from .ops import fusion_torch

__all__ = ["BACKENDS", "BackendUnavailable", "resolve_backend", "fusion_op", "token_bucket", "available_backends",
           "register_backend", "dispatch_table", "check_backend_name"]

BACKENDS = ("reference", "torch", "triton", "cuda", "cpu")
TOKEN_BUCKETS = (16, 256, 4096)  # upper edges; a larger count falls in the last, open bucket


# name -> loader(device) returning the op callable, or raising BackendUnavailable with the reason.
_LOADERS: Dict[str, Callable[[torch.device], Callable]] = {}
_lock = threading.Lock()
_warned: set = set()


def check_backend_name(name, *, context: str = "", allow_auto: bool = True) -> str:
    """``name`` if it names a backend (or ``"auto"``, where allowed); else a ValueError listing the names.
    The one home of this check: the module, ``patch``, ``accelerate`` and ``set_backend`` call it."""
    if (allow_auto and name == "auto") or name in BACKENDS:
        return name
    expected = f"'auto' or one of {BACKENDS}" if allow_auto else f"one of {BACKENDS}"
    raise ValueError(f"{context + ': ' if context else ''}unknown backend {name!r}; expected {expected}")


def register_backend(name: str, loader: Callable[[torch.device], Callable]) -> None:
    check_backend_name(name, allow_auto=False)
    _LOADERS[name] = loader


def _load_torch(device: torch.device):
    return fusion_torch


def _load_triton(device: torch.device):
    try:
        from .kernels import load_triton_op
    except ImportError as exc:  # triton missing or the kernels package not built
        raise BackendUnavailable(f"backend 'triton' needs the `triton` package: {exc}") from exc
    return load_triton_op(device)


def _load_native(name: str):
    def loader(device: torch.device):
        try:
            from .extension import load_native_op
        except ImportError as exc:
            raise BackendUnavailable(f"backend {name!r} is not available: {exc}") from exc
        return load_native_op(name, device)

    return loader


register_backend("torch", _load_torch)
register_backend("triton", _load_triton)
register_backend("cpu", _load_native("cpu"))
register_backend("cuda", _load_native("cuda"))


def _triton_dtype_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    try:  # reached only after the loader succeeded (or a test replaced it)
        from .kernels.fusion import unsupported_dtype_reason
    except ImportError:
        return None
    return unsupported_dtype_reason(device, dtype)


# name -> check(device, dtype) returning why the backend computes wrong at that dtype there, or None
_DTYPE_CHECKS: Dict[str, Callable[[torch.device, torch.dtype], Optional[str]]] = {"triton": _triton_dtype_reason}


def fusion_op(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Callable:
    """The op callable of backend ``name`` for ``device`` (raises BackendUnavailable); with ``dtype``, also
    raises where the backend is known to compute wrong at that activation dtype (bf16 under the Triton
    interpreter)."""
    if name == "reference":
        raise ValueError("the reference backend is eager module code, not an op")
    if name not in _LOADERS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or 'auto'")
    device = torch.device(device)
    op = _LOADERS[name](device)
    check = _DTYPE_CHECKS.get(name) if dtype is not None else None
    reason = check(device, dtype) if check is not None else None
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device} at {dtype}: {reason}")
    return op


def available_backends(device="cpu", dtype: Optional[torch.dtype] = None) -> Dict[str, Optional[str]]:
    """{backend: None if it runs on ``device`` (at activation ``dtype`` if given), else the reason it does not}."""
    out: Dict[str, Optional[str]] = {"reference": None}
    for name in _LOADERS:
        try:
            fusion_op(name, device, dtype)
            out[name] = None
        except BackendUnavailable as exc:
            out[name] = str(exc)
    return out


_TABLE: Optional[dict] = None


def dispatch_table() -> dict:
    global _TABLE
    if _TABLE is None:
        text = resources.files("fusedadapter").joinpath("dispatch_table.json").read_text()
        _TABLE = json.loads(text)
    return _TABLE


def token_bucket(tokens: int) -> str:
    lo = 0
    for hi in TOKEN_BUCKETS:
        if tokens <= hi:
            return f"{lo + 1 if lo else 0}-{hi}"
        lo = hi
    return f">{TOKEN_BUCKETS[-1]}"


def _auto_choice(device: torch.device, dtype: torch.dtype, tokens: int, training=False) -> Tuple[str, str]:
    """(backend, the table mode it came from: "training", "table" or "default")."""
    table = dispatch_table()
    key = (device.type, str(dtype).replace("torch.", ""), token_bucket(tokens))
    modes = (("training", "table") if (training() if callable(training) else training) else ("table",))
    for mode in modes:
        choice = table.get(mode, {}).get(key[0], {}).get(key[1], {}).get(key[2])
        if choice is not None:
            return choice, mode
    return "torch", "default"


def _row_holds(name: str, mode: str) -> bool:
    """Whether a table row naming ``name`` describes the backend as it runs here. The cpu backend's
    training rows were measured with its training call (fusedadapter.cpu_train) and the backward's
    float32 products on oneDNN: with the extension loaded otherwise (FUSEDADAPTER_CPU_ONEDNN=0, a CPU
    without AVX-512, torch without oneDNN) it trained at 0.85x-0.97x the torch backend there."""
    return name != "cpu" or mode != "training" or cpu_train.trains_as_measured()


def resolve_backend(requested: str, device, dtype: torch.dtype, tokens: int, training=False) -> Tuple[str, Callable]:
    """(name, op) for a site call. ``requested`` is a backend name or ``"auto"``; ``training`` (a bool, or
    a callable asked only for ``"auto"``): the call trains (``auto`` then reads the table's training rows)."""
    if torch.compiler.is_exporting():  # every backend lowers to the composite torch form (fusedadapter.export)
        from .export_hooks import lowered_backend

        name = lowered_backend(requested)
        return name, (fusion_torch if name == "torch" else None)
    device = torch.device(device)
    if requested == "reference":
        return "reference", None
    if requested != "auto":
        return requested, fusion_op(requested, device, dtype)
    name, mode = _auto_choice(device, dtype, tokens, training)
    if name in ("torch", "reference"):
        return name, (fusion_torch if name == "torch" else None)
    try:
        op = fusion_op(name, device, dtype)
        return (name, op) if _row_holds(name, mode) else ("torch", fusion_torch)
    except BackendUnavailable as exc:
        with _lock:
            if name not in _warned:
                _warned.add(name)
                warnings.warn(f"fusedadapter: backend 'auto' chose {name!r} for {device.type}/{dtype}, but it cannot "
                              f"run here ({exc}); using 'torch' instead", RuntimeWarning, stacklevel=3)
        return "torch", fusion_torch
