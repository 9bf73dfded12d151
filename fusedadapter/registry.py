"""What integrations register so that :mod:`fusedadapter.patching` can call them without importing them.

An integration that changes a model on its own (``fusedadapter.integrations.adapterhub``'s
:func:`~fusedadapter.accelerate` replaces AdapterHub's ``compose_fuse`` on instances) registers
how to undo that and how to switch the backend of its sites; :func:`fusedadapter.unpatch` and
:func:`fusedadapter.patching.set_backend` call every registered hook. A leaf module: it imports
nothing from fusedadapter, so the integrations sit above patching and patching never imports them.
"""

from __future__ import annotations

from typing import Callable, List

from torch import nn

__all__ = ["register_integration", "undo_integrations", "set_integration_backend"]

_UNDO: List[Callable[[nn.Module], bool]] = []
_SET_BACKEND: List[Callable[[nn.Module, str], bool]] = []


def register_integration(*, undo: Callable[[nn.Module], bool], set_backend: Callable[[nn.Module, str], bool]) -> None:
    """``undo(model)``: remove what the integration did to ``model`` (True if it found anything);
    ``set_backend(model, name)``: switch its sites' backend (True if it found any). Idempotent."""
    if undo not in _UNDO:
        _UNDO.append(undo)
    if set_backend not in _SET_BACKEND:
        _SET_BACKEND.append(set_backend)


def undo_integrations(model: nn.Module) -> bool:
    """Every registered undo on ``model``; True if any found something to undo."""
    found = False
    for fn in list(_UNDO):
        found = fn(model) or found
    return found


def set_integration_backend(model: nn.Module, backend: str) -> bool:
    """Every registered backend switch on ``model``; True if any found a site."""
    found = False
    for fn in list(_SET_BACKEND):
        found = fn(model, backend) or found
    return found
