"""Multi-task serving: several named fusions over one shared adapter pool, routed per batch row.

AdapterFusion's stage 2 trains one fusion per target task over the same pool of adapters. A
:class:`MultiFusion` site holds the pool once and K named fusions over it (each a subset of the
pool, in its own order, with its own :class:`~fusedadapter.FusionConfig`)::

    site = MultiFusion(768, {"a": cfg, "b": cfg, "c": cfg},
                       {"sst": ("dynamic", ["a", "b"]), "mnli": ("static", ["b", "c", "a"])})
    with fusedadapter.fusion_route(["sst", "mnli", "sst"]):      # one fusion per batch row
        out = site(adapter_input, residual)                       # or site(..., route=...)

Each row runs through its own fusion: the rows of fusion k are gathered (a slice when they are
contiguous), that fusion's :class:`~fusedadapter.FusedAdapterFusion` runs on them (every
backend, forward and backward, its fold cache, masks and dropout), and the outputs are put back
in row order (out of place: autograd flows). Each row's down projections are computed once (in
its fusion's GEMM1); the per-fusion work runs on row groups (punica's SGMV pattern): group by
group, or on ``triton`` in one grouped op call for all the groups (:mod:`.multitask_rows`, serving
and training). A fusion without rows is not run (its temperature does not step) and, under autograd,
its trainable parameters and the pool adapters no routed fusion uses get exact zero gradients
(:func:`fusedadapter.zero_grads.attach_zero_grads`), as ``DistributedDataParallel`` and
AdapterHub-style optimizers expect a gradient for every trainable parameter.

Parameter names are AdapterHub's: ``adapters.<adapter>.adapter_down.0.weight`` ... (held once,
shared by every fusion: each fusion's ``adapters`` are the pool's modules; the state dict holds
them once, under the pool's names) and ``adapter_fusion_layer.<fusion name>.query.weight`` ... with the
fusion name defaulting to the adapters' names joined by ``','`` (AdapterHub's default
``Fuse`` name; ``Fuse(..., name=...)`` gives others).

Routing (the ``route``): a fusion name (every row), a sequence of names (one per batch row), or
an integer tensor / sequence of fusion indices (``(batch,)``, in :attr:`MultiFusion.fusion_names`
order). :func:`fusion_route` sets it for every :class:`MultiFusion` called in this thread inside
the block (a ``threading.local``, like :func:`fusedadapter.adapter_mask`): that is how a patched
model gets one. A route of batch ``B`` meeting a site of batch ``B*k`` (``generate(num_beams=k)``)
is repeated per row as the inputs are. Masks (``adapter_mask=`` or an :func:`adapter_mask` block)
have the pool's columns (:attr:`MultiFusion.adapter_names`, or named columns in the block); each
fusion takes its adapters' columns. Probabilities (``return_probs``) come back in the pool's
columns, ``(..., len(pool))``, zero for the adapters a row's fusion does not fuse.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .config import AdapterConfig, FusionConfig, check_adapter_name
from .dispatch import check_backend_name
from . import masking
from . import multitask_rows as rows
from .masking import current_adapter_mask
from .modules import BottleneckAdapter, FusedAdapterFusion
from .zero_grads import attach_zero_grads

__all__ = ["MultiFusion", "MultiHead", "fusion_route", "current_fusion_route", "normalize_fusions", "route_ids"]

_state = threading.local()

RouteLike = Union[str, Sequence[str], Sequence[int], torch.Tensor]
FusionSpec = Union[Sequence[str], Tuple[Union[str, Mapping, FusionConfig], Sequence[str]]]


@contextlib.contextmanager
def fusion_route(route: Optional[RouteLike]) -> Iterator[None]:
    """Route the batch rows of every :class:`MultiFusion` site called in this thread inside the block.

    ``route``: a fusion name (all rows), a sequence of fusion names (one per batch row), or fusion
    indices (an integer tensor or sequence, ``(batch,)``). ``None`` clears an enclosing route.
    Blocks nest (the innermost wins); other threads are not affected. Checked against each site's
    fusions and batch when the site runs (unknown names, bad shapes raise there)."""
    if route is not None and not isinstance(route, (str, torch.Tensor, list, tuple)):
        raise TypeError(f"fusion_route: expected a fusion name, a sequence of names or indices, or an integer "
                        f"tensor, got {type(route).__name__}")
    if isinstance(route, torch.Tensor) and (route.dim() != 1 or route.is_floating_point() or route.is_complex()
                                            or route.dtype == torch.bool):
        raise ValueError(f"fusion_route: a route tensor must be 1-D (batch,) of integer fusion ids, got "
                         f"{route.dtype} {tuple(route.shape)}")
    previous = getattr(_state, "value", None)
    _state.value = route
    try:
        yield
    finally:
        _state.value = previous


def current_fusion_route() -> Optional[RouteLike]:
    """The route of the innermost :func:`fusion_route` block of this thread, or None."""
    return getattr(_state, "value", None)


def normalize_fusions(fusions, pool: Sequence[str], where: str = "MultiFusion") -> List[Tuple[str, FusionConfig, List[str]]]:
    """``[(name, FusionConfig, adapter names)]`` from a mapping ``name -> (config, adapters)`` (or
    ``name -> adapters``, config ``"dynamic"``), or a sequence of ``(config, adapters)`` / adapter
    lists (named by their adapters joined with ``','``, AdapterHub's default)."""
    if isinstance(fusions, Mapping):
        items = list(fusions.items())
    elif isinstance(fusions, (list, tuple)):
        items = [(None, spec) for spec in fusions]
    else:
        raise TypeError(f"{where}: fusions must be a mapping name -> (fusion config, adapter names) or a sequence, "
                        f"got {type(fusions).__name__}")
    if not items:
        raise ValueError(f"{where}: fusions must name at least one fusion")
    out, seen = [], set()
    for name, spec in items:
        if (isinstance(spec, tuple) and len(spec) == 2 and not isinstance(spec[1], str)
                and isinstance(spec[1], (list, tuple))):
            config, names = spec
        elif isinstance(spec, (list, tuple)) and all(isinstance(n, str) for n in spec):
            config, names = "dynamic", spec
        else:
            raise TypeError(f"{where}: fusion {name!r}: expected (fusion config, [adapter names]) or [adapter names], "
                            f"got {spec!r}")
        names = [str(n) for n in names]
        if not names:
            raise ValueError(f"{where}: fusion {name!r} fuses no adapters")
        unknown = [n for n in names if n not in pool]
        if unknown:
            raise ValueError(f"{where}: fusion {name!r} fuses {unknown}, which the adapter pool {list(pool)} lacks")
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: fusion {name!r} names an adapter twice: {names}")
        name = ",".join(names) if name is None else name
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"{where}: fusion names must be non-empty strings without '.' (module keys), got {name!r}")
        if name in seen:
            raise ValueError(f"{where}: two fusions are named {name!r} (name them: a mapping name -> (config, adapters))")
        seen.add(name)
        out.append((name, FusionConfig.load(config), names))
    return out


