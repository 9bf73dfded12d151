"""Trace-time hooks the package calls while ``torch.export`` / ONNX export runs (a leaf module).

:mod:`fusedadapter.export` documents what export does; these are the pieces the lower layers
(the backend resolver, the site runner, the fold cache, the temperature) call under
``torch.compiler.is_exporting()``. They import only torch and :mod:`fusedadapter.fold`, so no
lower layer imports the export helpers (which import the modules and patching) back.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import fields, replace
from typing import Dict, Optional, Sequence

import torch

from .fold import fold, fold_plain

__all__ = ["ExportError", "lowered_backend", "check_site_exportable", "exported_temperature", "fold_for_export"]


class ExportError(RuntimeError):
    """A fusion site cannot be exported as it is (which site, and why, in the message)."""


# --------------------------------------------------------------------------------------------
# Hooks called by the package while exporting
# --------------------------------------------------------------------------------------------
def lowered_backend(requested: str) -> str:
    """The backend a site uses while exporting: ``reference`` stays, every other one is ``torch``."""
    return "reference" if requested == "reference" else "torch"


def check_site_exportable(site, *, dropout_p: float, temperature=1.0) -> None:
    """Raise :class:`ExportError` for training-mode logit dropout; warn for a temperature schedule
    that is not the module's own (AdapterHub's ``BertFusion`` under :func:`fusedadapter.accelerate`)."""
    if dropout_p > 0:
        raise ExportError(
            f"fusedadapter: cannot export {_describe(site)} in training mode: its fusion logit dropout "
            f"(p={dropout_p}) draws a random mask on every call, which an inference graph does not "
            f"reproduce. Call model.eval() before exporting.")
    fusion = getattr(site, "fusion", None)  # an accelerated AdapterHub site: BertFusion's config
    config = getattr(fusion, "config", None)
    if isinstance(config, dict) and config.get("temperature"):
        _warn_temperature(site, temperature)


def _warn_temperature(site, value) -> None:
    warnings.warn(
        f"fusedadapter: {_describe(site)} uses temperature=True (AdapterHub lowers T on every call); the "
        f"exported graph uses the current T={float(value):.6g} as a constant and does not lower it",
        UserWarning, stacklevel=5)


def exported_temperature(site, buffer: torch.Tensor):
    """The fusion temperature while exporting: the current value as a float constant (not stepped),
    with a warning. ``buffer`` is the module's temperature buffer (a fake tensor under the trace)."""
    real = buffer
    if _is_fake(buffer):
        found = _fake_to_real([buffer])
        real = None if found is None else found[id(buffer)]
    if real is None:  # strict export: keep the traced value (not stepped)
        _warn_temperature(site, float("nan"))
        return buffer.reshape(()).clone()
    with _outside_trace():
        value = float(real.reshape(()))
    _warn_temperature(site, value)
    return value


def _describe(site) -> str:
    names = getattr(site, "adapter_names", None)
    if names is None and getattr(site, "fusion", None) is not None:  # an accelerated AdapterHub site
        return f"the AdapterHub fusion layer {type(site.fusion).__name__} ({site.num_adapters} adapters)"
    return (f"the fusion site {type(site).__name__}(hidden_size={site.hidden_size}"
            + (f", adapters={list(names)})" if names is not None else ")"))


def _fake_to_real(fakes: Sequence[torch.Tensor]) -> Optional[Dict[int, torch.Tensor]]:
    """{id(fake): real tensor} for the given fake tensors of the running export, or None.

    Non-strict ``torch.export`` makes each parameter's fake with ``fake_mode.from_tensor(real)``,
    which memoizes real -> fake; this inverts that memo for the fakes asked for."""
    try:
        from torch._guards import detect_fake_mode

        mode = detect_fake_mode(list(fakes))
        if mode is None:
            return None
        conv = mode.fake_tensor_converter
        memo = conv.tensor_memo
        lookup = conv.meta_converter.describer.lookup_tensor
        wanted = {id(f) for f in fakes}
        found: Dict[int, torch.Tensor] = {}
        for real, tid in list(lookup.items()):
            fake = memo.get(tid)
            if fake is not None and id(fake) in wanted:
                found[id(fake)] = real
        return found if len(found) == len(wanted) else None
    except Exception:  # a torch without these internals: fall back to the traced fold
        return None


@contextlib.contextmanager
def _outside_trace():
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    # (no torch.no_grad() here: under the trace it would leave an empty grad-mode region in the
    # graph; the real tensors are detached instead)
    with unset_fake_temporarily(), disable_proxy_modes_tracing():
        yield


def _swap_tensors(obj, mapping):
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return mapping[id(obj)]
    if hasattr(obj, "__dataclass_fields__"):
        return replace(obj, **{f.name: _swap_tensors(getattr(obj, f.name), mapping) for f in fields(obj)
                               if isinstance(getattr(obj, f.name), torch.Tensor)})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_swap_tensors(o, mapping) for o in obj)
    return obj


def _tensors_of(obj) -> list:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for f in fields(obj) for t in _tensors_of(getattr(obj, f.name))]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_of(o)]
    return []


_warned_traced_fold = False


def fold_for_export(tag: str, dtype: torch.dtype, make, adapters, fusion=None):
    """The fold cache's export path: the fold of the *real* parameters, computed now, as constants.

    ``tag`` names the fold ("folded": :func:`fusedadapter.fold.fold` of ``adapters`` and ``fusion``;
    "plain": :func:`fusedadapter.fold.fold_plain` of ``fusion``); ``make`` is the traced
    fallback, used (with one warning) when the real parameters cannot be reached (strict export)."""
    global _warned_traced_fold

    fns = {"folded": lambda ads, fus: fold(ads, fus, dtype), "plain": lambda ads, fus: fold_plain(fus, dtype)}
    tensors = _tensors_of(adapters) + _tensors_of(fusion)
    mapping = None
    if tag in fns and not torch.compiler.is_dynamo_compiling():
        fakes = [t for t in tensors if _is_fake(t)]
        if len(fakes) == len(tensors):
            mapping = _fake_to_real(fakes)
        elif not fakes:  # real tensors already (e.g. a site built inside the traced function)
            mapping = {id(t): t for t in tensors}
    if mapping is None:
        if not _warned_traced_fold:
            _warned_traced_fold = True
            warnings.warn("fusedadapter: exporting with the fold traced into the graph (float64 ops on the "
                          "parameters at every inference); use non-strict torch.export (the default) for "
                          "folded constants", RuntimeWarning, stacklevel=3)
        return make()
    with _outside_trace():
        mapping = {k: v.detach() for k, v in mapping.items()}
        value = fns[tag](_swap_tensors(list(adapters), mapping), _swap_tensors(fusion, mapping))
    return value


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)
