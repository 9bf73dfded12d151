"""The hooks of a patched site and their per-thread state.

Each site of :func:`fusedadapter.patch` is two module hooks around a :class:`_SiteRuntime`: a
forward pre-hook (:func:`_capture_hook`) on the module whose input is the sub-layer input ``x``
stores it, and a forward hook (:func:`_output_hook`) on the module whose output is ``h`` replaces
``h`` by the site's output (AdapterHub's ``pre_forward`` inputs, then the fusion). What one call
passes between them is per thread (see :class:`_SiteRuntime`). Installed and removed by
:mod:`fusedadapter.patching`, which re-exports these names.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Optional, Tuple, Union

import torch
from torch import nn

from .masking import current_adapter_mask

if TYPE_CHECKING:
    from .modules import FusedAdapterFusion


class _SiteRuntime:
    """One site's hook state (a plain object: not a module, so no extra parameter names).

    What one call passes from the capture hook to the output hook (the sub-layer input ``x``, the
    "armed" flag) and the :func:`collect_fusion_probs` store live in a ``threading.local`` of the
    runtime: each thread has its own, so threads calling one model never see each other's
    captures or collect each other's probabilities. (Non-reentrant gradient checkpointing
    recomputes in the thread that calls ``backward`` on CPU; its capture and output hooks run in
    the same thread, in order, so they pair up.) ``torch.compile`` traces the reads and writes.
    ``x``, ``armed`` and ``collector`` are properties over this thread's state.
    """

    def __init__(self, fusion: FusedAdapterFusion, layer_norm: Optional[nn.Module], layer_idx: int, location: str,
                 original_ln_before: bool, residual_before_ln: Union[bool, str], fusion_name: str):
        self.fusion = fusion
        # Held outside the module tree (the model already owns it).
        self.layer_norm = layer_norm
        self.layer_idx = layer_idx
        self.location = location
        self.original_ln_before = bool(original_ln_before)
        self.residual_before_ln = residual_before_ln
        qbl = getattr(fusion, "query_before_ln", None)  # a MultiFusion's (its fusions' common flag)
        self.query_before_ln = bool(fusion.fusion_config.query_before_ln if qbl is None else qbl)
        self.fusion_name = fusion_name
        self._local = threading.local()

    # A threading.local cannot be copied or pickled: a deep copy (or pickle) of a patched model
    # gets fresh, empty per-thread state.
    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    # ---- this thread's state (attributes absent until first set: getattr with a default)
    @property
    def x(self) -> Optional[torch.Tensor]:
        return getattr(self._local, "x", None)

    @x.setter
    def x(self, value: Optional[torch.Tensor]) -> None:
        self._local.x = value

    @property
    def armed(self) -> bool:
        return getattr(self._local, "armed", False)

    @armed.setter
    def armed(self, value: bool) -> None:
        self._local.armed = value

    @property
    def collector(self) -> Optional[dict]:
        return getattr(self._local, "collector", None)

    @collector.setter
    def collector(self, value: Optional[dict]) -> None:
        self._local.collector = value

    def inputs(self, h: torch.Tensor, x: Optional[torch.Tensor]):
        """AdapterHub's ``Adapter.pre_forward``: (adapter input, query or None for "same", residual)."""
        residual = h if self.residual_before_ln is True else None
        query = h if self.query_before_ln else None
        a = h
        if self.original_ln_before:
            if self.layer_norm is not None:
                s = h + x
                if self.residual_before_ln == "post_add":
                    residual = s
                a = self.layer_norm(s)
            elif x is not None:
                a = h + x
        if not self.residual_before_ln:
            residual = a
        return a, query, residual

    def run(self, h: torch.Tensor) -> torch.Tensor:
        local = self._local
        x = getattr(local, "x", None)
        local.x, local.armed = None, False
        a, query, residual = self.inputs(h, x)
        # The mask of an enclosing fa.adapter_mask block, expanded to this call's batch where
        # generate() repeated each row (num_beams / num_return_sequences). Outside any block (the
        # argument-free call is one thread-local read) nothing else is read: this runs per layer per
        # token in decoding.
        mask = current_adapter_mask()
        if mask is not None:
            mask = current_adapter_mask(self.fusion.adapters, batch=a.shape[0] if a.dim() >= 2 else None)
        collector = getattr(local, "collector", None)
        if collector is None:
            return self.fusion(a, residual, query, adapter_mask=mask)
        out, probs = self.fusion(a, residual, query, return_probs=True, adapter_mask=mask)
        collector.setdefault(self.fusion_name, {}).setdefault(self.layer_idx, {})[self.location] = probs.detach()
        return out


def _capture_hook(runtime: _SiteRuntime, index: int, names: Tuple[str, ...], module, args, kwargs):
    if len(args) > index:
        x = args[index]
    else:
        x = None
        for name in names:
            if name in kwargs:
                x = kwargs[name]
                break
    local = runtime._local
    local.x = x
    local.armed = True
    return None


def _output_hook(runtimes: Tuple[_SiteRuntime, ...], module, args, output):
    for rt in runtimes:  # several sites may share one module (ViT 5.x block dropout): the armed one
        if getattr(rt._local, "armed", False):
            if isinstance(output, torch.Tensor):
                return rt.run(output)
            if isinstance(output, (tuple, list)) and len(output) > 0 and isinstance(output[0], torch.Tensor):
                return type(output)((rt.run(output[0]),) + tuple(output[1:]))
            raise TypeError(f"fusedadapter: unexpected output {type(output).__name__} of {type(module).__name__} at "
                            f"site {rt.location} of block {rt.layer_idx}")
    return None