def route_ids(route: Optional[RouteLike], names: Sequence[str], batch: int, where: str = "MultiFusion",
              owner: str = "this site's fusions", expand: bool = True) -> torch.Tensor:
    """The ``(batch,)`` int64 CPU tensor of indices into ``names`` (a site's fusions) for ``route``
    (see the module doc); also used by :func:`fusedadapter.accelerate`'s ``MultiTask`` routing and
    :class:`MultiHead` (``owner`` names what ``names`` are in the messages). ``expand``: a route of
    ``B`` rows meeting a batch of ``B*k`` is repeated per row (``generate()``'s expansion); without
    it the route must have ``batch`` rows."""
    names = list(names)

    def _index(name: str) -> int:
        if name not in names:
            raise ValueError(f"{where}: unknown fusion {name!r}; {owner} are {names}")
        return names.index(name)

    if route is None:
        if len(names) == 1:
            return torch.zeros(batch, dtype=torch.int64)
        raise ValueError(f"{where}: no route for a site with fusions {names}: pass route= (one fusion name or "
                         f"id per batch row) or call the model inside `with fusedadapter.fusion_route(...)`")
    if isinstance(route, str):
        ids = torch.full((batch,), _index(route), dtype=torch.int64)
    elif isinstance(route, torch.Tensor):
        if route.dim() != 1 or route.is_floating_point() or route.is_complex() or route.dtype == torch.bool:
            raise ValueError(f"{where}: a route tensor must be 1-D (batch,) of integer fusion ids, got "
                             f"{route.dtype} {tuple(route.shape)}")
        ids = route.detach().to("cpu", torch.int64)
    elif isinstance(route, (list, tuple)):
        if all(isinstance(r, str) for r in route):
            ids = torch.tensor([_index(r) for r in route], dtype=torch.int64)
        elif all(isinstance(r, int) and not isinstance(r, bool) for r in route):
            ids = torch.tensor(list(route), dtype=torch.int64)
        else:
            raise TypeError(f"{where}: a route sequence must hold fusion names or int ids, got {list(route)!r}")
    else:
        raise TypeError(f"{where}: route must be a fusion name, a sequence of names / ids or an integer "
                        f"tensor, got {type(route).__name__}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(names)):
        raise ValueError(f"{where}: route ids must be in [0, {len(names)}) ({owner}: {names}), got "
                         f"{ids.tolist()}")
    if ids.shape[0] != batch:
        rows = ids.shape[0]
        if rows == 0 or batch % rows != 0 or not expand:
            raise ValueError(f"{where}: the route has {rows} rows but the batch here has {batch}; give one "
                             f"fusion per batch row" + (" (a route of batch B follows generate()'s expansion to B*k)"
                                                        if expand else ""))
        ids = ids.repeat_interleave(batch // rows)
    return ids


def _share_adapters(fusion: FusedAdapterFusion, adapters: Mapping[str, BottleneckAdapter]) -> None:
    """Make ``fusion.adapters`` the pool's modules (in the fusion's order): shared modules, not
    copies. ``parameters()`` / ``named_parameters()`` list each tensor once, under the pool's name
    (the pool is registered before the fusions); the state dict leaves the fusion's aliases out
    and loading fills them from the pool (the two hooks below), so files hold each adapter once,
    under ``adapters.<name>``, as AdapterHub's do."""
    fusion.adapters = nn.ModuleDict(adapters)
    fusion.register_state_dict_post_hook(_drop_shared_adapter_keys)
    fusion.register_load_state_dict_pre_hook(_fill_shared_adapter_keys)
    fusion.invalidate_fold_cache()


def _drop_shared_adapter_keys(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "adapters.")]:
        del state_dict[key]


def _fill_shared_adapter_keys(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
    # The pool (registered first) has loaded its keys already; the aliases load the same tensors
    # onto themselves.
    for name, t in module.adapters.state_dict(prefix=prefix + "adapters.", keep_vars=True).items():
        state_dict.setdefault(name, t.detach())


class MultiFusion(nn.Module):
    """K named AdapterFusion sites over one shared adapter pool; each batch row runs through one.

    ``adapters``: the pool, a mapping name -> :class:`~fusedadapter.AdapterConfig` (or a sequence,
    named ``"0"``, ``"1"``, ...). ``fusions``: see :func:`normalize_fusions`. ``backend``,
    ``default_activation``, ``attention_dropout``: as :class:`~fusedadapter.FusedAdapterFusion`
    (every fusion). ``fusions_by_name[name]`` is fusion ``name``'s own ``FusedAdapterFusion``
    (its ``adapters`` are the pool's modules).
    """

    def __init__(self, hidden_size: int, adapters, fusions, backend: str = "auto", *,
                 default_activation: str = "relu", attention_dropout: float = 0.1):
        super().__init__()
        if isinstance(adapters, Mapping):
            items = list(adapters.items())
        elif isinstance(adapters, (list, tuple)):
            items = [(str(i), cfg) for i, cfg in enumerate(adapters)]
        else:
            raise TypeError(f"MultiFusion: adapters must be a mapping or a sequence of AdapterConfig, got "
                            f"{type(adapters).__name__}")
        if not items:
            raise ValueError("MultiFusion: the adapter pool must name at least one AdapterConfig")
        for name, cfg in items:
            check_adapter_name(name, "MultiFusion: ")
            if not isinstance(cfg, AdapterConfig):
                raise TypeError(f"MultiFusion: adapter {name!r}: expected an AdapterConfig, got {type(cfg).__name__}")
        self.hidden_size = hidden_size
        self.adapters = nn.ModuleDict({n: BottleneckAdapter(hidden_size, c, default_activation) for n, c in items})
        pool = list(self.adapters.keys())
        specs = normalize_fusions(fusions, pool)
        layers = {}
        for name, config, names in specs:
            site = FusedAdapterFusion(hidden_size, {n: self.adapters[n].config for n in names}, config, backend,
                                      default_activation=default_activation, attention_dropout=attention_dropout)
            _share_adapters(site, {n: self.adapters[n] for n in names})
            layers[name] = site
        self.adapter_fusion_layer = nn.ModuleDict(layers)
        self._backend = backend

    # ------------------------------------------------------------------ properties
    @property
    def fusion_names(self) -> List[str]:
        return list(self.adapter_fusion_layer.keys())

    @property
    def fusions_by_name(self) -> Mapping[str, FusedAdapterFusion]:
        return self.adapter_fusion_layer

    @property
    def adapter_names(self) -> List[str]:
        return list(self.adapters.keys())

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        check_backend_name(name)
        self._backend = name
        for site in self.adapter_fusion_layer.values():
            site.backend = name

    @property
    def query_before_ln(self) -> bool:
        """The fusions' common ``query_before_ln`` (patched models feed one query to the site)."""
        flags = {s.fusion_config.query_before_ln for s in self.adapter_fusion_layer.values()}
        if len(flags) != 1:
            raise ValueError(f"MultiFusion: the fusions {self.fusion_names} disagree on query_before_ln")
        return flags.pop()

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, adapters={self.adapter_names}, fusions={self.fusion_names}"

    def invalidate_fold_cache(self) -> None:
        for site in self.adapter_fusion_layer.values():
            site.invalidate_fold_cache()

    # ------------------------------------------------------------------ routing
    def route_ids(self, route: Optional[RouteLike], batch: int) -> torch.Tensor:
        """The ``(batch,)`` int64 CPU tensor of fusion indices for ``route`` (see the module doc)."""
        return route_ids(route, self.fusion_names, batch)

    # ------------------------------------------------------------------ forward
    def forward(self, adapter_input: torch.Tensor, residual: torch.Tensor, query: Optional[torch.Tensor] = None, *,
                route: Optional[RouteLike] = None, return_probs: bool = False,
                dropout_mask: Optional[torch.Tensor] = None, adapter_mask: Optional[torch.Tensor] = None):
        """Inputs ``(batch, ..., H)`` as :class:`~fusedadapter.FusedAdapterFusion`; ``route`` (or the
        enclosing :func:`fusion_route`) names each batch row's fusion. ``adapter_mask`` and
        ``dropout_mask`` have the pool's columns (``(batch, len(pool))`` or ``(..., len(pool))``);
        left ``None``, an enclosing :func:`fusedadapter.adapter_mask` block's mask applies.
        Returns ``out`` (``(out, probs)``, probs in the pool's columns, with ``return_probs``)."""
        if not isinstance(adapter_input, torch.Tensor) or adapter_input.dim() < 2:
            raise ValueError(f"MultiFusion: adapter_input must be a (batch, ..., H) tensor, got "
                             f"{getattr(adapter_input, 'shape', type(adapter_input).__name__)}")
        batch = adapter_input.shape[0]
        route = route if route is not None else current_fusion_route()
        exporting = torch.compiler.is_exporting()  # the route may be a graph input: every fusion runs on every row
        ids = (rows.exported_route_ids(route, adapter_input.device) if exporting and isinstance(route, torch.Tensor)
               else self.route_ids(route, batch))
        pool = self.adapter_names
        block = getattr(masking._state, "value", None) if adapter_mask is None else None
        named_block = block is not None and block[1] is not None
        if block is not None and not named_block:  # an unnamed block mask: the pool's columns
            adapter_mask = current_adapter_mask(None, batch=batch)
        n_pool = len(pool)
        pool_index = {n: i for i, n in enumerate(pool)}
        for what, m in (("adapter_mask", adapter_mask), ("dropout_mask", dropout_mask)):
            if m is not None and (not isinstance(m, torch.Tensor) or m.dim() < 2 or m.shape[-1] != n_pool
                                  or m.shape[0] != batch):
                raise ValueError(f"MultiFusion: {what} must have the pool's {n_pool} columns {pool} and the batch "
                                 f"{batch} first: (batch, {n_pool}) or (*lead, {n_pool}), got "
                                 f"{getattr(m, 'shape', type(m).__name__)}")
        sites = list(self.adapter_fusion_layer.values())
        id_list = [] if exporting else ids.tolist()
        counts = [batch] * len(sites) if exporting else [id_list.count(k) for k in range(len(sites))]
        # rows not grouped by fusion: gathered per group (in fusion order), gathered back at the end
        order = torch.argsort(ids, stable=True) if any(x > y for x, y in zip(id_list, id_list[1:])) else None
        starts = [0, *itertools.accumulate(counts)]  # group k's first row in fusion order

        def take_rows(k):  # group k's rows of a batch-first tensor
            return rows.row_taker(order, starts[k], counts[k], batch, adapter_input.device)

        def group_masks(k):  # group k's (adapter_mask, dropout_mask): its rows, its fusion's columns
            return rows.group_masks(take_rows(k), [pool_index[a] for a in sites[k].adapters], n_pool, adapter_mask,
                                    dropout_mask, sites[k].adapters if named_block else None, batch)
        for k, site in enumerate(sites):
            if counts[k] and any(a not in pool_index for a in site.adapters):
                raise ValueError(f"MultiFusion: fusion {self.fusion_names[k]!r} fuses {list(site.adapters)} but the "
                                 f"pool holds {pool} (an adapter was removed from the pool; AdapterDrop's pruning "
                                 f"does not apply to multi-fusion sites)")
        # serving: the groups' ops write their rows of one batch output (in fusion order: see `order`)
        serving = not exporting and not torch.is_grad_enabled() and sum(c > 0 for c in counts) > 1
        into, done = None, {}  # done: the groups the grouped triton op ran (rows written), their probabilities
        if serving and dropout_mask is None:
            grouped = rows.run_groups_triton(self, sites, counts, adapter_input, residual, query, order,
                                             lambda k: group_masks(k)[0])
            if grouped is not None:
                into, done = grouped
        if serving and into is None:
            into = adapter_input.new_empty(adapter_input.shape)
        def call_group(k, sub=None, masks=None):  # group k through its fusion: its rows, its masks
            sub = sub or [None if t is None else take_rows(k)(t) for t in (adapter_input, residual, query)]
            masks = masks or group_masks(k)
            return sites[k](*sub, return_probs=True, dropout_mask=masks[1], adapter_mask=masks[0])
        # training on triton: the groups' op calls as one grouped op call (forward and backward)
        trained = {} if serving or exporting else rows.train_groups_triton(sites, counts, call_group, adapter_input)
        outs, probs_parts = [], []
        for k, site in enumerate(sites):
            n = counts[k]
            if n == 0:
                continue
            cols = [pool_index[a] for a in site.adapters]
            probs = done.get(k)
            if probs is None:  # (a group the grouped op ran has its rows written)
                sub = masks = None
                if into is not None:
                    sub = [None if t is None else take_rows(k)(t) for t in (adapter_input, residual, query)]
                    masks = group_masks(k)
                    probs = rows.run_group_into(site, into.narrow(0, starts[k], n), *sub, masks[0])
                if probs is None:
                    out, probs = trained[k] if k in trained else call_group(k, sub, masks)
                    outs.append(out)
                    if into is not None:  # a group the cpu out-path does not take (see run_group_into)
                        into.narrow(0, starts[k], n).copy_(out)
            if return_probs:
                if cols != list(range(n_pool)):
                    full = probs.new_zeros((*probs.shape[:-1], n_pool))
                    full[..., cols] = probs
                    probs = full
                probs_parts.append(probs)
        if into is not None:
            out = into
            probs = torch.cat(probs_parts, 0) if return_probs else None
        elif exporting:
            out = rows.select_rows(outs, ids)
            probs = rows.select_rows(probs_parts, ids) if return_probs else None
        elif len(outs) == 1:
            out = outs[0]
            probs = probs_parts[0] if return_probs else None
        else:  # the groups' rows in the fusions' order
            out = torch.cat(outs, 0)
            probs = torch.cat(probs_parts, 0) if return_probs else None
        if order is not None:  # the groups ran in fusion order: the batch's order back by one gather
            back = rows.inverse_permutation(order, out.device)
            out = out.index_select(0, back)  # differentiable: autograd flows to the groups
            probs = None if probs is None else probs.index_select(0, back)
        if torch.is_grad_enabled():
            unused = rows.unused_params(self, counts)
            if unused:
                out = attach_zero_grads(out, *unused)
        if return_probs:
            return out, probs
        return out


class MultiHead(nn.Module):
    """Per-task heads for a routed batch: row ``i`` goes through ``heads[route[i]]``.

    ``heads``: a mapping task (fusion) name -> module (e.g. ``nn.Linear(H, labels)``), in the
    fusions' order when the route holds ids. ``forward(x, route=None)`` (``route`` as
    :func:`fusion_route`, else the enclosing block's) returns a list of per-row outputs (tasks may
    have different output sizes), or one stacked tensor when every head's output has one shape."""

    def __init__(self, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: torch.Tensor, route: Optional[RouteLike] = None):
        names = list(self.heads.keys())
        route = route if route is not None else current_fusion_route()
        if route is None:
            raise ValueError(f"MultiHead: no route (pass route= or call it inside fusedadapter.fusion_route); "
                             f"heads are {names}")
        if not isinstance(x, torch.Tensor) or x.dim() < 1:
            raise ValueError(f"MultiHead: x must be a (batch, ...) tensor, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        # the sites' checks and messages: unknown names, ids out of range, a route of another batch
        ids = route_ids(route, names, x.shape[0], where="MultiHead", owner="the heads", expand=False)
        rows: List[Optional[torch.Tensor]] = [None] * x.shape[0]
        id_list = ids.tolist()
        for k, name in enumerate(names):
            idx = [i for i, r in enumerate(id_list) if r == k]
            if idx:
                y = self.heads[name](x.index_select(0, torch.tensor(idx, device=x.device)))
                for j, i in enumerate(idx):
                    rows[i] = y[j]
        if len({tuple(r.shape) for r in rows}) == 1:
            return torch.stack(rows)
        return rows
