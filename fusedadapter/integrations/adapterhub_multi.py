"""Per-row routing over several ``Fuse`` setups of an accelerated AdapterHub model (issue 16).

AdapterHub activates one ``Fuse`` per forward; its per-row composition, ``MultiTask``, takes
``Fuse`` children by its nesting table but fails at run time in 1.3.0 (``compose_multi_task``
hands them to ``BatchSplit``, which refuses ``Fuse``). :func:`fusedadapter.accelerate` gives each
``BottleneckLayer`` the instance-level :func:`fused_compose_multi_task` below, so that::

    model.add_adapter_fusion(Fuse("a", "b", "c"))                  # several setups over one pool
    model.add_adapter_fusion(Fuse("c", "a", name="pair"))
    model.active_adapters = MultiTask(Fuse("a", "b", "c"), Fuse("c", "a", name="pair"))
    fusedadapter.accelerate(model)
    out = model(**batch, task_ids=[0, 1, 1, 0])                    # AdapterHub's forward argument
    with fusedadapter.fusion_route(["a,b,c", "pair", "pair", "a,b,c"]):   # or: names / ids per row
        out = model(**batch)

serves a mixed batch in one forward: each row runs through its ``Fuse`` (ids index the
``MultiTask``'s children, names are the ``Fuse`` names). ``task_ids`` wins over an enclosing
:func:`fusedadapter.fusion_route`. What runs per site: the rows of each setup (a slice when they
are adjacent, a gather otherwise) through the accelerated ``compose_fuse`` of that setup (its own
fused op, temperature step and ``output_adapter_fusion_attentions`` entry, holding its rows), the
states put back in row order (AdapterHub's ``pad_and_concat`` and ``vslice``); a setup without rows
does not run. Masks: an enclosing :func:`fusedadapter.adapter_mask` block's mask reaches each
setup's rows; without ``adapter_names`` its columns are the pool: the setups' adapters in order
of first appearance. Under autograd the fusion parameters of setups without rows, and the
adapters only they fuse, get exact zero gradients (as :class:`fusedadapter.MultiFusion`).
A ``MultiTask`` whose children are not all ``Fuse`` keeps AdapterHub's own ``compose_multi_task``.
"""

from __future__ import annotations

from typing import List

import torch

from .. import masking
from ..masking import adapter_mask, current_adapter_mask
from ..multitask import current_fusion_route, route_ids
from ..zero_grads import attach_zero_grads

__all__ = ["fused_compose_multi_task"]


def fused_compose_multi_task(self, adapter_setup, state, lvl: int = 0):
    """Replacement of ``BottleneckLayer.compose_multi_task`` (bound to one accelerated layer)."""
    from adapters.composition import Fuse
    from adapters.context import ForwardContext

    children = list(adapter_setup.children)
    if not children or not all(isinstance(c, Fuse) for c in children):
        return type(self).compose_multi_task(self, adapter_setup, state, lvl=lvl)
    names = [c.name for c in children]
    where = f"fusedadapter.accelerate: MultiTask({', '.join(names)})"
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: two Fuse setups share a name; name them (Fuse(..., name=...))")
    here = [c for c in children if any(n in self.adapters for n in _adapters_of(c))]
    missing = [c.name for c in children if c.last() not in self.adapters]
    if missing:
        raise ValueError(f"{where}: at layer {self.layer_idx} {self.location_key} the setups {missing} have no last "
                         f"adapter while {[c.name for c in here]} run; routed setups must share their sites")
    ln_after = {c.name: bool(self.adapters[c.last()].original_ln_after) for c in children}
    if len(set(ln_after.values())) != 1:  # post_forward runs once, with one last adapter, for every row
        raise ValueError(f"{where}: the setups' last adapters disagree on original_ln_after ({ln_after})")

    context = ForwardContext.get_context()
    route = getattr(context, "task_ids", None) if context is not None else None
    if route is None:
        route = current_fusion_route()
    if route is None:
        raise ValueError(f"{where}: no route: pass task_ids= (one setup id or name per batch row) to the model's "
                         f"forward, or call it inside `with fusedadapter.fusion_route(...)`")
    batch = state.hidden_states.shape[0]
    ids = route_ids(route, names, batch, where=where, owner="its Fuse setups")

    # The enclosing mask block's rows go to each setup (named columns: the pool's when unnamed).
    block = getattr(masking._state, "value", None)
    mask = mask_names = None
    if block is not None:
        mask = current_adapter_mask(None, batch=batch)
        mask_names = block[1] or list(dict.fromkeys(n for c in children for n in _adapters_of(c)))
        if block[1] is None and mask.shape[-1] != len(mask_names):
            raise ValueError(f"adapter_mask: the mask has {mask.shape[-1]} columns but the routed setups' pool is "
                             f"{mask_names} ({len(mask_names)}); give one column per pool adapter or adapter_names=")

    id_list = ids.tolist()
    counts = [id_list.count(k) for k in range(len(children))]
    order = torch.argsort(ids, stable=True) if any(x > y for x, y in zip(id_list, id_list[1:])) else None
    states, start = [], 0
    for k, child in enumerate(children):
        n = counts[k]
        if n == 0:
            continue
        rows = slice(start, start + n) if order is None else order[start:start + n].to(state.hidden_states.device)
        start += n
        sub = state if n == batch else self.vslice(state, rows)
        sub_mask = None if mask is None else (mask if n == batch or mask.dim() < 2 else mask[rows])
        with adapter_mask(sub_mask, adapter_names=None if sub_mask is None else mask_names):
            states.append(self.compose_fuse(child, sub, lvl=lvl + 1))
    out = states[0] if len(states) == 1 else self.pad_and_concat(states)
    if order is not None and len(states) > 1:
        out = self.vslice(out, torch.argsort(order).to(state.hidden_states.device))
    if torch.is_grad_enabled():
        unused = _unused_params(self, children, counts)
        if unused:
            out = out._replace(hidden_states=attach_zero_grads(out.hidden_states, *unused))
    return out


def _unused_params(layer, children, counts) -> List[torch.Tensor]:
    """Trainable parameters of this layer that no routed row reaches: the fusion layers of setups
    without rows and the adapters only they fuse."""
    used = {n for c, k in zip(children, counts) if k for n in _adapters_of(c)}
    params = []
    for c, k in zip(children, counts):
        if not k:
            if c.name in layer.adapter_fusion_layer:
                params.extend(p for p in layer.adapter_fusion_layer[c.name].parameters() if p.requires_grad)
            params.extend(p for n in _adapters_of(c) if n not in used and n in layer.adapters
                          for p in layer.adapters[n].parameters() if p.requires_grad)
    return list({id(p): p for p in params}.values())


def _adapters_of(setup) -> List[str]:
    """A setup's adapter names in its order (a nested block's, sorted, where it has one)."""
    return [n for ch in setup.children for n in ([ch] if isinstance(ch, str) else sorted(ch.flatten()))]
