"""The site runner: :func:`run_site` checks a call's inputs, resolves the backend and runs either the
site's eager reference or a backend op on its folded weights (the folded form, the per-token
training form, or the plain form for wide adapters).

A site is a :class:`fusedadapter.site.FusionSite` (the module, the functional form's explicit
tensors, an accelerated AdapterHub layer); this module reads it only through that base's methods.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .activations import apply_activation
from . import cpu_gemm as _cpu_gemm
from .cpu_gemm import onednn_train_linear, use_onednn_train
from .dispatch import resolve_backend
from .kernel_ops import TRAINING_PATHS
from .fold import PLAIN_FORM_RATIO, AdapterWeights, Folded, FusionWeights, call_form
from .ops import acc_dtype, fusion_torch, fusion_torch_packed, hash_keep_mask, masked_softmax
from .zero_grads import keep_unused_shift, site_key_bias

__all__ = ["run_site", "run_folded", "check_site_inputs", "draw_seed", "adapter_mask_rows", "use_plain_form",
           "PLAIN_FORM_RATIO", "DeferredCall", "deferring"]


class DeferredCall(Exception):
    """Raised by :func:`run_folded` inside a :func:`deferring` block instead of calling its op: ``args``
    are the op's 16 arguments (autograd-connected) and ``finish(out, probs)`` does what run_folded does
    with the op's outputs (the per-token form's W_V and residual; the cast to the input dtype) and
    returns what it would return. The caller runs the call (several sites' calls as one grouped op:
    :mod:`fusedadapter.multitask_rows`)."""

    def __init__(self, args: tuple, finish):
        super().__init__("a deferred fusion op call")
        self.args = args
        self.finish = finish


def _op_call(op, args: tuple, finish):
    """``finish(*op(*args))``, or :class:`DeferredCall` inside a :func:`deferring` block for ``op``."""
    deferred_op = getattr(_deferred, "op", None)
    if deferred_op is not None and deferred_op is op:
        raise DeferredCall(args, finish)
    return finish(*_call_op(op, *args))


_deferred = threading.local()


@contextlib.contextmanager
def deferring(op):
    """In this thread, every :func:`run_folded` call of ``op`` raises :class:`DeferredCall`
    (the folded and per-token forms; the plain form calls no op)."""
    prev = getattr(_deferred, "op", None)
    _deferred.op = op
    try:
        yield
    finally:
        _deferred.op = prev


def check_site_inputs(hidden_size: int, adapter_input, residual, query, param: Optional[torch.Tensor],
                      autocast_on: bool):
    a, r = adapter_input, residual
    if query is None and isinstance(a, torch.Tensor) and isinstance(r, torch.Tensor):
        # The common valid call (no separate query) in a few attribute reads (issue 12: host overhead
        # of a one-token call); anything else, valid or not, takes the detailed checks below.
        shape = a.shape
        if shape and shape[-1] == hidden_size and r.shape == shape and a.is_floating_point():
            dt, dev = a.dtype, a.device
            if r.device == dev and (r.dtype == dt or (autocast_on and r.is_floating_point())) and (
                    param is None or (param.device == dev and (autocast_on or param.dtype == dt))):
                return
    named = {"adapter_input": adapter_input, "residual": residual}
    if query is not None:
        named["query"] = query
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() < 1 or t.shape[-1] != hidden_size:
            raise ValueError(f"{name} must have shape (..., {hidden_size}) (the fusion's hidden size), got {tuple(t.shape)}")
        if t.shape != adapter_input.shape:
            raise ValueError(f"{name} must have the shape of adapter_input {tuple(adapter_input.shape)}, got {tuple(t.shape)}")
        if t.device != adapter_input.device:
            raise ValueError(f"{name} is on {t.device}, expected {adapter_input.device} (the device of adapter_input)")
        if not autocast_on and t.dtype != adapter_input.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, expected {adapter_input.dtype} (the dtype of adapter_input)")
    if param is not None:
        if param.device != adapter_input.device:
            raise ValueError(f"inputs are on {adapter_input.device} but the fusion parameters are on {param.device}; "
                             f"move the module with .to({adapter_input.device!s}) or the inputs to {param.device}")
        if not autocast_on and param.dtype != adapter_input.dtype:
            raise TypeError(f"inputs have dtype {adapter_input.dtype} but the fusion parameters have dtype {param.dtype}; "
                            f"expected inputs of dtype {param.dtype} (or run under torch.autocast)")


def adapter_mask_rows(adapter_mask, lead, num_adapters: int, device) -> torch.Tensor:
    """The (tokens, N) form of a per-sample adapter mask for inputs of leading shape ``lead``.

    Broadcast rule: a mask of shape ``(*lead, N)`` is per token; a ``(batch, N)`` mask (``batch =
    lead[0]``) applies to every token of its batch element (inputs ``(batch, ..., H)``)."""
    lead = tuple(lead)
    per_token = (*lead, num_adapters)
    per_batch = (lead[0], num_adapters) if len(lead) >= 2 else None
    want = f"{per_token} (..., N: per token)" + (f" or {per_batch} (batch, N)" if per_batch else "")
    if not isinstance(adapter_mask, torch.Tensor):
        raise TypeError(f"adapter_mask must be a bool tensor of shape {want}, got {type(adapter_mask).__name__}")
    if adapter_mask.dtype != torch.bool:
        raise TypeError(f"adapter_mask must be a bool tensor (True = the adapter takes part) of shape {want}, got "
                        f"dtype {adapter_mask.dtype} (use mask.bool())")
    shape = tuple(adapter_mask.shape)
    if shape == per_token:
        rows = adapter_mask
    elif shape == per_batch:
        rows = adapter_mask.reshape(lead[0], *([1] * (len(lead) - 1)), num_adapters).expand(per_token)
    else:
        why = ""
        if len(lead) >= 2 and len(shape) in (2, len(lead) + 1) and shape[-1] == num_adapters and shape[0] != lead[0] \
                and shape[1:-1] == (() if len(shape) == 2 else lead[1:]):
            why = (f" (batch {shape[0]} against {lead[0]} rows; an explicit adapter_mask= must match the batch: "
                   f"only the mask of a fusedadapter.adapter_mask block follows generate()'s beam / "
                   f"num_return_sequences expansion)")
        raise ValueError(f"adapter_mask must have shape {want} for inputs of leading shape {lead} and "
                         f"{num_adapters} adapters, got {shape}{why}")
    if adapter_mask.device != device:
        raise ValueError(f"adapter_mask is on {adapter_mask.device}, expected {device} (the device of adapter_input)")
    return rows.reshape(-1, num_adapters)


def draw_seed() -> int:
    """A dropout seed from torch's default CPU generator (so torch.manual_seed makes runs repeatable)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _down_input(a: torch.Tensor, ln_mode: str) -> torch.Tensor:
    if ln_mode == "none":
        return a
    a_hat = F.layer_norm(a, (a.shape[-1],), eps=1e-5)  # nn.LayerNorm's default eps, affine folded
    return a_hat if ln_mode == "all" else torch.cat([a, a_hat], dim=-1)


