"""Integrations with other libraries. Nothing here imports them at ``import fusedadapter`` time."""

from .adapterhub import accelerate

__all__ = ["accelerate"]
