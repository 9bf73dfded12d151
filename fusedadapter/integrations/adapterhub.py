"""``accelerate(model)``: run an AdapterHub model's ``Fuse`` with the fused op, in place.

AdapterHub (``adapters`` 1.3.0) computes a ``Fuse`` at each site in
``BottleneckLayer.compose_fuse``: the last adapter's ``pre_forward`` picks the adapter input,
query and residual, every adapter runs, their scaled up-projections are stacked, and
``BertFusion`` attends over them. :func:`accelerate` gives every ``BottleneckLayer`` of the
model an instance-level ``compose_fuse`` that keeps the first and last steps (AdapterHub's own
``pre_forward``, ``post_forward`` runs afterwards as usual) and replaces the middle — the N
adapters and the fusion — by one fused op over **AdapterHub's own parameter tensors**. Nothing
is copied, so ``train_adapter_fusion``, optimizers, ``save_adapter_fusion``,
``get_fusion_regularization_loss`` and ``output_adapter_fusion_attentions=True`` keep working;
``BertFusion``'s temperature is stepped exactly as AdapterHub steps it.

Setups the op cannot express stay on AdapterHub's eager path, with one warning naming them:
a ``Fuse`` with a nested composition block (``Fuse(Stack(...), ...)``), PHM (Compacter)
adapters, an activation the op does not implement; per call also adapters with stochastic
depth in training mode and gating adapters while gating scores are requested.

Several ``Fuse`` setups over one adapter pool serve a mixed batch in one forward through
``MultiTask(Fuse(...), Fuse(...))`` with per-row ``task_ids`` or :func:`fusedadapter.fusion_route`
(:mod:`fusedadapter.integrations.adapterhub_multi`, docs/multitask.md).

``adapters`` is imported only when :func:`accelerate` is called.
"""

from __future__ import annotations

import types
import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..activations import activation_code, canonical_activation
from ..dispatch import check_backend_name
from ..fold import AdapterWeights
from ..functional import _IdentityDistance
from ..masking import current_adapter_mask
from ..compile_cache import invalidate_compiled_graphs
from ..registry import register_integration
from ..runner import run_site
from ..site import FusionSite, ScaledUp
from .adapterhub_multi import fused_compose_multi_task

__all__ = ["accelerate"]

_STATE_ATTR = "_fusedadapter_accel"
_WARNED: set = set()


def _import_adapterhub():
    try:
        from adapters.composition import AdapterCompositionBlock, Fuse
        from adapters.configuration import BnConfig
        from adapters.context import ForwardContext
        from adapters.methods.bottleneck import BottleneckLayer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fusedadapter.accelerate needs AdapterHub's `adapters` package (pip install adapters); "
                          "for a plain Hugging Face model use fusedadapter.patch, and fusedadapter.load_adapterhub "
                          f"to run AdapterHub checkpoints without it ({exc})") from exc
    return types.SimpleNamespace(AdapterCompositionBlock=AdapterCompositionBlock, Fuse=Fuse, BnConfig=BnConfig,
                                 ForwardContext=ForwardContext, BottleneckLayer=BottleneckLayer)


class _AdapterHubSite(FusionSite):
    """A :class:`~fusedadapter.site.FusionSite` over AdapterHub's own modules (nothing copied)."""

    def __init__(self, adapters: List[nn.Module], codes: List[int], fusion: nn.Module):
        self.adapters = adapters
        self.codes = codes
        self.fusion = fusion
        cfg = fusion.config
        self.query = fusion.query if cfg["query"] else None
        self.key = fusion.key if cfg["key"] else None
        self.value = fusion.value if cfg["value"] else None
        self.residual_before = bool(cfg["residual_before"])
        self.hidden_size = int(fusion.dense_size)
        self.num_adapters = len(adapters)
        self.bottleneck = sum(int(a.adapter_up.in_features) for a in adapters)
        self.anchor_param = adapters[0].adapter_up.weight
        self._params = [p for a in adapters for p in a.parameters()] + [
            p for lin in (self.query, self.key, self.value) if lin is not None for p in lin.parameters()]
        self._fold_cache = None

    def matches(self, adapters, fusion) -> bool:
        return fusion is self.fusion and len(adapters) == len(self.adapters) and all(
            a is b for a, b in zip(adapters, self.adapters))

    # ---- FusionSite's hooks
    @staticmethod
    def _parts(adapter):
        ln_before = bool(getattr(adapter, "add_layer_norm_before", False))
        down = adapter.adapter_down[1 if ln_before else 0]
        ln = adapter.adapter_down[0] if ln_before else None
        return down, ln

    def _adapter_modules_or_weights(self):
        out = []
        for a, code in zip(self.adapters, self.codes):
            down, ln = self._parts(a)
            out.append(AdapterWeights(down.weight, down.bias, a.adapter_up.weight, a.adapter_up.bias, a.scaling,
                                      None if ln is None else ln.weight, None if ln is None else ln.bias,
                                      code, ln is not None))
        return out

    def _fusion_linears(self):
        return self.query, self.key, self.value

    def _reference_modules(self):
        return [ScaledUp(ad) for ad in self.adapters], self.query, self.key, self.value

    def _reference_training(self, dropout_p):
        return self.fusion.training


