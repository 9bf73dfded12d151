"""The package's exception types: a leaf module (imports nothing from fusedadapter), so every layer
(dispatch, the C++ extension loader, the Triton kernels) can raise them without importing the
others. Each is re-exported where it was first defined (``fusedadapter.BackendUnavailable``,
``fusedadapter.dispatch.BackendUnavailable``)."""

from __future__ import annotations

__all__ = ["BackendUnavailable"]


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run on this machine or for these inputs."""