def _logit_shift(folded: Folded, fusion: FusionWeights, c, res, residual_before: bool):
    """AdapterHub's per-row key-bias term (kappa); it matters only under logit dropout."""
    shift = None
    if folded.shift_weight is not None:
        shift = c @ folded.shift_weight + folded.shift_bias
    if residual_before:
        q = F.linear(c, fusion.query_weight, fusion.query_bias) if fusion.query_weight is not None else c
        kr = F.linear(res, fusion.key_weight) if fusion.key_weight is not None else res
        extra = (q * kr).sum(-1)
        shift = extra if shift is None else shift + extra
    return shift


def _value_after_sum(mix, value_weight, res, residual_before: bool, adapter_mask):
    """The end of the forms that apply W_V after the weighted sum (plain, per-token): ``W_V mix`` plus the
    residual, or under ``residual_before`` (already inside ``mix``) the bare sub-layer on a row with
    every adapter masked (see run_folded)."""
    out = F.linear(mix, value_weight) if value_weight is not None else mix
    if not residual_before:
        return out + res
    if adapter_mask is not None:
        return torch.where(adapter_mask.any(dim=-1, keepdim=True), out, res)
    return out


def _plain_form(folded_fusion: dict, adapters: Sequence[AdapterWeights], a, res, c, *, temperature, dropout_p,
                keep_mask, residual_before, fusion: FusionWeights, adapter_mask=None):
    """Wide adapters (R > PLAIN_FORM_RATIO·H): adapters' own up projections, W_K^T W_Q folded.
    Computed in the accumulation dtype (weights arrive in it), like the op."""
    out_dtype, acc = a.dtype, acc_dtype(a.dtype)
    a, res, c = a.to(acc), res.to(acc), c.to(acc)
    ups = []
    for w in adapters:
        x = a
        if w.ln_before:
            x = F.layer_norm(a, (a.shape[-1],), w.ln_weight, w.ln_bias, eps=1e-5)
        z = F.linear(x, w.down_weight, w.down_bias)
        u = F.linear(apply_activation(z, w.activation), w.up_weight, w.up_bias)
        s = w.scaling
        ups.append(u * (s.to(u.dtype) if isinstance(s, torch.Tensor) else s))
    u = torch.stack(ups, dim=1)  # (M, N, H)
    if residual_before:
        u = u + res.unsqueeze(1)
    # W_K^T (W_Q c + b_Q); the identity when both flags are off
    qk = c if folded_fusion["w_qk"] is None else F.linear(c, folded_fusion["w_qk"], folded_fusion["b_qk"])
    logits = torch.bmm(u, qk.unsqueeze(-1)).squeeze(-1)
    if dropout_p > 0:
        shift = (c @ folded_fusion["shift_weight"] + folded_fusion["shift_bias"]) if folded_fusion["shift_weight"] is not None else None
        if shift is not None:
            logits = logits + shift[:, None]
        logits = torch.where(keep_mask, logits / (1.0 - dropout_p), torch.zeros((), dtype=acc, device=a.device))
    if adapter_mask is None:
        probs = torch.softmax(logits / temperature, dim=-1)
    else:
        probs = masked_softmax(logits / temperature, adapter_mask)
    mix = torch.bmm(probs.unsqueeze(1), u).squeeze(1)
    return _value_after_sum(mix, fusion.value_weight, res, residual_before, adapter_mask).to(out_dtype), probs