class _LayerAccel:
    """Per-BottleneckLayer state: backend, built sites, static verdicts."""

    def __init__(self, ah, backend: str):
        self.ah = ah
        self.backend = backend
        self.sites = {}

    def static_reason(self, layer, setup) -> Optional[str]:
        """Why this Fuse cannot be fused at this layer (None: it can)."""
        ah = self.ah
        for child in setup:
            if isinstance(child, ah.AdapterCompositionBlock):
                return f"it contains the nested composition block {child!r}"
        if setup.name not in layer.adapter_fusion_layer:
            return f"this layer has no fusion layer {setup.name!r}"
        for name in setup:
            if name not in layer.adapters:
                continue
            ad = layer.adapters[name]
            if not isinstance(getattr(ad, "adapter_up", None), nn.Linear) or not isinstance(
                    getattr(ad, "adapter_down", None), nn.Sequential):
                return f"adapter {name!r} is not a plain bottleneck adapter (PHM / Compacter layers?)"
            ln_before = bool(getattr(ad, "add_layer_norm_before", False))
            parts = list(ad.adapter_down)
            want = 3 if ln_before else 2
            if len(parts) != want or not isinstance(parts[want - 2], nn.Linear) or (
                    ln_before and not isinstance(parts[0], nn.LayerNorm)):
                return f"adapter {name!r} has an unexpected adapter_down layout"
            if ln_before and (parts[0].eps != 1e-5 or parts[0].weight is None):
                return f"adapter {name!r} has a non-default LayerNorm before the bottleneck"
            scaling = getattr(ad, "scaling", 1.0)
            if not isinstance(scaling, (float, int, torch.Tensor)):
                return f"adapter {name!r} has an unsupported scaling {scaling!r}"
            try:
                self.activation(layer, name)
            except ValueError as exc:
                return str(exc)
        return None

    def activation(self, layer, name) -> int:
        cfg = layer.adapters_config.match(name, config_type=self.ah.BnConfig, layer_idx=layer.layer_idx,
                                          location_key=layer.location_key)
        if cfg is None:
            raise ValueError(f"adapter {name!r} has no bottleneck config at this location")
        act = cfg["non_linearity"]
        try:
            canonical_activation(act)
        except ValueError:
            raise ValueError(f"adapter {name!r} uses non_linearity {act!r}, which the fused op does not implement") from None
        return activation_code(act)

    def site(self, layer, setup, names) -> Tuple[Optional[_AdapterHubSite], Optional[str]]:
        key = (setup.name, tuple(names))
        adapters = [layer.adapters[n] for n in names]
        fusion = layer.adapter_fusion_layer[setup.name] if setup.name in layer.adapter_fusion_layer else None
        entry = self.sites.get(key)
        if entry is not None and (entry[0] is None or entry[0].matches(adapters, fusion)):
            return entry
        reason = self.static_reason(layer, setup)
        site = None
        if reason is None:
            site = _AdapterHubSite(adapters, [self.activation(layer, n) for n in names], fusion)
        self.sites[key] = (site, reason)
        return site, reason


def _warn_once(name: str, reason: str) -> None:
    key = (name, reason)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"fusedadapter.accelerate: Fuse {name!r} stays on AdapterHub's eager path: {reason}",
                  RuntimeWarning, stacklevel=3)


