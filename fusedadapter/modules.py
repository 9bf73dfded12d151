"""Drop-in modules: a bottleneck adapter laid out like AdapterHub's, and a fused fusion site.

Parameter names map one-to-one onto AdapterHub's (``adapters.<name>.adapter_down.0`` ...,
``query``/``key``/``value``), and every backend uses these same parameters; folded weights
live only in a cache that is keyed on every input of the fold (each tensor's identity, storage,
version counter, dtype, device and ``requires_grad``; float scalings, activations and
``ln_before`` flags by value), so scaling edits, optimizer steps, ``load_state_dict``, ``.to()``,
``.half()`` and in-place edits under ``no_grad`` all invalidate it. (Writes through ``.data``
bypass the version counter; call :meth:`FusedAdapterFusion.invalidate_fold_cache` after those.)
"""

from __future__ import annotations

import numbers
import operator
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .activations import activation_code, reference_activation
from .config import AdapterConfig, FusionConfig, check_adapter_name
from .dispatch import check_backend_name
from .fold import AdapterWeights
from .runner import run_site
from .masking import current_adapter_mask
from .site import FusionSite, cached_fold, fold_inputs_key, site_fold  # cache re-exported (its home is site.py)

__all__ = ["BottleneckAdapter", "FusedAdapterFusion", "cached_fold", "site_fold", "fold_inputs_key"]


def _init_bert(module: nn.Module) -> None:
    # AdapterHub's Adapter.init_bert_weights
    if isinstance(module, nn.Linear):
        module.weight.data.normal_(mean=0.0, std=0.02)
        if module.bias is not None:
            module.bias.data.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)


# ---------------------------------------------------------------------------------------------
# The fast fold-cache check (issue 12, host overhead). A hit of the full key (fold_inputs_key)
# rebuilds AdapterWeights for every adapter and a tuple per tensor on every call (~0.1 ms at
# N=8). The fast entry of a FusedAdapterFusion instead records *where* every input of the fold
# lives: one (dict, key) slot per module-dict entry on the way from the site to each parameter,
# float scaling, activation name and config (site._modules["adapters"], each adapter, its
# adapter_down layers and adapter_up, their _parameters, the query/key/value linears), plus the
# sizes of the dicts whose length matters (the adapters, each adapter_down). A warm call reads
# every slot with C-level maps (no Python loop) and compares the objects by id with the ones it
# was built from (the entry keeps them alive, so an id cannot be reused meanwhile): a replaced
# Parameter, layer, adapter or scaling misses, at any level. Then each tensor's version counter
# and data pointer (in-place edits, optimizer steps, load_state_dict, .to(), ``.data =``). The
# entry holds the tensors' storages, so a data pointer cannot be reused by another storage while
# it is compared against. (Global module registration hooks would be cheaper still, but make
# torch.compile recompile.)
# ---------------------------------------------------------------------------------------------
_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _site_slots(site):
    """(dicts, keys, sized): the module-dict slots holding every input of the site's fold, and the
    dicts whose size is part of the structure (an adapter or a layer added or removed)."""
    dicts, keys = [], []

    def add(d, k):
        dicts.append(d)
        keys.append(k)

    mods = site._modules
    adapters = mods["adapters"]._modules
    add(mods, "adapters")
    sized = [adapters]
    for name, a in adapters.items():
        add(adapters, name)
        am = a._modules
        add(am, "adapter_down")
        add(am, "adapter_up")
        down = am["adapter_down"]._modules
        sized.append(down)
        for k, layer in down.items():
            add(down, k)
            for pk in layer._parameters:
                add(layer._parameters, pk)
        up = am["adapter_up"]._parameters
        for pk in up:
            add(up, pk)
        d = a.__dict__
        add(d if "scaling" in d else a._parameters, "scaling")
        add(d, "activation_name")
        add(d, "config")
    for name in ("query", "key", "value"):
        add(mods, name)
        lin = mods.get(name)
        if lin is not None:
            for pk in lin._parameters:
                add(lin._parameters, pk)
    return dicts, keys, sized