def run_folded(op, folded: Folded, a, res, c, *, fusion: FusionWeights, residual_before: bool, temperature: float,
               dropout_p: float, seed: int, keep_mask, adapter_mask=None):
    """Run a backend op on folded weights. a, res, c: (M, H) in the compute dtype; adapter_mask (M, N) or None."""
    if folded.query_pre is not None:
        return _run_per_token(op, folded, a, res, c, residual_before=residual_before, temperature=temperature,
                              dropout_p=dropout_p, seed=seed, keep_mask=keep_mask, adapter_mask=adapter_mask)
    out_dtype = a.dtype
    if folded.ln_mode != "none" and a.dtype in (torch.float16, torch.bfloat16):
        # ln_before adapters: the LayerNorm runs here, outside the op. Its output rounded to half,
        # and its backward in half, put bf16 input gradients at 2x the oracle's bound (fuzz: with
        # ReLU gates flipping); the op then runs on fp32 activations. The output stays half.
        a, res, c = a.float(), res.float(), (a.float() if c is a else c.float())
    xd = _down_input(a, folded.ln_mode)
    xq = None if (c is a and folded.ln_mode == "none") else c
    wd = folded.w_out.dtype
    if residual_before:
        op_res = F.linear(res.to(wd), fusion.value_weight).to(a.dtype) if fusion.value_weight is not None else res
        if adapter_mask is not None and fusion.value_weight is not None:
            # The op returns o + op_res with o = 0 on a row with every adapter masked; such a row is
            # the bare sub-layer's output (the reference's rule), residual rather than W_V residual.
            op_res = torch.where(adapter_mask.any(dim=-1, keepdim=True), op_res, res)
    else:
        op_res = res
    shift = _logit_shift(folded, fusion, c.to(wd), res.to(wd), residual_before) if dropout_p > 0 else None
    w_query, b_query = folded.w_query, folded.b_query
    if isinstance(temperature, torch.Tensor):
        # A 0-dim tensor (FusedAdapterFusion's stepped temperature; under torch.compile a graph
        # value, not a constant): the op's float temperature cannot take it without a host sync, so
        # divide what the logits are linear in (GEMM1's logit weights and the dropout shift) and run
        # the op at temperature 1: softmax(where(keep, (l + kappa)/(1-p), 0) / T) is unchanged.
        w_query = w_query / temperature
        b_query = None if b_query is None else b_query / temperature
        shift = None if shift is None else shift / temperature
        temperature = 1.0
    if op is fusion_torch and xq is None and folded.gemm1_weight is not None and w_query is folded.w_query:
        # A cached eval fold (fold.pack_gemm1) on the torch backend: GEMM1 as one GEMM, the op's
        # argument checks skipped (inputs checked by run_site, weights from the site's own fold).
        out, probs = fusion_torch_packed(xd, op_res, folded.gemm1_weight, folded.gemm1_bias, folded.w_out,
                                         folded.segments, folded.activations, float(temperature), float(dropout_p),
                                         int(seed), keep_mask, shift, adapter_mask)
    else:
        args = (xd, xq, op_res, folded.w_down, folded.b_down, w_query, b_query, folded.w_out, folded.segments,
                folded.activations, float(temperature), float(dropout_p), int(seed), keep_mask, shift, adapter_mask)
        return _op_call(op, args, lambda out, probs: ((out if out.dtype == out_dtype else out.to(out_dtype)), probs))
    return (out if out.dtype == out_dtype else out.to(out_dtype)), probs


