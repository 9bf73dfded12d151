"""The fusion site: one abstract base (:class:`FusionSite`) and the fold cache it owns.

A site is N bottleneck adapters and AdapterHub's fusion attention over them. The shared runner
(:func:`fusedadapter.runner.run_site`) reads a site through this base's methods:
``adapter_weights(dtype)``, ``fusion_weights(dtype)``, ``folded(dtype)``, ``plain_folded(dtype)``
and ``reference(...)``. The base implements all of them, with the fold cache; a subclass supplies
only where the weights live (as PEFT's ``BaseTunerLayer`` and vLLM's ``PunicaWrapperBase`` do):

* :class:`fusedadapter.FusedAdapterFusion` (modules.py): its own ``nn.Module`` parameters;
* ``_ExplicitSite`` (functional.py): explicit tensors of :func:`fusedadapter.adapter_fusion`, no cache;
* ``_AdapterHubSite`` (integrations/adapterhub.py): AdapterHub's own modules, in place.

The fold cache is keyed on every input of the fold (each tensor's identity, storage, version
counter, dtype, device and ``requires_grad``; float scalings, activations and ``ln_before`` flags
by value), so scaling edits, optimizer steps, ``load_state_dict``, ``.to()``, ``.half()`` and
in-place edits under ``no_grad`` all invalidate it. (Writes through ``.data`` bypass the version
counter; call :meth:`FusionSite.invalidate_fold_cache` after those.)
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .fold import (AdapterWeights, Folded, FusionWeights, fold, fold_adapters, fold_fusion_train, fold_plain,
                   pack_gemm1)
from .reference import reference_fusion

__all__ = ["FusionSite", "cached_fold", "site_fold", "fold_inputs_key", "ScaledUp", "WeightsAdapter"]


def _stamp(t):
    return (id(t), t.data_ptr(), t._version, t.dtype, t.device, t.requires_grad)


def fold_inputs_key(adapters, fusion):
    """(key, tensors): everything :func:`fusedadapter.fold.fold` reads from ``adapters``
    (AdapterWeights) and ``fusion`` (FusionWeights, or None for the adapter half alone).

    A tensor enters by identity, storage, version counter, dtype, device and ``requires_grad``;
    anything else (float scalings, activation codes, ``ln_before`` flags, which fusion weights are
    absent) by value. ``tensors`` lists every tensor read (kept alive by the cache entry, so an id
    in a key can never be reused by another tensor while the entry exists)."""
    parts, tensors = [], []
    fields = []
    for w in adapters:
        fields.extend((w.down_weight, w.down_bias, w.up_weight, w.up_bias, w.scaling, w.ln_weight, w.ln_bias))
        parts.append((int(w.activation), bool(w.ln_before)))
    if fusion is not None:
        fields.extend((fusion.query_weight, fusion.query_bias, fusion.key_weight, fusion.key_bias,
                       fusion.value_weight))
    for t in fields:
        if isinstance(t, torch.Tensor):
            tensors.append(t)
            parts.append(_stamp(t))
        else:
            parts.append(t if t is None else (type(t), t))
    return tuple(parts), tensors


def cached_fold(holder, tag, dtype, make, adapters, fusion=None):
    """``make()`` (a fold of ``adapters``/``fusion``), cached on ``holder._fold_cache[tag]`` while valid.

    The key (:func:`fold_inputs_key`) holds every input of the fold. Under autograd with trainable
    inputs, or while compiling, the fold is rebuilt (differentiable) every call. Inference tensors
    (made under ``inference_mode``) have no version counter, so an in-place edit could not be seen:
    their folds are never cached.
    """
    if torch.compiler.is_exporting():  # constants from the real parameters (fusedadapter.export)
        from .export_hooks import fold_for_export

        return fold_for_export(tag, dtype, make, adapters, fusion)
    if torch.compiler.is_compiling():  # in-graph fold; nothing here for dynamo to guard on
        return make()
    key, tensors = fold_inputs_key(adapters, fusion)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return make()
    if any(t.is_inference() for t in tensors):
        with torch.no_grad():
            return make()
    key = (dtype, key)
    cache = holder._fold_cache
    if cache is None:
        cache = holder._fold_cache = {}
    entry = cache.get(tag)
    if entry is not None and entry[0] == key:
        return entry[2]
    with torch.no_grad():
        value = make()
        if isinstance(value, Folded):  # GEMM1's weights as one buffer: one GEMM a call on the torch backend
            value = pack_gemm1(value)
    cache[tag] = (key, tensors, value)
    return value


def site_fold(holder, adapters, fusion, dtype, n_tokens=None):
    """The folded weights for one call of a site (``holder`` carries ``_fold_cache``).

    * no autograd, or nothing trainable: the whole fold, cached (:func:`cached_fold`);
    * adapters trainable (joint training): the whole fold under autograd, every call;
    * adapters frozen, fusion trainable (AdapterFusion stage 2): the adapter half (the [U; C] rows,
      the LN-folded down projections) is cached with the same key rules as the eval fold, and only
      the products with the trained fusion weights run under autograd, in the form and precision
      :func:`fusedadapter.fold.fold_fusion_train` picks for ``n_tokens``.
    """
    if torch.compiler.is_exporting() or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return cached_fold(holder, "folded", dtype, lambda: fold(adapters, fusion, dtype), adapters, fusion)
    if any(t.requires_grad for w in adapters for t in (w.down_weight, w.down_bias, w.up_weight, w.up_bias, w.scaling,
                                                       w.ln_weight, w.ln_bias) if isinstance(t, torch.Tensor)):
        return fold(adapters, fusion, dtype)
    if not any(t is not None and t.requires_grad for t in (fusion.query_weight, fusion.query_bias, fusion.key_weight,
                                                           fusion.key_bias, fusion.value_weight)):
        return cached_fold(holder, "folded", dtype, lambda: fold(adapters, fusion, dtype), adapters, fusion)
    half = cached_fold(holder, "adapters", dtype, lambda: fold_adapters(adapters, dtype, training=True), adapters)
    return fold_fusion_train(half, fusion, dtype, n_tokens, memo=holder._fold_cache)


def _cast(t, dtype):
    return t.to(dtype) if isinstance(t, torch.Tensor) else t


class WeightsAdapter:
    """AdapterHub's adapter forward (returns the scaled up projection) from explicit weights."""

    def __init__(self, w: AdapterWeights):
        self.w = w

    def __call__(self, x):
        w = self.w
        if w.ln_before:
            x = F.layer_norm(x, (x.shape[-1],), w.ln_weight, w.ln_bias, eps=1e-5)
        z = apply_activation(F.linear(x, w.down_weight, w.down_bias), w.activation)
        return F.linear(z, w.up_weight, w.up_bias) * w.scaling


