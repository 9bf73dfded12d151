"""Exporting fused models: ``torch.export`` and ONNX (``torch.onnx.export(..., dynamo=True)``).

The standard calls work as they are on a :class:`~fusedadapter.FusedAdapterFusion`, on a model
patched by :func:`fusedadapter.patch` or loaded by :func:`fusedadapter.load_adapterhub`, and on
an AdapterHub model after :func:`fusedadapter.accelerate`::

    torch.onnx.export(model, (input_ids, attention_mask), "model.onnx", dynamo=True,
                      dynamic_shapes=...)             # or fusedadapter.export.onnx_export(...)
    ep = torch.export.export(model, args, dynamic_shapes=...)

What this module does while such a trace runs (``torch.compiler.is_exporting()``), through two
hooks the package calls (:func:`fold_for_export` from the fold cache, :func:`lowered_backend`
from the backend resolver):

- **Every backend lowers to the ``torch`` form** (``fusedadapter::fusion_torch``, plain aten
  ops): ``auto``, ``cpu``, ``cuda`` and ``triton`` sites are traced as the same composite graph,
  so the exported graph holds only standard ops (ONNX: the default domain only) and runs
  without this package. ``reference`` stays the eager AdapterHub op sequence (also standard ops).
- **The folded weights are constants computed once, at export**: the fold (float64, then cast
  to the op's weight dtype: float32 for fp16/bf16/fp32 models) runs on the real parameters
  outside the trace, and its results enter the graph as tensor constants (ONNX initializers).
  No float64 fold runs at inference. The exported graph therefore does not follow later edits
  of the parameters: export again after changing them.
- **What cannot be exported raises** :class:`ExportError` naming the site and the reason:
  training-mode logit dropout (call ``model.eval()``). ``temperature=True`` exports the current
  temperature as a constant, with a warning (AdapterHub lowers it on every call; the exported
  graph does not).

The fold runs outside the trace only under non-strict ``torch.export`` (the default, and the
first strategy ``torch.onnx.export`` tries). Under ``strict=True`` (dynamo) the fold is traced
into the graph instead (float64 ops on the parameters at every inference; the warning this
module emits then is not surfaced by dynamo).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .export_hooks import (ExportError, check_site_exportable, exported_temperature, fold_for_export,
                           lowered_backend)

__all__ = ["ExportError", "onnx_export", "check_exportable", "hf_dynamic_shapes", "WithFusionProbs",
           "WithAdapterMask", "WithFusionRoute", "custom_domain_ops", "fold_for_export", "lowered_backend", "check_site_exportable",
           "exported_temperature"]


# --------------------------------------------------------------------------------------------
# Helpers around the standard calls (optional: torch.onnx.export / torch.export.export work alone)
# --------------------------------------------------------------------------------------------
def check_exportable(model: nn.Module) -> None:
    """Raise :class:`ExportError` naming every fusion site of ``model`` that cannot be exported
    (training mode with logit dropout). The traced check says the same per site, without the name."""
    from .modules import FusedAdapterFusion

    bad = [name or type(model).__name__ for name, m in model.named_modules()
           if isinstance(m, FusedAdapterFusion) and m.training and m.dropout_p > 0]
    bad += [name for name, m in model.named_modules()
            if type(m).__name__ == "BertFusion" and m.training and getattr(getattr(m, "dropout", None), "p", 0) > 0]
    if bad:
        raise ExportError(f"fusedadapter: cannot export fusion sites in training mode (their logit dropout draws a "
                          f"random mask on every call): {bad}. Call model.eval() before exporting.")


# Inputs whose only dynamic axis is the batch (images); every other input of rank >= 2 gets
# (batch, sequence), rank 1 gets (batch,).
_BATCH_ONLY = ("pixel_values", "adapter_mask")


def hf_dynamic_shapes(kwargs: Mapping[str, object], *, batch: bool = True, sequence: bool = True,
                      batch_only: Sequence[str] = _BATCH_ONLY) -> Dict[str, Optional[dict]]:
    """``dynamic_shapes`` for keyword tensor inputs of a Hugging Face model: axis 0 is ``batch``,
    axis 1 ``sequence`` (inputs named in ``batch_only``, e.g. ``pixel_values``, keep axis 1 static).
    One :class:`torch.export.Dim` per name, shared by every input, so ONNX names the axes alike."""
    dims = {}
    b = torch.export.Dim("batch") if batch else None
    s = torch.export.Dim("sequence") if sequence else None
    for name, value in kwargs.items():
        if not isinstance(value, torch.Tensor):
            dims[name] = None
            continue
        d = {}
        if b is not None and value.dim() >= 1:
            d[0] = b
        if s is not None and value.dim() >= 2 and name not in batch_only:
            d[1] = s
        dims[name] = d or None
    return dims


class _Wrapper(nn.Module):
    def __init__(self, model: nn.Module, input_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.model = model
        self.input_names = None if input_names is None else list(input_names)

    def _call_args(self, args, kwargs):
        if self.input_names is not None:  # positional inputs named for the wrapped model
            if len(args) != len(self.input_names):
                raise TypeError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(args)}")
            kwargs = {**dict(zip(self.input_names, args)), **kwargs}
            args = ()
        return args, kwargs


class WithFusionProbs(_Wrapper):
    """A patched (or :func:`~fusedadapter.load_adapterhub`-loaded) model whose forward returns
    ``(output, p_0, p_1, ...)``: the model's first output (last hidden state or logits) and the
    fusion probabilities of every site, (batch, tokens, N) each, in :func:`fusion_sites` order.
    :attr:`prob_names` names them (``fusion_probs.<layer>.<location>``). With ``input_names``,
    forward takes those inputs positionally (simple ``dynamic_shapes`` and ONNX input names)."""

    def __init__(self, model: nn.Module, input_names: Optional[Sequence[str]] = None):
        super().__init__(model, input_names)
        from .patching import fusion_sites

        target = model
        while isinstance(target, (WithAdapterMask, WithFusionRoute)):
            target = target.model
        sites = fusion_sites(target)  # raises for a model that is not patched
        self._target = [target]  # a list: not a second registration of the module
        self._keys = [(layer, loc) for layer, loc, _ in sites]
        self.prob_names = [f"fusion_probs.{layer}.{loc}" for layer, loc in self._keys]

    def forward(self, *args, **kwargs):
        from .patching import collect_fusion_probs

        args, kwargs = self._call_args(args, kwargs)
        with collect_fusion_probs(self._target[0]) as store:
            out = self.model(*args, **kwargs)
        (fusion,) = store.values()
        first = out if isinstance(out, torch.Tensor) else out[0]
        return (first,) + tuple(fusion[layer][loc] for layer, loc in self._keys)


class WithAdapterMask(_Wrapper):
    """``forward(*args, adapter_mask, **kwargs)``: the model under :func:`fusedadapter.adapter_mask`
    (bool (batch, N), True = the adapter takes part; columns ``adapter_names`` or each site's order),
    so that an exported graph takes the per-row adapter mask as an input. With ``input_names``
    (``"adapter_mask"`` among them), forward takes every input positionally in that order."""

    def __init__(self, model: nn.Module, adapter_names: Optional[Sequence[str]] = None,
                 input_names: Optional[Sequence[str]] = None):
        super().__init__(model, input_names)
        self.adapter_names = None if adapter_names is None else list(adapter_names)

    def forward(self, *args, **kwargs):
        from .masking import adapter_mask as mask_block

        args, kwargs = self._call_args(args, kwargs)
        mask = kwargs.pop("adapter_mask")
        with mask_block(mask, self.adapter_names):
            return self.model(*args, **kwargs)


class WithFusionRoute(_Wrapper):
    """``forward(*args, route, **kwargs)``: the model under :func:`fusedadapter.fusion_route`
    (``route``: int64 (batch,), each row's fusion id in the sites' ``fusion_names`` order), so that
    an exported graph of a model with several fusions (``fa.patch(..., fusions=...)``, a
    :class:`~fusedadapter.MultiFusion`) takes the routing ids as an input. The exported sites run
    every fusion on every row and keep each row's own (``fusedadapter.multitask_rows.select_rows``);
    a row whose id names no fusion comes out NaN. With ``input_names`` (``"route"`` among them),
    forward takes every input positionally in that order."""

    def forward(self, *args, **kwargs):
        from .multitask import fusion_route

        args, kwargs = self._call_args(args, kwargs)
        route = kwargs.pop("route")
        with fusion_route(route):
            return self.model(*args, **kwargs)


def onnx_export(model: nn.Module, args: Tuple = (), f=None, *, kwargs: Optional[dict] = None,
                dynamic_shapes="auto", fusion_probs: bool = False, adapter_mask: bool = False,
                adapter_names: Optional[Sequence[str]] = None, fusion_route: bool = False, **onnx_kwargs):
    """``torch.onnx.export(model, args, f, kwargs=kwargs, dynamo=True, ...)`` with the usual choices made.

    * ``dynamic_shapes="auto"``: dynamic batch and sequence axes (:func:`hf_dynamic_shapes`) for
      the tensor inputs, given either all positionally or all as keywords;
    * ``fusion_probs=True``: the graph also returns every site's fusion probabilities
      (:class:`WithFusionProbs`; outputs ``output``, ``fusion_probs.<layer>.<location>``);
    * ``adapter_mask=True``: the graph takes an ``adapter_mask`` input, bool (batch, N)
      (:class:`WithAdapterMask`); ``kwargs`` must hold an example mask.
    * ``fusion_route=True``: the graph takes a ``route`` input, int64 (batch,), each row's fusion id
      (:class:`WithFusionRoute`, models with several fusions); ``kwargs`` must hold an example route.

    With any of these options the keyword inputs become positional inputs of a wrapper, named after the
    keywords in the ONNX graph. Checks :func:`check_exportable` first. Other keywords go to
    :func:`torch.onnx.export`. Returns its :class:`torch.onnx.ONNXProgram`.
    """
    check_exportable(model)
    kwargs = dict(kwargs or {})
    args = tuple(args)
    if (fusion_probs or adapter_mask or fusion_route) and kwargs:
        if args:
            raise ValueError("onnx_export: with fusion_probs/adapter_mask/fusion_route, pass the inputs as keywords "
                             "only")
        names = list(kwargs)
        args, kwargs = tuple(kwargs[n] for n in names), {}
        onnx_kwargs.setdefault("input_names", names)
    else:
        names = None
    if adapter_mask:
        if names is None or "adapter_mask" not in names:
            raise ValueError("onnx_export(adapter_mask=True) needs an example kwargs['adapter_mask'] (bool, (batch, N))")
        model = WithAdapterMask(model, adapter_names, input_names=None if fusion_route else names)
    if fusion_route:  # outside the mask wrapper: it takes the positional inputs and hands on the keywords
        if names is None or "route" not in names:
            raise ValueError("onnx_export(fusion_route=True) needs an example kwargs['route'] (int64, (batch,))")
        model = WithFusionRoute(model, input_names=names)
    if fusion_probs:
        model = WithFusionProbs(model, input_names=names if not (adapter_mask or fusion_route) else None)
        onnx_kwargs.setdefault("output_names", ["output"] + model.prob_names)
    if isinstance(dynamic_shapes, str) and dynamic_shapes == "auto":
        if args and kwargs:
            raise ValueError("onnx_export: with dynamic_shapes='auto', pass the inputs either all positionally or "
                             "all as keywords (or give dynamic_shapes)")
        if kwargs:
            dynamic_shapes = _by_signature(model, hf_dynamic_shapes(kwargs))
        else:
            keyed = {(names[i] if names else f"arg{i}"): a for i, a in enumerate(args)}
            dims = hf_dynamic_shapes(keyed)
            dynamic_shapes = tuple(dims[k] for k in keyed)
            if names:  # the wrapper's forward(*inputs): one argument, a tuple
                dynamic_shapes = (dynamic_shapes,)
    onnx_kwargs.setdefault("dynamo", True)
    return torch.onnx.export(model, args, f, kwargs=kwargs or None, dynamic_shapes=dynamic_shapes, **onnx_kwargs)


def _by_signature(model: nn.Module, dims: Dict[str, Optional[dict]]) -> dict:
    """Keyword ``dims`` arranged as torch.export wants them for ``model.forward``: a named parameter
    by its name, the rest under the name of its ``**kwargs`` parameter."""
    import inspect

    params = inspect.signature(model.forward).parameters
    var_kw = next((n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    out: dict = {}
    for name, d in dims.items():
        if name in params and params[name].kind is not inspect.Parameter.VAR_KEYWORD:
            out[name] = d
        elif var_kw is not None:
            out.setdefault(var_kw, {})[name] = d
        else:
            raise ValueError(f"onnx_export: {type(model).__name__}.forward takes no argument {name!r}")
    return out


def custom_domain_ops(onnx_model) -> list:
    """``[(domain, op_type)]`` of every node outside the standard ONNX domains (``""``, ``ai.onnx``),
    in the graph, its subgraphs and its local functions. ``onnx_model``: a ModelProto or a path."""
    import onnx

    if not isinstance(onnx_model, onnx.ModelProto):
        onnx_model = onnx.load(onnx_model)
    found = []

    def walk(nodes):
        for node in nodes:
            if node.domain not in ("", "ai.onnx"):
                found.append((node.domain, node.op_type))
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g.node)
                for g in attr.graphs:
                    walk(g.node)

    walk(onnx_model.graph.node)
    for fn in onnx_model.functions:
        if fn.domain not in ("", "ai.onnx"):
            found.append((fn.domain, fn.name))
        walk(fn.node)
    return found