def _run_per_token(op, folded: Folded, a, res, c, *, residual_before: bool, temperature, dropout_p: float,
                   seed: int, keep_mask, adapter_mask=None):
    """The per-token training form (:func:`fusedadapter.fold.fold_fusion_train`): the op on the frozen
    rows, ``xq = W_K^T (W_Q c + b_Q)`` before it and ``W_V`` after the weighted sum, all in the
    weight dtype (fp32 activations for half inputs: these products hold trained weights)."""
    fw = folded.query_pre
    out_dtype = a.dtype
    wd = folded.w_out.dtype
    if a.dtype != wd:
        a, res, c = a.to(wd), res.to(wd), (a.to(wd) if c is a else c.to(wd))
    xd = _down_input(a, folded.ln_mode)
    wq, wk, wv = fw.query_weight, fw.key_weight, fw.value_weight
    # W_Q, W_K, W_V (M x H x H): backward products on oneDNN from PER_TOKEN_ONEDNN_MIN_ROWS rows (cpu_gemm)
    anyw = wq if wq is not None else (wk if wk is not None else wv)
    dnnl = anyw is not None and use_onednn_train(c, anyw, _cpu_gemm.PER_TOKEN_ONEDNN_MIN_ROWS)
    q = c if wq is None else (onednn_train_linear(c, wq, fw.query_bias) if dnnl else F.linear(c, wq, fw.query_bias))
    xq = q if wk is None else (onednn_train_linear(q, wk, None, True) if dnnl else q @ wk)  # W_K^T q, row form
    shift = None
    if dropout_p > 0:
        if fw.key_bias is not None:
            shift = q @ fw.key_bias                                     # kappa = q . b_K
        if residual_before:
            kr = F.linear(res, fw.key_weight) if fw.key_weight is not None else res
            extra = (q * kr).sum(-1)
            shift = extra if shift is None else shift + extra
    elif fw.key_bias is not None and fw.key_bias.requires_grad:
        try:  # b_K cancels in the softmax: its exact gradient is 0 (zero_grads.py, issue 13 item 7)
            from .zero_grads import attach_zero_grads
        except ImportError:  # pragma: no cover
            attach_zero_grads = None
        if attach_zero_grads is not None:
            xq = attach_zero_grads(xq, fw.key_bias)
    w_query = folded.w_query
    if isinstance(temperature, torch.Tensor):  # see run_folded
        xq = xq / temperature
        shift = None if shift is None else shift / temperature
        temperature = 1.0
    # op: sum_n p_n u_n (+ res under residual_before, so that W_V applies to it too)
    op_res = res if residual_before else None
    args = (xd, xq, op_res, folded.w_down, folded.b_down, w_query, None, folded.w_out, folded.segments,
            folded.activations, float(temperature), float(dropout_p), int(seed), keep_mask, shift, adapter_mask)

    def finish(mix, probs):
        value = wv
        if dnnl and value is not None:
            mix, value = onednn_train_linear(mix, value), None
        return _value_after_sum(mix, value, res, residual_before, adapter_mask).to(out_dtype), probs
    return _op_call(op, args, finish)