class _FastFold:
    """The fast check's entry. Most slots are compared in one C-level list comparison against the
    objects the entry was built from (it holds them): identical objects compare equal without a
    call; modules (nn.Module defines no ``__eq__``) are equal only to themselves; floats, activation
    names and configs by value (what the full key does too); a tensor of more than one element that
    is not the held one cannot compare equal (its ``==`` is elementwise, and the truth value of a
    many-element tensor raises, which is a miss). One-element tensors (a learned scaling) would
    compare by value, so they are compared by id instead. Then every tensor's version counter and
    data pointer. (Measured: ~5.5 us a hit for a site of 8 adapters, against ~9 us for separate id
    and module passes; issue 12, ``python -m benchmarks host-overhead``.)"""

    __slots__ = ("dtype", "dicts", "keys", "objs", "id_dicts", "id_keys", "ids", "sized", "sizes",
                 "tensors", "versions", "ptrs", "storages", "value")

    def __init__(self, dtype, site, value):
        self.dtype = dtype
        dicts, keys, self.sized = _site_slots(site)
        got = list(map(dict.get, dicts, keys))
        by_id = [isinstance(v, torch.Tensor) and v.numel() <= 1 for v in got]
        self.dicts = [d for d, i in zip(dicts, by_id) if not i]
        self.keys = [k for k, i in zip(keys, by_id) if not i]
        self.objs = [v for v, i in zip(got, by_id) if not i]  # held: they stay alive, so do their ids
        self.id_dicts = [d for d, i in zip(dicts, by_id) if i]
        self.id_keys = [k for k, i in zip(keys, by_id) if i]
        self.ids = [id(v) for v, i in zip(got, by_id) if i]
        self.sizes = list(map(len, self.sized))
        self.tensors = [v for v in got if isinstance(v, torch.Tensor)]
        self.versions = list(map(_VERSION, self.tensors))
        self.ptrs = list(map(_DATA_PTR, self.tensors))
        self.storages = [t.untyped_storage() for t in self.tensors]
        self.value = value

    def get(self, dtype):
        if self.dtype != dtype:
            return None
        ts = self.tensors
        try:
            if list(map(dict.get, self.dicts, self.keys)) != self.objs \
                    or list(map(len, self.sized)) != self.sizes \
                    or (self.ids and list(map(id, map(dict.get, self.id_dicts, self.id_keys))) != self.ids):
                return None
            if torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, ts)):
                return None
            if list(map(_VERSION, ts)) != self.versions or list(map(_DATA_PTR, ts)) != self.ptrs:
                return None
        except Exception:  # a many-element tensor's truth value, an inference tensor (no version counter), ...
            return None
        return self.value


class BottleneckAdapter(nn.Module):
    """AdapterHub's sequential bottleneck adapter (its ``Adapter``), as fusion consumes it.

    ``forward(x)`` returns the scaled up-projection ``scaling * adapter_up(adapter_down(x))``:
    what AdapterHub stacks into the fusion's keys and values (its ``up``).
    """

    def __init__(self, hidden_size: int, config: AdapterConfig = AdapterConfig(), default_activation: str = "relu"):
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.bottleneck_size = config.width(hidden_size)
        self.activation_name = config.activation(default_activation)
        layers = []
        if config.ln_before:
            # AdapterHub registers this LayerNorm twice (adapter_norm_before and adapter_down.0);
            # so do we, so that state_dict keys map one-to-one.
            self.adapter_norm_before = nn.LayerNorm(hidden_size)
            layers.append(self.adapter_norm_before)
        layers.append(nn.Linear(hidden_size, self.bottleneck_size))
        layers.append(reference_activation(self.activation_name))
        self.adapter_down = nn.Sequential(*layers)
        self.adapter_up = nn.Linear(self.bottleneck_size, hidden_size)
        if config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        elif config.scaling == "channel":
            self.scaling = nn.Parameter(torch.ones(hidden_size))
        else:
            self.scaling = float(config.scaling)
        self.adapter_down.apply(_init_bert)
        self.adapter_up.apply(_init_bert)

    @property
    def down(self) -> nn.Linear:
        return self.adapter_down[1 if self.config.ln_before else 0]

    @property
    def layer_norm(self) -> Optional[nn.LayerNorm]:
        return self.adapter_down[0] if self.config.ln_before else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_up(self.adapter_down(x)) * self.scaling

    def weights(self) -> AdapterWeights:
        ln = self.layer_norm
        return AdapterWeights(self.down.weight, self.down.bias, self.adapter_up.weight, self.adapter_up.bias,
                              self.scaling, None if ln is None else ln.weight, None if ln is None else ln.bias,
                              activation_code(self.activation_name), ln is not None)


AdaptersSpec = Union[Sequence[AdapterConfig], Mapping[str, AdapterConfig]]


@torch.library.custom_op("fusedadapter::step_temperature", mutates_args=("temperature",))
def _step_temperature_op(temperature: torch.Tensor, reduction: float) -> torch.Tensor:
    """AdapterHub's temperature step: returns ``T`` (a new tensor) and sets ``temperature`` to
    ``max(T - reduction, 1)`` in place (float64 arithmetic: the same values as AdapterHub's floats).

    An opaque op, not inline tensor ops, because torch.compile (2.13) mishandles the inline form
    two ways: dynamo drops in-place writes to a 0-dim float64 CPU buffer (T never moves), and
    AOTAutograd's partitioner recomputes a saved pre-step value from the buffer *after* the write
    (a compiled backward then uses the next call's temperature). This op's output is saved as is."""
    old = temperature.clone()
    temperature.sub_(reduction).clamp_(min=1.0)
    return old


