"""Triton kernels of fusedadapter (installed as ``fusedadapter.kernels``).

:func:`load_triton_op` is the ``triton`` backend's loader (``fusedadapter.dispatch``): it returns
``torch.ops.fusedadapter.fusion_triton``, the op of ``fusedadapter/ops.py``'s schema, or raises
:class:`fusedadapter.errors.BackendUnavailable` saying why it cannot run. Importing this package
does not import Triton; the kernels are defined (and the op registered) on first load.
"""

from __future__ import annotations

import sys

if __name__ == "kernels":
    # Imported as a top-level ``kernels`` from a checkout (its root on sys.path, as ``python -m pytest``
    # puts it): that name is the PyPI package transformers >= 5.25 depends on and imports (its hub
    # kernels). Load that package in our place, so the checkout does not shadow it; installed,
    # this folder is ``fusedadapter.kernels`` and never takes this branch.
    import importlib.machinery
    import importlib.util
    import os

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != _root])
    if _spec is None:
        raise ImportError("no `kernels` package installed (this checkout's kernels/ folder is "
                          "fusedadapter.kernels, not it)")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # (the import statement returns what sys.modules holds)
    _spec.loader.exec_module(_module)
else:
    import torch

__all__ = ["load_triton_op"]


def load_triton_op(device, dtype=None):
    """The ``fusion_triton`` op for ``device``: CUDA natively; CPU only when ``TRITON_INTERPRET=1`` was set
    before the kernels were first imported (the Triton interpreter, for tests). With ``dtype`` (the
    activation dtype), also raises where the kernels would compute wrong at that dtype (bfloat16 under the
    interpreter: :func:`fusion.unsupported_dtype_reason`)."""
    from ..errors import BackendUnavailable

    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailable(f"backend 'triton' needs the `triton` package (pip install 'fusedadapter[triton]'): "
                                 f"{exc}") from exc
    try:
        from . import fusion
    except ImportError as exc:  # e.g. a Triton too old for the kernels
        raise BackendUnavailable(f"backend 'triton': the kernels could not be loaded: {exc}") from exc
    reason = fusion.unsupported_reason(device)
    if reason is not None:
        raise BackendUnavailable(f"backend 'triton' cannot run on {device}: {reason}")
    reason = None if dtype is None else fusion.unsupported_dtype_reason(device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"backend 'triton' cannot run on {device} at {dtype}: {reason}")
    return torch.ops.fusedadapter.fusion_triton