def _trains(site) -> bool:
    """A training call: autograd on and some fusion or adapter weight requires grad (the folds run under autograd)."""
    if not torch.is_grad_enabled() or torch.compiler.is_exporting():
        return False
    f = site.fusion_weights()
    if any(t is not None and t.requires_grad for t in (f.query_weight, f.query_bias, f.key_weight, f.key_bias,
                                                       f.value_weight)):
        return True
    return any(isinstance(t, torch.Tensor) and t.requires_grad for w in site.adapter_weights()
               for t in (w.down_weight, w.up_weight))


# One C call that is False outside every autocast region (the per-device query costs more, per call).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _call_op(op, *args):
    """``op(*args)``; a kernel backend's registered op (an OpOverload, whose autograd formula is Python:
    ``torch.library.register_autograd``) is called below the Autograd key when grad mode is off, which is
    where that formula's no-grad branch sends it anyway, without the detour through Python (~30 us a
    one-token call on a 2-core CPU). Not while compiling or exporting (dynamo and export see the op).
    A training call of an op with a training path (kernel_ops.TRAINING_PATHS: the cpu backend's, which
    keeps GEMM1's output for the backward) runs that path, compiled too (a custom op with its fake and
    autograd formula); not while exporting (export lowers every backend to the torch form)."""
    if not torch.is_grad_enabled():
        if isinstance(op, _OP_TYPES) and not torch.compiler.is_compiling():
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)
        return op(*args)
    train = TRAINING_PATHS.get(op) if isinstance(op, _OP_TYPES) else None
    if (train is not None and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
            and not torch.compiler.is_exporting()):
        return train(*args)
    return op(*args)


_OP_TYPES = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)


def use_plain_form(hidden_size: int, bottleneck: int) -> bool:
    return bottleneck > PLAIN_FORM_RATIO * hidden_size