def _fused_compose_fuse(self, adapter_setup, state, lvl: int = 0):
    """Replacement of ``BottleneckLayer.compose_fuse`` (bound to one layer instance)."""
    accel: _LayerAccel = self.__dict__[_STATE_ATTR]
    ah = accel.ah
    names = [c for c in adapter_setup if isinstance(c, str) and c in self.adapters]
    site, reason = accel.site(self, adapter_setup, names) if names or any(
        isinstance(c, ah.AdapterCompositionBlock) for c in adapter_setup) else (None, None)
    context = ah.ForwardContext.get_context()
    if site is not None:
        # per-call conditions the op cannot express
        if self.training and any(hasattr(a, "DropPath") for a in site.adapters):
            site, reason = None, "an adapter uses stochastic depth (DropPath) in training mode"
        elif context is not None and getattr(context, "output_adapter_gating_scores", False) and any(
                getattr(a, "use_gating", False) for a in site.adapters):
            site, reason = None, "gating scores are requested from gated adapters"
    if site is None and reason is not None:
        if current_adapter_mask() is not None:
            # AdapterHub's eager Fuse has no adapter mask: running it would drop the mask silently.
            raise ValueError(f"fusedadapter.adapter_mask: Fuse {adapter_setup.name!r} runs on AdapterHub's eager path "
                             f"here ({reason}), which cannot apply an adapter mask")
        _warn_once(adapter_setup.name, reason)
        return type(self).compose_fuse(self, adapter_setup, state, lvl=lvl)

    # AdapterHub's compose_fuse, with the children loop and BertFusion replaced by the fused op.
    fusion_config, _ = self.adapters_config.get_fusion(adapter_setup.name)
    last = adapter_setup.last()
    last_adapter = self.adapters[last]
    hidden_states, query, residual = last_adapter.pre_forward(state.hidden_states, state.input_tensor,
                                                              state.layer_norm, fusion_config=fusion_config)
    state = state._replace(hidden_states=hidden_states, adapter_residual=residual)
    if site is None:  # no adapter of this Fuse lives in this layer: AdapterHub leaves hidden_states as is
        return state._replace(hidden_states=hidden_states, last=last)

    # The mask of an enclosing fa.adapter_mask block (this thread), columns of this site's adapters
    # (in the Fuse's order), rows expanded to a generate() beam batch; run_site checks its shape.
    mask = current_adapter_mask(names, batch=hidden_states.shape[0] if hidden_states.dim() >= 2 else None)
    fusion = site.fusion
    temperature = fusion.T
    fusion.T = max(fusion.T - fusion.reduction, 1.0)
    dropout_p = float(fusion.dropout.p) if fusion.training else 0.0
    out, probs = run_site(site, hidden_states, state.adapter_residual,
                          None if query is hidden_states else query, backend=accel.backend,
                          temperature=temperature, dropout_p=dropout_p, keep_mask=None, adapter_mask=mask)
    if context is not None and getattr(context, "output_adapter_fusion_attentions", False):
        self._store_fusion_attentions(adapter_setup.name, probs.detach().to(out.dtype).cpu().numpy())
    return state._replace(hidden_states=out, last=last)


def _fuse_blocks(setup, ah) -> list:
    out = []
    if isinstance(setup, ah.Fuse):
        out.append(setup)
    if isinstance(setup, ah.AdapterCompositionBlock):
        for child in setup:
            out.extend(_fuse_blocks(child, ah))
    return out


def _fused_regularization_loss(self):
    """AdapterHub's ``get_fusion_regularization_loss`` (the same layers and fusions, bit for bit the
    same value and gradients), each term from :class:`fusedadapter.functional._IdentityDistance`:
    fewer passes over the value matrices (AdapterTrainer adds it to every stage-2 step)."""
    ah = _import_adapterhub()
    reg = None
    for _, layer in self.iter_layers():
        for module in layer.modules():
            if isinstance(module, ah.BottleneckLayer):
                for fusion in module.adapter_fusion_layer.values():
                    if hasattr(fusion, "value") and fusion.value.weight.requires_grad:
                        term = _IdentityDistance.apply(fusion.value.weight)
                        reg = term if reg is None else reg + term
    return reg


