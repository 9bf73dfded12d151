"""Drop-in patching of Hugging Face models: a fused AdapterFusion site at AdapterHub's places.

``patch(model, adapters, fusion="dynamic", placement="seq_bn", backend="auto")`` adds one
:class:`~fusedadapter.FusedAdapterFusion` per site to every transformer block; ``unpatch(model)``
takes them out again (the model's own modules and forwards are never replaced, so the original
outputs come back bit for bit).

Where the sites sit, and what they are fed, is AdapterHub's (adapters 1.3.0, its model mixins
and ``Adapter.pre_forward`` / ``post_forward``). Per site, with ``h`` the sub-layer output
(dense + dropout) and ``x`` the sub-layer input (the residual stream):

=================  ======================================  ==========================================
placement          post-norm blocks (BERT family,           pre-norm / no-LN sub-layers (GPT-2, ViT,
                   DistilBERT): model does ``LN(. + x)``    Llama, Mistral, Qwen2): model does ``. + x``
=================  ======================================  ==========================================
``seq_bn``         ``a = c = LN(h + x)``, ``res = h``       ``a = c = h + x``, ``res = h``
``double_seq_bn``  ``a = c = res = h``                      ``a = c = res = h``
=================  ======================================  ==========================================

``query_before_ln=True`` makes ``c = h``. The site replaces ``h`` by the fusion output
``o = W_V sum_n p_n u_n + res``, and the model's own code then finishes the sub-layer
(``LN(o + x)`` or ``o + x``), exactly as AdapterHub's ``post_forward`` does. ``seq_bn`` has a site
at the FFN output; ``double_seq_bn`` also one at the attention output, each with its own fusion.

Mechanism: two module hooks per site, no forward is replaced. A forward pre-hook on a module
whose input is ``x`` captures it; a forward hook on the module whose output is ``h`` swaps in
the site's output. Both work on transformers 4.57 and 5.x (the per-architecture table below
names the modules, with alternatives where the versions differ), and both are plain Python
over module state, which ``torch.compile`` traces.

Per-call options: :func:`collect_fusion_probs` (a context manager, AdapterHub's
``output_adapter_fusion_attentions``), :func:`fusedadapter.adapter_mask` and :func:`set_backend`.
The hooks' per-call state is per thread (see ``_SiteRuntime``): threads may share one patched model.

Where things live: the architecture table and placements in :mod:`fusedadapter.architectures`,
the hooks and their per-thread state in :mod:`fusedadapter.hooks`; this module holds the patch
record (one :class:`PatchedSite` per site), install / uninstall and the public API, and
re-exports the names of the other two.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapterhub_format import bn_config_template
# Re-exported: fusedadapter.patching.<name> keeps working for the table, the lookups and the hooks.
from .architectures import (PLACEMENTS, SUPPORTED_ARCHITECTURES, ArchSpec, Placement, SiteSpec,  # noqa: F401
                            UnsupportedArchitecture, ah_prefix, arch_spec, find_layers, get_module, resolve_placement,
                            resolve_site)
from .compile_cache import invalidate_compiled_graphs  # re-exported: fusedadapter.patching.invalidate_compiled_graphs
from .config import AdapterConfig, FusionConfig, check_adapter_name
from .dispatch import check_backend_name
from .hooks import _capture_hook, _output_hook, _SiteRuntime
from .modules import FusedAdapterFusion
from .registry import set_integration_backend, undo_integrations

__all__ = ["patch", "unpatch", "collect_fusion_probs", "set_backend", "fusion_sites", "SUPPORTED_ARCHITECTURES",
           "PLACEMENTS", "UnsupportedArchitecture", "is_patched", "PatchedSite"]

_CHILD_NAMES = {"mh_adapter": "fusedadapter_attention", "output_adapter": "fusedadapter_output"}
_RECORD_ATTR = "_fusedadapter_patch"


def _is_adapterhub_model(model: nn.Module) -> bool:
    if hasattr(model, "adapters_config"):
        return True
    return any(type(m).__name__ == "BottleneckLayer" or hasattr(m, "adapter_fusion_layer") for m in model.modules())


# --------------------------------------------------------------------------------------------
# Install / remove
# --------------------------------------------------------------------------------------------
@dataclass
class SitePlan:
    """One site to install: its adapters (name -> AdapterConfig), fusion config and AdapterHub flags."""

    layer_idx: int
    location: str
    adapters: Dict[str, AdapterConfig]
    fusion: FusionConfig
    default_activation: str
    original_ln_before: bool
    residual_before_ln: Union[bool, str]
    fusions: Optional[list] = None  # several named fusions over the adapters (fusedadapter.multitask)


@dataclass
class PatchedSite:
    """One installed site of a patch record."""

    layer_idx: int         # block index
    location: str          # "mh_adapter" | "output_adapter"
    layer_name: str        # the block's full module name ("" = the model itself)
    child: str             # the site module's attribute name in the block (_CHILD_NAMES)
    runtime: _SiteRuntime  # the hooks' state
    ah_path: str           # where AdapterHub 1.3.0 keeps this site's BottleneckLayer, relative to the block
    module: nn.Module      # the site: a FusedAdapterFusion (or a fusedadapter.MultiFusion)


@dataclass
class PatchRecord:
    arch: str
    fusion_name: str
    adapter_names: List[str]
    fusion_config: FusionConfig
    sites: List[PatchedSite] = field(default_factory=list)
    ah_configs: Dict[str, dict] = field(default_factory=dict)  # adapter name -> AdapterHub config dict (for save)
    fusions: Optional[list] = None  # patch(fusions=...): [(name, FusionConfig, adapter names)], MultiFusion sites


def _model_dtype_device(layer: nn.Module):
    for p in layer.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    return torch.get_default_dtype(), torch.device("cpu")


def attention_dropout_of(model: nn.Module) -> float:
    # AdapterHub: fusion_config.dropout_prob or getattr(model_config, "attention_probs_dropout_prob", 0)
    return float(getattr(model.config, "attention_probs_dropout_prob", 0) or 0)


def install(model: nn.Module, plans: Sequence[SitePlan], *, fusion_name: str, adapter_names: Sequence[str],
            fusion_config: FusionConfig, backend: str) -> PatchRecord:
    """Install the planned sites (shared by :func:`patch` and :func:`fusedadapter.load_adapterhub`).
    Everything that can fail is checked before the model changes."""
    spec = arch_spec(model)
    if getattr(model, _RECORD_ATTR, None) is not None:
        raise ValueError("fusedadapter.patch: the model is already patched; call fusedadapter.unpatch(model) first")
    if _is_adapterhub_model(model):
        raise ValueError("fusedadapter.patch: this model is set up by AdapterHub (adapters.init / *AdapterModel); "
                         "use fusedadapter.accelerate(model) to run its Fuse with the fused op")
    layers = find_layers(model, spec)
    hidden = int(model.config.hidden_size)
    att_dropout = attention_dropout_of(model)
    # Resolve every site first (raises before any change).
    resolved = []
    for plan in plans:
        if not 0 <= plan.layer_idx < len(layers):
            raise ValueError(f"fusedadapter: block index {plan.layer_idx} out of range (model has {len(layers)})")
        layer_name, layer = layers[plan.layer_idx]
        site = resolve_site(layer, spec, plan.location)
        child = _CHILD_NAMES[plan.location]
        if hasattr(layer, child):
            raise ValueError(f"fusedadapter: block {layer_name} already has an attribute {child!r}")
        resolved.append((plan, layer_name, layer, site, child))
    modules = []
    # Parameters made under torch.inference_mode would be inference tensors (no version counter,
    # never trainable): build them outside it.
    with torch.inference_mode(False), torch.no_grad():
        for plan, layer_name, layer, site, child in resolved:
            if plan.fusions is not None:  # several fusions over one adapter pool, routed per row
                from .multitask import MultiFusion

                fusion = MultiFusion(hidden, plan.adapters, {n: (c, a) for n, c, a in plan.fusions}, backend,
                                     default_activation=plan.default_activation, attention_dropout=att_dropout)
            else:
                fusion = FusedAdapterFusion(hidden, plan.adapters, plan.fusion, backend,
                                            default_activation=plan.default_activation, attention_dropout=att_dropout)
            dtype, device = _model_dtype_device(layer)
            fusion.train(layer.training)  # a model in eval mode gets sites in eval mode (as AdapterHub does)
            modules.append(fusion.to(device=device, dtype=dtype))

    record = PatchRecord(arch=spec.name, fusion_name=fusion_name, adapter_names=list(adapter_names),
                         fusion_config=fusion_config)
    by_output: Dict[Tuple[int, str], List[_SiteRuntime]] = {}
    output_modules: Dict[Tuple[int, str], nn.Module] = {}
    for (plan, layer_name, layer, site, child), fusion in zip(resolved, modules):
        layer.add_module(child, fusion)
        ln = get_module(layer, site.layer_norm) if site.layer_norm else None
        rt = _SiteRuntime(fusion, ln, plan.layer_idx, plan.location, plan.original_ln_before, plan.residual_before_ln,
                          fusion_name)
        cap_path, index, names = site.capture
        get_module(layer, cap_path).register_forward_pre_hook(partial(_capture_hook, rt, index, tuple(names)),
                                                              with_kwargs=True)
        key = (plan.layer_idx, site.output)
        by_output.setdefault(key, []).append(rt)
        output_modules[key] = get_module(layer, site.output)
        record.sites.append(PatchedSite(layer_idx=plan.layer_idx, location=plan.location, layer_name=layer_name,
                                        child=child, runtime=rt, ah_path=site.ah_path, module=fusion))
    for key, rts in by_output.items():
        output_modules[key].register_forward_hook(partial(_output_hook, tuple(rts)))
    object.__setattr__(model, _RECORD_ATTR, record)
    invalidate_compiled_graphs()
    return record


def _normalize_adapters(adapters) -> Dict[str, AdapterConfig]:
    if isinstance(adapters, Mapping):
        items = list(adapters.items())
    elif isinstance(adapters, (list, tuple)):
        items = [(str(i), cfg) for i, cfg in enumerate(adapters)]
    else:
        raise TypeError(f"fusedadapter.patch: adapters must be a sequence or a mapping of AdapterConfig, got "
                        f"{type(adapters).__name__}")
    if not items:
        raise ValueError("fusedadapter.patch: adapters must name at least one AdapterConfig")
    out = {}
    for name, cfg in items:
        if not isinstance(cfg, AdapterConfig):
            raise TypeError(f"fusedadapter.patch: adapter {name!r}: expected an AdapterConfig, got {type(cfg).__name__}")
        check_adapter_name(name, "fusedadapter.patch: ")
        out[name] = cfg
    return out


def reduction_factor_for(hidden: int, width: int) -> float:
    """A reduction factor ``rf`` with ``int(hidden // rf) == width`` (AdapterHub's width rule)."""
    if width == hidden:
        return 1
    rf = hidden / width
    if float(rf).is_integer():
        rf = int(rf)
        if int(hidden // rf) == width:
            return rf
        rf = float(rf)
    for _ in range(64):
        got = int(hidden // rf)
        if got == width:
            return rf
        rf = math.nextafter(rf, 0.0 if got < width else math.inf)
    raise ValueError(f"no reduction factor gives width {width} for hidden size {hidden}")


def adapterhub_config_dict(cfg: AdapterConfig, hidden: int, placement: Placement) -> dict:
    """The AdapterHub ``BnConfig`` dict (all 1.3.0 fields) for one of our adapters."""
    d = bn_config_template(placement.name)
    d["reduction_factor"] = reduction_factor_for(hidden, cfg.width(hidden))
    d["non_linearity"] = cfg.non_linearity if cfg.non_linearity is not None else placement.default_activation
    d["scaling"] = cfg.scaling if isinstance(cfg.scaling, str) else float(cfg.scaling)
    d["ln_before"] = bool(cfg.ln_before)
    return d


def patch(model: nn.Module, adapters, fusion: Union[str, Mapping, FusionConfig] = "dynamic",
          placement: str = "seq_bn", backend: str = "auto", *, fusions=None) -> nn.Module:
    """Add N adapters and a fused AdapterFusion site to every transformer block of ``model``, in place.

    ``adapters``: a sequence (named "0", "1", ...) or a mapping name -> :class:`AdapterConfig`.
    ``fusion``: ``"dynamic"`` | ``"static"`` | a dict | a :class:`FusionConfig`.
    ``placement``: ``"seq_bn"`` (FFN output; default activation relu) or ``"double_seq_bn"``
    (attention and FFN outputs, each site its own adapters and fusion; default activation swish).
    ``backend``: as :class:`FusedAdapterFusion`. Sites are registered as ``fusedadapter_output`` /
    ``fusedadapter_attention`` children of each block (new parameters, trainable); the model's
    own parameters are left as they are. Returns ``model``.

    ``fusions`` (multi-task serving, docs/multitask.md): several named fusions over the adapters,
    e.g. ``{"sst": ("dynamic", ["a", "b"]), "mnli": ("static", ["b", "c", "a"])}`` (``fusion`` is
    then unused). Each site is a :class:`fusedadapter.MultiFusion`; every call needs a route
    (``with fusedadapter.fusion_route(names_or_ids_per_row): model(...)``) unless there is one fusion.
    """
    spec = arch_spec(model)  # clear error for unsupported architectures first
    place = resolve_placement(placement)
    cfgs = _normalize_adapters(adapters)
    fusion_config = FusionConfig.load(fusion)
    check_backend_name(backend, context="fusedadapter.patch")
    n_layers = len(find_layers(model, spec))
    multi = None
    if fusions is not None:
        from .multitask import normalize_fusions

        multi = normalize_fusions(fusions, list(cfgs), "fusedadapter.patch")
        if len({c.query_before_ln for _, c, _ in multi}) != 1:
            raise ValueError("fusedadapter.patch: the fusions must agree on query_before_ln (one query per site)")
        fusion_config = multi[0][1]
    plans = [SitePlan(i, loc, dict(cfgs), fusion_config, place.default_activation, place.original_ln_before,
                      place.residual_before_ln, multi)
             for i in range(n_layers) for loc in place.locations]
    names = list(cfgs)
    record = install(model, plans, fusion_name=",".join(names), adapter_names=names, fusion_config=fusion_config,
                     backend=backend)
    hidden = int(model.config.hidden_size)
    record.ah_configs = {n: adapterhub_config_dict(c, hidden, place) for n, c in cfgs.items()}
    record.fusions = multi
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _RECORD_ATTR, None) is not None


def patch_record(model: nn.Module) -> Optional[PatchRecord]:
    return getattr(model, _RECORD_ATTR, None)


def unpatch(model: nn.Module) -> nn.Module:
    """Remove what :func:`patch` / :func:`fusedadapter.load_adapterhub` added (hooks and site modules),
    or what :func:`fusedadapter.accelerate` changed on an AdapterHub model. Returns ``model``."""
    record = getattr(model, _RECORD_ATTR, None)
    undone = False
    if record is not None:
        # Remove our hooks by identity of their runtimes (not through the handles: a deep copy of
        # a patched model carries copies of the hooks and runtimes).
        runtimes = {id(s.runtime) for s in record.sites}
        for module in model.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                for key in [k for k, h in hooks.items() if _is_our_hook(h, runtimes)]:
                    del hooks[key]
                    module._forward_hooks_with_kwargs.pop(key, None)
                    module._forward_hooks_always_called.pop(key, None)
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
        for site in record.sites:
            layer = get_module(model, site.layer_name) if site.layer_name else model
            if layer is not None and site.child in layer._modules:
                del layer._modules[site.child]
            site.runtime.x = None
        object.__delattr__(model, _RECORD_ATTR)
        undone = True
    undone = undo_integrations(model) or undone  # fusedadapter.accelerate registers its undo (fusedadapter.registry)
    if not undone:
        raise ValueError("fusedadapter.unpatch: the model is neither patched (fusedadapter.patch / load_adapterhub) "
                         "nor accelerated (fusedadapter.accelerate)")
    invalidate_compiled_graphs()
    return model


def _is_our_hook(hook, runtime_ids) -> bool:
    if not isinstance(hook, partial) or hook.func not in (_capture_hook, _output_hook):
        return False
    first = hook.args[0]
    rts = first if isinstance(first, tuple) else (first,)
    return any(id(rt) in runtime_ids for rt in rts)


def fusion_sites(model: nn.Module) -> List[Tuple[int, str, FusedAdapterFusion]]:
    """[(block index, location key, site module)] of a patched model."""
    record = getattr(model, _RECORD_ATTR, None)
    if record is None:
        raise ValueError("fusedadapter: the model is not patched")
    return [(s.layer_idx, s.location, s.module) for s in record.sites]


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch the backend of every site of a patched (or accelerated) model."""
    record = getattr(model, _RECORD_ATTR, None)
    found = False
    if record is not None:
        for s in record.sites:
            s.module.backend = backend
        found = True
    found = set_integration_backend(model, backend) or found  # accelerated models (fusedadapter.registry)
    if not found:
        raise ValueError("fusedadapter.set_backend: the model is neither patched nor accelerated")
    return model


@contextlib.contextmanager
def collect_fusion_probs(model: nn.Module) -> Iterator[Dict[str, Dict[int, Dict[str, torch.Tensor]]]]:
    """Collect the fusion attention of every site while the block runs (AdapterHub's
    ``output_adapter_fusion_attentions=True``)::

        with collect_fusion_probs(model) as probs:
            model(**batch)
        probs[fusion_name][layer_idx]["output_adapter"]   # (B, T, N) tensor, detached

    Same nesting as AdapterHub's ``adapter_fusion_attentions``; values are tensors on the
    model's device (AdapterHub returns numpy arrays). Later calls inside the block overwrite.
    The store is this thread's: calls of the model from other threads neither fill it nor are
    affected by the block (each thread may hold its own block).
    """
    record = getattr(model, _RECORD_ATTR, None)
    if record is None:
        raise ValueError("fusedadapter.collect_fusion_probs: the model is not patched")
    store: Dict[str, Dict[int, Dict[str, torch.Tensor]]] = {}
    runtimes = [s.runtime for s in record.sites]
    previous = [rt.collector for rt in runtimes]
    for rt in runtimes:
        rt.collector = store
    try:
        yield store
    finally:
        for rt, prev in zip(runtimes, previous):
            rt.collector = prev