def run_site(site, adapter_input, residual, query, *, backend: str, temperature: float, dropout_p: float,
             keep_mask, adapter_mask=None):
    """Shared body of every site (module, functional form, AdapterHub); returns (out, probs) in the input's shape.

    ``site``: a :class:`fusedadapter.site.FusionSite` (``hidden_size``, ``bottleneck``,
    ``num_adapters``, ``residual_before``, ``anchor_param`` (a parameter, for the dtype/device
    check), and ``adapter_weights(dtype)``, ``fusion_weights(dtype)``, ``folded(dtype)``,
    ``plain_folded(dtype)``, ``reference(a, res, c, temperature, dropout_p, keep_mask, adapter_mask=None)``
    (``adapter_mask``: (tokens, N) or None)). ``adapter_mask``: bool, see :func:`adapter_mask_rows`
    for its shapes.
    """
    dev = adapter_input.device.type if isinstance(adapter_input, torch.Tensor) else "cpu"
    autocast_on = _any_autocast() and dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev)
    check_site_inputs(site.hidden_size, adapter_input, residual, query, site.anchor_param, autocast_on)
    dtype = torch.get_autocast_dtype(dev) if autocast_on else adapter_input.dtype
    hidden = site.hidden_size
    lead = adapter_input.shape[:-1]
    a = adapter_input.reshape(-1, hidden)
    res = residual.reshape(-1, hidden)
    c = a if query is None else query.reshape(-1, hidden)
    n_tokens = a.shape[0]
    if keep_mask is not None:
        if keep_mask.dtype != torch.bool or keep_mask.shape != (*lead, site.num_adapters):
            raise ValueError(f"dropout_mask must be a bool tensor of shape {(*lead, site.num_adapters)}, got "
                             f"{keep_mask.dtype} {tuple(keep_mask.shape)}")
        keep_mask = keep_mask.reshape(n_tokens, site.num_adapters)
    if adapter_mask is not None:
        adapter_mask = adapter_mask_rows(adapter_mask, lead, site.num_adapters, a.device)
    if torch.compiler.is_exporting():  # training-mode dropout cannot export (fusedadapter.export)
        from .export_hooks import check_site_exportable

        check_site_exportable(site, dropout_p=dropout_p, temperature=temperature)
    trains = []  # _trains(site), asked at most once a call (by auto's table and by call_form), only if needed

    def training() -> bool:
        if not trains:
            trains.append(_trains(site))
        return trains[0]

    name, op = resolve_backend(backend, a.device, dtype, n_tokens, training=training)
    if name == "reference":
        out, probs = site.reference(a, res, c, temperature, dropout_p, keep_mask, adapter_mask=adapter_mask)
    else:
        if autocast_on:
            a, res = a.to(dtype), res.to(dtype)
            c = a if query is None else c.to(dtype)
        seed = 0
        if dropout_p > 0 and keep_mask is None:
            if torch.compiler.is_compiling():
                # In a compiled graph, draw the mask in-graph (a host seed would need .item()).
                keep_mask = torch.rand(n_tokens, site.num_adapters, device=a.device) >= dropout_p
            else:
                seed = draw_seed()
        with torch.autocast(dev, enabled=False) if autocast_on else contextlib.nullcontext():
            wdtype = acc_dtype(dtype)  # folded weights: fp32 for half activations (see ops.FUSION_SCHEMA)
            if call_form(name, hidden, site.bottleneck, training, n_tokens) == "plain":
                if dropout_p > 0 and keep_mask is None:
                    keep_mask = hash_keep_mask(seed, n_tokens, site.num_adapters, dropout_p, device=a.device)
                plain = keep_unused_shift(site.plain_folded(wdtype), dropout_p > 0, site_key_bias(site))  # b_K: zero grad
                out, probs = _plain_form(plain, site.adapter_weights(wdtype), a, res, c,
                                         temperature=temperature, dropout_p=dropout_p, keep_mask=keep_mask,
                                         residual_before=site.residual_before, fusion=site.fusion_weights(wdtype),
                                         adapter_mask=adapter_mask)
            else:
                # The raw fusion weights are needed only for residual_before and dropout's logit shift;
                # casting them (3 H x H matrices) on every eval call cost ~0.13 ms at H = 768.
                need_raw = site.residual_before or dropout_p > 0
                folded = site.folded(wdtype, n_tokens=n_tokens)
                if torch.is_grad_enabled():  # without autograd keep_unused_shift is a no-op: skip finding b_K
                    folded = keep_unused_shift(folded, dropout_p > 0, site_key_bias(site))
                out, probs = run_folded(op, folded, a, res, c,
                                        fusion=site.fusion_weights(wdtype) if need_raw else None,
                                        residual_before=site.residual_before, temperature=temperature,
                                        dropout_p=dropout_p, seed=seed, keep_mask=keep_mask,
                                        adapter_mask=adapter_mask)
    return out.reshape(adapter_input.shape), probs.reshape(*lead, probs.shape[-1])