def accelerate(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Run every ``Fuse`` of an AdapterHub model (``adapters.init`` or an ``*AdapterModel``) with the
    fused op, in place, on AdapterHub's own parameters. Returns ``model``.

    Unfusable setups keep AdapterHub's eager path, with one warning naming them. Undo with
    :func:`fusedadapter.unpatch`; switch backends with :func:`fusedadapter.patching.set_backend`.
    """
    ah = _import_adapterhub()
    check_backend_name(backend, context="fusedadapter.accelerate")
    layers = [m for m in model.modules() if isinstance(m, ah.BottleneckLayer)]
    if not layers:
        raise ValueError(f"fusedadapter.accelerate: {type(model).__name__} has no AdapterHub bottleneck layers; set it "
                         "up with adapters.init(model) (or an *AdapterModel) and add_adapter_fusion, or use "
                         "fusedadapter.patch for a plain Hugging Face model")
    for layer in layers:
        state = layer.__dict__.get(_STATE_ATTR)
        if state is None:
            layer.__dict__[_STATE_ATTR] = _LayerAccel(ah, backend)
            layer.__dict__["compose_fuse"] = types.MethodType(_fused_compose_fuse, layer)
            # MultiTask(Fuse, Fuse, ...): per-row routing over several setups (adapterhub_multi)
            layer.__dict__["compose_multi_task"] = types.MethodType(fused_compose_multi_task, layer)
        else:
            state.backend = backend
            state.sites.clear()
    for mod in model.modules():  # the model and its base model (heads models): AdapterHub's mixin method
        if hasattr(mod, "iter_layers") and callable(getattr(type(mod), "get_fusion_regularization_loss", None)):
            mod.__dict__["get_fusion_regularization_loss"] = types.MethodType(_fused_regularization_loss, mod)
    invalidate_compiled_graphs()  # compose_fuse is replaced on instances: cached graphs would miss it

    setup = getattr(layers[0], "adapters_config", None)
    setup = setup.active_setup if setup is not None else None
    fuses = _fuse_blocks(setup, ah) if setup is not None else []
    if not fuses:
        warnings.warn("fusedadapter.accelerate: no Fuse is active yet; the fused op will run once one is "
                      "(set_active_adapters / train_adapter_fusion)", RuntimeWarning, stacklevel=2)
        return model
    reasons = {}
    for layer in layers:
        accel = layer.__dict__[_STATE_ATTR]
        for fuse in fuses:
            if not any(isinstance(c, ah.AdapterCompositionBlock) or c in layer.adapters for c in fuse):
                continue
            r = accel.static_reason(layer, fuse)
            if r is not None:
                reasons.setdefault(fuse.name, set()).add(r)
    if reasons:
        text = "; ".join(f"Fuse {name!r}: {', '.join(sorted(rs))}" for name, rs in reasons.items())
        for name, rs in reasons.items():
            for r in rs:
                _WARNED.add((name, r))
        warnings.warn(f"fusedadapter.accelerate: these setups stay on AdapterHub's eager path: {text}",
                      RuntimeWarning, stacklevel=2)
    return model


def _accelerated_layers(model: nn.Module):
    return [m for m in model.modules() if _STATE_ATTR in m.__dict__]


def _unaccelerate(model: nn.Module) -> bool:
    layers = _accelerated_layers(model)
    for layer in layers:
        layer.__dict__.pop("compose_fuse", None)
        layer.__dict__.pop("compose_multi_task", None)
        layer.__dict__.pop(_STATE_ATTR, None)
    for mod in model.modules():
        fn = mod.__dict__.get("get_fusion_regularization_loss")
        if getattr(fn, "__func__", None) is _fused_regularization_loss:
            del mod.__dict__["get_fusion_regularization_loss"]
    return bool(layers)


def _set_accelerated_backend(model: nn.Module, backend: str) -> bool:
    check_backend_name(backend)
    layers = _accelerated_layers(model)
    for layer in layers:
        layer.__dict__[_STATE_ATTR].backend = backend
    return bool(layers)


# fusedadapter.unpatch and fusedadapter.patching.set_backend call these (patching never imports this module).
register_integration(undo=_unaccelerate, set_backend=_set_accelerated_backend)
