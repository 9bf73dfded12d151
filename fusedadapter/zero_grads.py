"""Exact zero gradients for the fusion key bias when the op leaves it out (no logit dropout).

The key bias ``b_K`` adds ``kappa = q . b_K`` to every adapter's logit of a row, so it cancels in
the softmax: its exact gradient is 0, and it enters the computation only through dropout's logit
shift (``fold.key_bias_shift``). Without dropout the op does not use the shift, so autograd would
leave ``b_K.grad`` at ``None``; ``DistributedDataParallel`` with its default
``find_unused_parameters=False`` then fails on the next step, and an optimizer skips the
parameter (AdamW's weight decay included), unlike AdapterHub, which gives every trainable
parameter a gradient. :func:`keep_unused_shift` attaches ``b_K`` (the site's own tensor, from
:func:`site_key_bias`) to a folded weight that the op does use, through :class:`_ZeroGrads`: a
view forward, a backward that passes the weight's gradient through and returns zeros for
``b_K``. Cost: one view per training call and one H-sized zero tensor in the backward (giving
the zeros to the folded shift instead would run the shift's float64 backward, ~2 ms at H = 768).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = ["attach_zero_grads", "keep_unused_shift", "site_key_bias"]


class _ZeroGrads(torch.autograd.Function):
    """``x`` unchanged (a view); backward: ``x``'s gradient through, zeros for ``tensors``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, *tensors):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:])

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros_like(t) for t in ctx.saved_tensors))


def attach_zero_grads(x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """``x`` with ``tensors`` in its autograd graph at gradient zero (``x`` itself when no grad is needed)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return x
    return _ZeroGrads.apply(x, *tensors)


_CARRIERS = {"folded": ("w_query", "w_out", "w_down", "b_down", "b_query"), "plain": ("w_qk", "b_qk")}


def site_key_bias(site) -> Optional[torch.Tensor]:
    """The fusion key bias of a :func:`fusedadapter.functional.run_site` site, or None: the ``key``
    linear's bias (FusedAdapterFusion, accelerated AdapterHub sites), else ``site.fusion.key_bias``
    (the functional form's FusionWeights)."""
    key = getattr(site, "key", None)
    if key is not None:
        return getattr(key, "bias", None)
    return getattr(getattr(site, "fusion", None), "key_bias", None)


def keep_unused_shift(folded, used: bool, key_bias: Optional[torch.Tensor] = None):
    """``folded`` (a :class:`fusedadapter.fold.Folded` or ``fold_plain``'s dict) with the key bias
    attached at gradient zero to a weight the op uses, when the fold made a key-bias shift that the
    op does not ``use`` (no logit dropout).

    ``key_bias``: the site's key bias (zeros go straight to it); without it, the zeros go to the
    folded shift tensors (and reach ``b_K`` through the fold's backward). The carrier is the first
    candidate weight that already requires grad (so the op computes no gradient it would not
    compute anyway). A no-op without a shift (no key bias, or a form that handles it itself),
    without autograd, or when the shift is used."""
    is_dict = isinstance(folded, dict)
    get = folded.get if is_dict else (lambda name: getattr(folded, name))
    shift = [t for t in (get("shift_weight"), get("shift_bias")) if t is not None and t.requires_grad]
    if used or not shift or not torch.is_grad_enabled():
        return folded
    if key_bias is not None:
        if not key_bias.requires_grad:
            return folded  # the shift needs grad only through W_Q / b_Q, which get theirs elsewhere
        shift = [key_bias]
    names = [n for n in _CARRIERS["plain" if is_dict else "folded"] if get(n) is not None]
    if not names:
        return folded
    carrier = next((n for n in names if get(n).requires_grad), names[0])
    attached = attach_zero_grads(get(carrier), *shift)
    if is_dict:
        return {**folded, carrier: attached}
    return dataclasses.replace(folded, **{carrier: attached})
