"""AdapterDrop for fused AdapterFusion: prune the least used adapters, skip fusion in early layers.

AdapterDrop (Rücklé et al., EMNLP 2021)::

    report = fusedadapter.adapter_drop(model, calibration_batches, keep=2, skip_layers=3)
    print(report)            # mean fusion probability per adapter, kept / dropped, skipped layers

on a :func:`fusedadapter.patch`\\ ed or :func:`fusedadapter.load_adapterhub`\\ ed Hugging Face model, or
an AdapterHub model after :func:`fusedadapter.accelerate`. docs/adapterdrop.md is the user's account
(calibration, ``keep`` and ``per_site``, ``skip_layers``, training after the call); in short:

- **Calibration**: each batch runs once under ``torch.inference_mode`` in eval mode (modes and
  temperatures restored); per site and adapter the mean fusion probability over the tokens whose
  ``attention_mask`` is 1, averaged over the sites that will not be skipped.
- **Pruning** (``keep=k``): the k adapters of highest global mean at every site (ties: the earlier),
  or per site (``per_site=True``, patched models only). A patched site is pruned in place and then
  computes exactly what the full site computes with the dropped adapters masked out. An accelerated
  model's active ``Fuse`` becomes ``Fuse(*kept, name=<old name>)``.
- **Skipping** (``skip_layers=n`` or block indices): those sites return the sub-layer output
  unchanged (bit for bit the bare block). They would get no gradients, so the call **freezes**
  them (``requires_grad=False`` on exactly the parameters it changes, restored by a later call that
  runs them again), and DDP's default ``find_unused_parameters=False`` works when DDP and the
  optimizer are built after the call. On an accelerated model skipping is AdapterHub's own
  ``adapters_config.skip_layers``; ``train_adapter_fusion`` / ``set_active_adapters`` reset it.

Mechanism on a patched model: a skipped site's runtime (the patch record's) gets an instance-level
``run`` that clears the captured input and returns the sub-layer output as it is; ``unpatch``
removes all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .architectures import arch_spec, find_layers
from .adapterdrop_calibration import SiteKey, _Accumulator, _calibrate_patched, _call, _EvalState
from .patching import patch_record

__all__ = ["adapter_drop", "AdapterDropReport", "skipped_layers"]



@dataclass
class AdapterDropReport:
    """What :func:`adapter_drop` measured and did.

    ``adapters``: the fused adapters before the call (in fusion order). ``mean_probs``: adapter ->
    mean fusion probability over the counted sites and tokens. ``site_probs``: (block, location)
    -> adapter -> mean probability at that site. ``kept``: the adapters kept (every site, or with
    ``per_site`` at one site at least), in fusion order; ``site_kept``: per site.
    ``skipped_layers``: the blocks whose sites no longer run. ``tokens`` / ``batches``: what the
    calibration counted (per site).
    """

    adapters: List[str]
    mean_probs: Dict[str, float] = field(default_factory=dict)
    site_probs: Dict[SiteKey, Dict[str, float]] = field(default_factory=dict)
    kept: List[str] = field(default_factory=list)
    site_kept: Dict[SiteKey, List[str]] = field(default_factory=dict)
    skipped_layers: List[int] = field(default_factory=list)
    tokens: int = 0
    batches: int = 0
    per_site: bool = False

    @property
    def dropped(self) -> List[str]:
        return [n for n in self.adapters if n not in self.kept]

    def table(self) -> str:
        lines = [f"AdapterDrop: {self.batches} calibration batches, {self.tokens} tokens per site; "
                 f"skipped layers {self.skipped_layers or 'none'}",
                 f"{'adapter':<16} {'mean prob':>10}  status"]
        ranked = sorted(self.adapters, key=lambda n: -self.mean_probs.get(n, float("nan")))
        for name in ranked:
            p = self.mean_probs.get(name)
            status = "kept" if name in self.kept else "dropped"
            if self.per_site and name in self.kept:
                n_sites = sum(name in k for k in self.site_kept.values())
                status = f"kept at {n_sites}/{len(self.site_kept)} sites"
            lines.append(f"{name:<16} {'-' if p is None else f'{p:10.4f}':>10}  {status}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --------------------------------------------------------------------------------------------
# patched models
# --------------------------------------------------------------------------------------------
def _skipped_run(runtime, h):
    """A skipped site: the sub-layer output passes unchanged (what the bare model computes)."""
    runtime.x = None
    runtime.armed = False
    return h


def _is_skipped(runtime) -> bool:
    run = runtime.__dict__.get("run")
    return isinstance(run, partial) and run.func is _skipped_run


def _set_skipped(runtime, skipped: bool) -> None:
    if skipped and not _is_skipped(runtime):
        runtime.run = partial(_skipped_run, runtime)
    elif not skipped and _is_skipped(runtime):
        del runtime.__dict__["run"]


_FROZEN_ATTR = "_fusedadapter_adapterdrop_frozen"


def _freeze(holder, modules: Iterable[nn.Module], remember: bool = True) -> None:
    """Freeze the trainable parameters of ``modules``; with ``remember``, record them in ``holder``'s
    ``__dict__`` so that :func:`_unfreeze` restores exactly those."""
    frozen = holder.__dict__.setdefault(_FROZEN_ATTR, []) if remember else []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)


def _unfreeze(holder, modules: Iterable[nn.Module]) -> None:
    """Restore ``requires_grad`` on the parameters :func:`_freeze` froze that ``modules`` still hold."""
    frozen = holder.__dict__.pop(_FROZEN_ATTR, None)
    if not frozen:
        return
    held = {id(p) for m in modules for p in m.parameters()}
    for p in frozen:
        if id(p) in held:
            p.requires_grad_(True)


def _prune_fusion(fusion: nn.Module, keep: Sequence[str]) -> None:
    for name in [n for n in fusion.adapter_names if n not in keep]:
        del fusion.adapters[name]
    # a MultiFusion site: each fusion over the pool loses the pruned adapters too
    for site in getattr(fusion, "fusions_by_name", {}).values():
        for name in [n for n in site.adapter_names if n not in keep]:
            del site.adapters[name]
    fusion.invalidate_fold_cache()


def _check_multi_fusions(record, sites, plan) -> None:
    """Before any change: every fusion of every MultiFusion site keeps at least one adapter."""
    for key, s in sites.items():
        for fname, site in getattr(s.module, "fusions_by_name", {}).items():
            if not [n for n in site.adapter_names if n in plan[key]]:
                raise ValueError(f"fusedadapter.adapter_drop: fusion {fname!r} fuses {site.adapter_names} at block "
                                 f"{key[0]} {key[1]}, all pruned (kept {plan[key]}); keep more adapters or remove "
                                 f"the fusion")


def _layer_set(skip_layers, n_layers: int) -> List[int]:
    if isinstance(skip_layers, bool):
        raise TypeError("fusedadapter.adapter_drop: skip_layers must be an int or a collection of block indices")
    if isinstance(skip_layers, int):
        if not 0 <= skip_layers <= n_layers:
            raise ValueError(f"fusedadapter.adapter_drop: skip_layers={skip_layers} is outside 0..{n_layers} "
                             f"(the model has {n_layers} blocks)")
        return list(range(skip_layers))
    layers = sorted({int(i) for i in skip_layers})
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"fusedadapter.adapter_drop: skip_layers names blocks {bad} outside 0..{n_layers - 1}")
    return layers


def _check_keep(keep, smallest: int) -> None:
    if keep is None:
        return
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"fusedadapter.adapter_drop: keep must be a positive int (adapters kept per site), got {keep!r}")
    if keep > smallest:
        raise ValueError(f"fusedadapter.adapter_drop: keep={keep} but a site fuses only {smallest} adapters")


def _rank(means: Mapping[str, float], order: Sequence[str], k: int) -> List[str]:
    ranked = sorted(order, key=lambda n: (-means.get(n, float("-inf")), order.index(n)))
    top = set(ranked[:k])
    return [n for n in order if n in top]


def _global_means(site_means: Mapping[SiteKey, Mapping[str, float]], names: Sequence[str]) -> Dict[str, float]:
    out = {}
    for n in names:
        vals = [m[n] for m in site_means.values() if n in m]
        if vals:
            out[n] = sum(vals) / len(vals)
    return out


def _drop_patched(model, record, batches, keep, skip_layers, per_site) -> AdapterDropReport:
    sites = {(s.layer_idx, s.location): s for s in record.sites}
    skipped = _layer_set(skip_layers, len(find_layers(model, arch_spec(model))))
    _check_keep(keep, min(s.module.num_adapters for s in sites.values()))
    first_names = list(record.sites[0].module.adapter_names) if record.sites else []
    union = []
    for s in record.sites:
        union.extend(n for n in s.module.adapter_names if n not in union)
    report = AdapterDropReport(adapters=union, skipped_layers=skipped, per_site=per_site)
    counted = {k for k in sites if k[0] not in skipped and not _is_skipped(sites[k].runtime)}
    if keep is not None and not per_site and len({tuple(s.module.adapter_names) for s in record.sites}) > 1:
        raise ValueError("fusedadapter.adapter_drop: the sites fuse different adapter sets (an earlier per_site=True "
                         "call?); prune them again with per_site=True")

    if batches is not None:
        site_means, report.batches, report.tokens = _calibrate_patched(model, record, batches, counted)
        report.site_probs = dict(sorted(site_means.items()))
        report.mean_probs = _global_means(site_means, union)
    if keep is not None:
        if batches is None:
            raise ValueError("fusedadapter.adapter_drop: keep= needs calibration_batches (the fusion probabilities "
                             "rank the adapters)")
        if not report.site_probs:
            raise ValueError("fusedadapter.adapter_drop: the calibration measured no site (no batches, or every "
                             "site is skipped); nothing to rank the adapters by")
        if not per_site:
            kept = _rank(report.mean_probs, first_names, keep)
            plan = {key: kept for key in sites}
        else:
            plan = {}
            for key, s in sites.items():
                order = s.module.adapter_names
                means = report.site_probs.get(key) or report.mean_probs  # uncounted (skipped) sites: global
                plan[key] = _rank(means, order, keep)
    else:
        plan = {key: list(s.module.adapter_names) for key, s in sites.items()}

    if keep is not None:
        _check_multi_fusions(record, sites, plan)

    # --- apply (nothing above changed the model)
    with torch.no_grad():
        for key, s in sites.items():
            if keep is not None:
                _prune_fusion(s.module, plan[key])
            _set_skipped(s.runtime, key[0] in skipped)
            # a skipped site gets no gradients: frozen (DDP's defaults), unfrozen when it runs again
            (_freeze if key[0] in skipped else _unfreeze)(s.runtime, [s.module])
    report.site_kept = dict(sorted(plan.items()))
    report.kept = [n for n in union if any(n in k for k in plan.values())]
    if keep is not None:
        # save_adapterhub writes record.adapter_names (and the fusion's adapter_names): the kept set.
        record.adapter_names = [n for n in record.adapter_names if n in report.kept]
        if getattr(record, "fusions", None):
            record.fusions = [(f, cfg, [n for n in names if n in report.kept]) for f, cfg, names in record.fusions]
    return report


def skipped_layers(model: nn.Module) -> List[int]:
    """The blocks whose fusion sites :func:`adapter_drop` skips (patched or accelerated model)."""
    record = patch_record(model)
    if record is not None:
        return sorted({s.layer_idx for s in record.sites if _is_skipped(s.runtime)})
    from .integrations.adapterhub import _accelerated_layers

    layers = _accelerated_layers(model)
    return sorted(layers[0].adapters_config.skip_layers or []) if layers else []


# --------------------------------------------------------------------------------------------
# accelerated AdapterHub models
# --------------------------------------------------------------------------------------------
def _active_fuse(config):
    from adapters.composition import AdapterCompositionBlock, Fuse

    setup = config.active_setup
    if not isinstance(setup, Fuse):
        raise ValueError(f"fusedadapter.adapter_drop: the active AdapterHub setup must be one Fuse of adapters, got "
                         f"{setup!r} (set_active_adapters(Fuse(...)))")
    if any(isinstance(c, AdapterCompositionBlock) for c in setup):
        raise ValueError(f"fusedadapter.adapter_drop: the active Fuse {setup!r} nests composition blocks; only a Fuse "
                         "of adapters can be pruned")
    return setup, Fuse


def _drop_accelerated(model, layers, batches, keep, skip_layers, per_site) -> AdapterDropReport:
    if per_site:
        raise ValueError("fusedadapter.adapter_drop: per_site=True needs a patched model; AdapterHub's Fuse has one "
                         "adapter set for every layer")
    config = layers[0].adapters_config  # AdapterHub's one ModelAdaptersConfig, shared by every layer
    fuse, Fuse = _active_fuse(config)
    names = [str(c) for c in fuse]
    n_layers = 1 + max(int(layer.layer_idx) for layer in layers)
    n_layers = max(n_layers, int(getattr(getattr(model, "config", None), "num_hidden_layers", 0) or 0))
    skipped = _layer_set(skip_layers, n_layers)
    _check_keep(keep, len(names))
    report = AdapterDropReport(adapters=names, skipped_layers=skipped)
    previous_skip = set(config.skip_layers or [])
    fusions = [layer.adapter_fusion_layer[fuse.name] for layer in layers if fuse.name in layer.adapter_fusion_layer]
    if batches is not None:
        acc = _Accumulator()
        with _EvalState(model, fusions) as state, torch.inference_mode():
            for batch in batches:
                state.reset_temperatures()
                out = _call(model, batch, output_adapter_fusion_attentions=True)
                report.batches += 1
                att = getattr(out, "adapter_fusion_attentions", None)
                if att is None and isinstance(out, Mapping):
                    att = out.get("adapter_fusion_attentions")
                if att is None and isinstance(out, tuple):
                    att = out[-1]
                for layer_idx, per_loc in (att or {}).get(fuse.name, {}).items():
                    if layer_idx in skipped or layer_idx in previous_skip:
                        continue
                    for loc, probs in per_loc.items():
                        acc.add((int(layer_idx), loc), names, torch.as_tensor(probs), batch)
        site_means = acc.means()
        report.site_probs = dict(sorted(site_means.items()))
        report.mean_probs = _global_means(site_means, names)
        if acc.counts:
            report.tokens = int(round(next(iter(acc.counts.values()))))
    kept = names
    if keep is not None:
        if batches is None:
            raise ValueError("fusedadapter.adapter_drop: keep= needs calibration_batches")
        if not report.site_probs:
            raise ValueError("fusedadapter.adapter_drop: the calibration measured no site (no batches, or every "
                             "site is skipped)")
        kept = _rank(report.mean_probs, names, keep)
        config.active_setup = Fuse(*kept, name=fuse.name)
    config.skip_layers = skipped or None
    # Unused parameters get no gradients (DDP's defaults fail on them): freeze the dropped adapters,
    # and the kept adapters and the fusion layer of a skipped block (unfrozen when it runs again).
    with torch.no_grad():
        for layer in layers:
            fusion = [layer.adapter_fusion_layer[fuse.name]] if fuse.name in layer.adapter_fusion_layer else []
            active = [layer.adapters[n] for n in kept if n in layer.adapters] + fusion
            _freeze(layer, [layer.adapters[n] for n in names if n not in kept and n in layer.adapters], remember=False)
            (_freeze if int(layer.layer_idx) in skipped else _unfreeze)(layer, active)
    report.kept = list(kept)
    report.site_kept = {(int(layer.layer_idx), layer.location_key): list(kept) for layer in layers
                        if fuse.name in layer.adapter_fusion_layer}
    report.site_kept = dict(sorted(report.site_kept.items()))
    return report


# --------------------------------------------------------------------------------------------
# the call
# --------------------------------------------------------------------------------------------
def adapter_drop(model: nn.Module, calibration_batches: Optional[Iterable] = None, *, keep: Optional[int] = None,
                 skip_layers: Union[int, Iterable[int]] = 0, per_site: bool = False) -> AdapterDropReport:
    """AdapterDrop on a patched or accelerated model, in place; returns an :class:`AdapterDropReport`.

    ``calibration_batches``: an iterable of batches (dicts of keyword arguments, tuples of
    positional ones, or one tensor) run once each to measure the mean fusion probability per
    adapter; needed for ``keep``, optional otherwise (then the report still carries the means).
    ``keep``: how many adapters every site keeps (the most used; None keeps all).
    ``skip_layers``: the number of leading blocks whose sites are skipped (or a collection of block
    indices); the skipped set is replaced, 0 runs every site. ``per_site``: rank each site by its
    own means (patched models only). See the module docstring for the exact rules.
    """
    record = patch_record(model)
    if record is not None:
        return _drop_patched(model, record, calibration_batches, keep, skip_layers, per_site)
    from .integrations.adapterhub import _accelerated_layers

    layers = _accelerated_layers(model)
    if layers:
        return _drop_accelerated(model, layers, calibration_batches, keep, skip_layers, per_site)
    raise ValueError("fusedadapter.adapter_drop: the model is neither patched (fusedadapter.patch / load_adapterhub) "
                     "nor accelerated (fusedadapter.accelerate)")