class ScaledUp:
    """AdapterHub's ``up`` (what fusion consumes) of one adapter module with ``adapter_down`` /
    ``adapter_up`` / ``scaling``, eagerly: ``adapter_up(adapter_down(x)) * scaling``."""

    def __init__(self, adapter):
        self.adapter = adapter

    def __call__(self, x):
        ad = self.adapter
        return ad.adapter_up(ad.adapter_down(x)) * ad.scaling


class FusionSite:
    """The shared behaviour of a fusion site: weights in a dtype, the cached folds, the reference.

    A subclass provides the attributes ``hidden_size``, ``bottleneck`` (total R), ``num_adapters``,
    ``residual_before`` and ``anchor_param`` (a parameter, for the runner's dtype/device check), and
    the weights through two hooks:

    * ``_adapter_modules_or_weights()``: the adapters' :class:`~fusedadapter.fold.AdapterWeights`
      (tensors as they are, uncast);
    * ``_fusion_linears()``: the ``(query, key, value)`` linears (None for a flag that is off), or
      override ``_fusion_weights()`` for fusion weights held as bare tensors.

    For the eager reference it may override ``_reference_modules()`` (the adapters' forwards and
    the three projections; by default computed from the weights) and ``_reference_training``.
    ``caches_folds = False`` folds every call instead of caching (a site that lives for one call).
    """

    caches_folds = True
    _fold_cache = None

    # ------------------------------------------------------------------ what a subclass supplies
    def _adapter_modules_or_weights(self) -> List[AdapterWeights]:
        raise NotImplementedError

    def _fusion_linears(self) -> Tuple[Optional[torch.nn.Module], Optional[torch.nn.Module], Optional[torch.nn.Module]]:
        raise NotImplementedError

    def _fusion_weights(self) -> FusionWeights:
        query, key, value = self._fusion_linears()

        def get(lin, attr):
            return None if lin is None else getattr(lin, attr, None)

        return FusionWeights(get(query, "weight"), get(query, "bias"), get(key, "weight"), get(key, "bias"),
                             get(value, "weight"))

    def _reference_modules(self) -> Tuple[Sequence, object, object, object]:
        """(adapters, query, key, value) for :func:`fusedadapter.reference.reference_fusion`."""
        f = self._fusion_weights()

        def lin(w, b):
            return None if w is None else (lambda x: F.linear(x, w, b))

        return ([WeightsAdapter(w) for w in self._adapter_modules_or_weights()], lin(f.query_weight, f.query_bias),
                lin(f.key_weight, f.key_bias), lin(f.value_weight, None))

    def _reference_training(self, dropout_p: float) -> bool:
        return dropout_p > 0

    # ------------------------------------------------------------------ the site protocol (run_site)
    def adapter_weights(self, dtype=None) -> List[AdapterWeights]:
        ws = self._adapter_modules_or_weights()
        if dtype is None:
            return ws
        return [AdapterWeights(*(_cast(t, dtype) for t in (w.down_weight, w.down_bias, w.up_weight, w.up_bias,
                                                            w.scaling, w.ln_weight, w.ln_bias)),
                               w.activation, w.ln_before) for w in ws]

    def fusion_weights(self, dtype=None) -> FusionWeights:
        f = self._fusion_weights()
        if dtype is None:
            return f
        return FusionWeights(*(_cast(t, dtype) for t in (f.query_weight, f.query_bias, f.key_weight, f.key_bias,
                                                         f.value_weight)))

    def folded(self, dtype, n_tokens=None) -> Folded:
        """The folded weights in ``dtype`` for a call of ``n_tokens`` rows (cached: :func:`site_fold`)."""
        if not self.caches_folds:
            return fold(self.adapter_weights(), self.fusion_weights(), dtype)
        return site_fold(self, self.adapter_weights(), self.fusion_weights(), dtype, n_tokens)

    def plain_folded(self, dtype) -> dict:
        """The plain form's fusion fold (``W_K^T W_Q`` ...), cached like :meth:`folded`."""
        fus = self.fusion_weights()
        if not self.caches_folds:
            return fold_plain(fus, dtype)
        return cached_fold(self, "plain", dtype, lambda: fold_plain(fus, dtype), [], fus)

    def invalidate_fold_cache(self) -> None:
        self._fold_cache = None

    def reference(self, a, res, c, temperature, dropout_p, keep_mask, adapter_mask=None):
        """The eager reference (AdapterHub's op sequence) on ``(tokens, H)`` rows."""
        adapters, query, key, value = self._reference_modules()
        return reference_fusion(a, res, c, adapters, query, key, value, residual_before=self.residual_before,
                                temperature=temperature, dropout_p=dropout_p, keep_mask=keep_mask,
                                training=self._reference_training(dropout_p), adapter_mask=adapter_mask)