@_step_temperature_op.register_fake
def _(temperature, reduction):
    return torch.empty_like(temperature)


class FusedAdapterFusion(nn.Module, FusionSite):
    """N bottleneck adapters and AdapterHub's fusion attention over them, as one site.

    ``forward(adapter_input, residual, query=None, *, return_probs=False, adapter_mask=None)`` takes
    tensors of shape (..., H) and returns the site's output before the sub-layer's ``LN(. + x)``:
    ``o + residual`` (``o`` alone under ``residual_before``); with ``return_probs``, ``(out, p)``,
    ``p`` (..., N).

    ``backend``: ``"auto"`` (the dispatch table), ``"reference"`` (eager, AdapterHub's op
    sequence), ``"torch"``, ``"triton"``, ``"cpu"`` or ``"cuda"``.
    ``attention_dropout``: the model's attention dropout, which AdapterHub uses when the
    fusion config's ``dropout_prob`` is None or 0.
    """

    def __init__(self, hidden_size: int, adapters: AdaptersSpec, fusion: Union[str, dict, FusionConfig] = "dynamic",
                 backend: str = "auto", *, default_activation: str = "relu", attention_dropout: float = 0.1):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        if isinstance(adapters, Mapping):
            items = list(adapters.items())
        elif isinstance(adapters, (list, tuple)):
            items = [(str(i), cfg) for i, cfg in enumerate(adapters)]
        else:
            raise TypeError(f"adapters must be a sequence or a mapping of AdapterConfig, got {type(adapters).__name__}")
        if not items:
            raise ValueError("adapters must name at least one AdapterConfig")
        for name, cfg in items:
            if not isinstance(cfg, AdapterConfig):
                raise TypeError(f"adapter {name!r}: expected an AdapterConfig, got {type(cfg).__name__}")
            check_adapter_name(name)
        self.hidden_size = hidden_size
        self.fusion_config = FusionConfig.load(fusion)
        self.backend = backend
        self.adapters = nn.ModuleDict({name: BottleneckAdapter(hidden_size, cfg, default_activation) for name, cfg in items})
        cfg = self.fusion_config
        self.query = nn.Linear(hidden_size, hidden_size) if cfg.query else None
        self.key = nn.Linear(hidden_size, hidden_size) if cfg.key else None
        self.value = nn.Linear(hidden_size, hidden_size, bias=False) if cfg.value else None
        for lin in (self.query, self.key, self.value):
            if lin is not None:
                lin.apply(_init_bert)
        if cfg.value and cfg.value_initialized:
            with torch.no_grad():
                self.value.weight.fill_(1e-6).fill_diagonal_(1.0)
        self.dropout_p = cfg.effective_dropout(attention_dropout)
        # AdapterHub's BertFusion.T (50 under temperature=True, else 1; lowered by T0/1000 on every
        # forward call, floor 1; not saved): a 0-dim float64 buffer (float64: AdapterHub's T is a
        # Python float), non-persistent, stepped in place by forward (_step_temperature_op), so
        # under torch.compile the step runs in the graph (no guard on its value, no recompiles) and
        # a value set by hand (``site.T = ...``, a property) reaches compiled graphs.
        t0 = 50.0 if cfg.temperature else 1.0
        self.reduction = t0 / 1000.0
        self.register_buffer("_temperature", torch.tensor(t0, dtype=torch.float64), persistent=False)
        # True while T is 1.0 for good (temperature=False and never set): forward then passes the
        # constant 1.0 and does no tensor work for the temperature.
        self._temperature_fixed = not cfg.temperature
        self._fold_cache = None
        self._fast_fold = None

    # ------------------------------------------------------------------ properties and helpers
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        check_backend_name(name)
        self._backend = name

    @property
    def adapter_names(self):
        return list(self.adapters.keys())

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    @property
    def bottleneck(self) -> int:  # read on every call (the runner's form choice): module dicts, no __getattr__
        return sum([a.__dict__["bottleneck_size"] for a in self._modules["adapters"]._modules.values()])

    @property
    def residual_before(self) -> bool:
        return self.fusion_config.residual_before

    @property
    def anchor_param(self) -> torch.Tensor:
        # read through the module dicts: nn.Module.__getattr__ costs ~1 us a lookup, every call
        first = next(iter(self._modules["adapters"]._modules.values()))
        return first._modules["adapter_up"]._parameters["weight"]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, adapters={self.adapter_names}, backend={self.backend!r}, "
                f"dropout_p={self.dropout_p}")

    def invalidate_fold_cache(self) -> None:
        FusionSite.invalidate_fold_cache(self)
        self._fast_fold = None

    @property
    def T(self) -> float:
        """The fusion temperature (AdapterHub's ``BertFusion.T``): a float to read and to set."""
        return float(self._temperature)

    @T.setter
    def T(self, value: float) -> None:
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or value == float("inf"):
            raise ValueError(f"T (the fusion temperature) must be a positive finite number, got {value!r}")
        with torch.no_grad():
            self._temperature.fill_(float(value))
        self._temperature_fixed = float(value) == 1.0  # 1.0 stays 1.0: max(1 - reduction, 1)

    def step_temperature(self):
        """The temperature for this call; lowers the stored one as AdapterHub does (every call,
        ``T = max(T - reduction, 1)``). Returns the float 1.0 while the temperature is fixed at 1,
        else a 0-dim float64 tensor (the value before the step; the step is an in-place tensor op,
        so it runs inside compiled graphs)."""
        if self._temperature_fixed:
            return 1.0
        if torch.compiler.is_exporting():  # the current T as a constant, not stepped, with a warning
            from .export_hooks import exported_temperature

            return exported_temperature(self, self._temperature)
        return _step_temperature_op(self._temperature, self.reduction)

    def _apply(self, fn, recurse=True):
        # .half()/.to(dtype) would round the temperature buffer (AdapterHub's T is a Python float):
        # keep it float64, following the module's device.
        t = self._buffers.get("_temperature")
        out = super()._apply(fn, recurse)
        new = self._buffers.get("_temperature")
        if t is not None and new is not None and new.dtype != torch.float64:
            self._buffers["_temperature"] = t.to(device=new.device)
        return out

    # ------------------------------------------------------------------ the site (FusionSite's hooks)
    def _adapter_modules_or_weights(self):
        return [a.weights() for a in self.adapters.values()]

    def _fusion_linears(self):
        return self.query, self.key, self.value

    def _reference_modules(self):
        return list(self.adapters.values()), self.query, self.key, self.value

    def _reference_training(self, dropout_p):
        return self.training

    def folded(self, dtype, n_tokens=None):
        if torch.compiler.is_compiling():  # in-graph fold; no cache state for dynamo to guard on
            return FusionSite.folded(self, dtype, n_tokens)
        fast = self.__dict__.get("_fast_fold")
        if fast is not None:
            value = fast.get(dtype)
            if value is not None:
                return value
        value = FusionSite.folded(self, dtype, n_tokens)
        entry = (self._fold_cache or {}).get("folded")
        if entry is not None and entry[2] is value:  # the cached eval fold: remember it for the fast check
            self._fast_fold = _FastFold(dtype, self, value)
        return value

    # ------------------------------------------------------------------ forward
    def forward(self, adapter_input: torch.Tensor, residual: torch.Tensor, query: Optional[torch.Tensor] = None, *,
                return_probs: bool = False, dropout_mask: Optional[torch.Tensor] = None,
                adapter_mask: Optional[torch.Tensor] = None):
        """``dropout_mask`` (bool, (..., N)): replay this logit-dropout draw (training mode only).

        ``adapter_mask`` (bool, True = the adapter takes part; columns in :attr:`adapter_names`
        order): ``(batch, N)`` applies to every token of a batch element of inputs ``(batch, ..., H)``;
        ``(..., N)`` matching the inputs' leading shape is per token. Masked adapters leave the
        row's softmax (probability 0, in eval and in training, after the logit dropout); a row
        with every adapter masked returns ``residual`` alone (the bare sub-layer; probs all 0).
        Left ``None``, the mask of an enclosing :func:`fusedadapter.adapter_mask` block (this
        thread) applies, if any: that is how a patched model gets one per call.
        """
        if adapter_mask is None and current_adapter_mask() is not None:  # inside a block (a cheap first look)
            adapter_mask = current_adapter_mask(self.adapters)  # iterating the ModuleDict gives the names
        temperature = self.step_temperature()
        dropout_p = self.dropout_p if self.training else 0.0
        out, probs = run_site(self, adapter_input, residual, query, backend=self.backend, temperature=temperature,
                              dropout_p=dropout_p, keep_mask=dropout_mask if self.training else None,
                              adapter_mask=adapter_mask)
        if return_probs:
            return out, probs.to(out.dtype)
        return out
