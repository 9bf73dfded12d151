"""The functional API (as Liger's ``transformers/functional.py``): one fusion site from explicit
tensors, :func:`adapter_fusion`, and AdapterHub's fusion regularization loss.

``adapter_fusion`` wraps its tensors in a :class:`fusedadapter.site.FusionSite` (``_ExplicitSite``,
no cache) and hands it to the shared runner, :func:`fusedadapter.runner.run_site` (re-exported
here with its helpers, as is :func:`fusedadapter.fold.fold_plain`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .activations import activation_code
from .fold import AdapterWeights, FusionWeights, fold_plain  # noqa: F401  (fold_plain re-exported; its home is fold)
from .runner import (PLAIN_FORM_RATIO, _plain_form, adapter_mask_rows, check_site_inputs,  # noqa: F401  (re-exported)
                     draw_seed, run_folded, run_site, use_plain_form)
from .site import FusionSite

__all__ = ["adapter_fusion", "run_site", "check_site_inputs", "fusion_regularization_loss",
           "draw_seed", "adapter_mask_rows", "PLAIN_FORM_RATIO"]


def adapter_fusion(
    adapter_input: torch.Tensor,
    residual: torch.Tensor,
    query: Optional[torch.Tensor] = None,
    *,
    down_weights: Sequence[torch.Tensor],
    down_biases: Sequence[Optional[torch.Tensor]],
    up_weights: Sequence[torch.Tensor],
    up_biases: Sequence[Optional[torch.Tensor]],
    activations: Union[str, Sequence[str]] = "relu",
    scalings: Union[float, Sequence[object]] = 1.0,
    ln_weights: Optional[Sequence[Optional[torch.Tensor]]] = None,
    ln_biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
    query_weight: Optional[torch.Tensor] = None,
    query_bias: Optional[torch.Tensor] = None,
    key_weight: Optional[torch.Tensor] = None,
    key_bias: Optional[torch.Tensor] = None,
    value_weight: Optional[torch.Tensor] = None,
    residual_before: bool = False,
    temperature: float = 1.0,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    return_probs: bool = False,
    adapter_mask: Optional[torch.Tensor] = None,
):
    """One AdapterFusion site from explicit parameters (the functional form of FusedAdapterFusion).

    Adapter ``n``: ``up_n = scaling_n * (up_weights[n] @ act_n(down_weights[n] @ [LN_n](x) + b) + b)``.
    A fusion weight left ``None`` turns its flag off (identity), as AdapterHub's
    ``query``/``key``/``value`` flags do. ``dropout_p > 0`` applies logit dropout (training
    mode): with ``dropout_mask`` (bool, (..., N)) that draw is replayed. Returns ``out`` or
    ``(out, probs)``; ``out`` is ``o + residual`` (``o`` alone under ``residual_before``, which
    adds the residual to every adapter output first).

    ``adapter_mask`` (bool, ``(batch, N)`` for inputs ``(batch, ..., H)``, or ``(..., N)`` per token;
    True = the adapter takes part): masked adapters leave the row's softmax (probability 0, after
    any dropout). A row with every adapter masked returns ``residual`` alone (probs all 0).
    """
    n = len(down_weights)
    if not (len(down_biases) == len(up_weights) == len(up_biases) == n) or n == 0:
        raise ValueError(f"adapter_fusion: expected equally long, non-empty down/up weight and bias lists, got "
                         f"{len(down_weights)}, {len(down_biases)}, {len(up_weights)}, {len(up_biases)}")
    acts = [activations] * n if isinstance(activations, str) else list(activations)
    scal = [scalings] * n if not isinstance(scalings, (list, tuple)) else list(scalings)
    lnw = list(ln_weights) if ln_weights is not None else [None] * n
    lnb = list(ln_biases) if ln_biases is not None else [None] * n
    if not (len(acts) == len(scal) == len(lnw) == len(lnb) == n):
        raise ValueError(f"adapter_fusion: activations, scalings and LN lists must have {n} entries (one per adapter)")
    hidden = adapter_input.shape[-1] if isinstance(adapter_input, torch.Tensor) else up_weights[0].shape[0]
    if ln_weights is not None and ln_biases is None:
        raise ValueError("adapter_fusion: ln_weights given without ln_biases")
    codes = [activation_code(a) for a in acts]
    weights = [AdapterWeights(down_weights[i], down_biases[i], up_weights[i], up_biases[i], scal[i], lnw[i], lnb[i],
                              codes[i], lnw[i] is not None) for i in range(n)]
    for i, w in enumerate(weights):
        r = w.down_weight.shape[0]
        if w.down_weight.shape != (r, hidden) or w.up_weight.shape != (hidden, r):
            raise ValueError(f"adapter {i}: expected down weight ({r}, {hidden}) and up weight ({hidden}, {r}), got "
                             f"{tuple(w.down_weight.shape)} and {tuple(w.up_weight.shape)}")
    site = _ExplicitSite(weights, FusionWeights(query_weight, query_bias, key_weight, key_bias, value_weight),
                         residual_before)
    out, probs = run_site(site, adapter_input, residual, query, backend=backend, temperature=temperature,
                          dropout_p=dropout_p, keep_mask=dropout_mask, adapter_mask=adapter_mask)
    if return_probs:
        return out, probs.to(out.dtype)
    return out


class _ExplicitSite(FusionSite):
    """A :class:`~fusedadapter.site.FusionSite` over explicit tensors (no cache: folds every call)."""

    caches_folds = False

    def __init__(self, weights: Sequence[AdapterWeights], fusion: FusionWeights, residual_before: bool):
        self.weights, self.fusion, self.residual_before = list(weights), fusion, residual_before
        self.hidden_size = weights[0].up_weight.shape[0]
        self.bottleneck = sum(w.down_weight.shape[0] for w in weights)
        self.num_adapters = len(weights)
        self.anchor_param = weights[0].up_weight

    def _adapter_modules_or_weights(self):
        return self.weights

    def _fusion_weights(self):
        return self.fusion


class _IdentityDistance(torch.autograd.Function):
    """``0.01 * ||I - W||_F^2`` and its gradient ``0.02 * (W - I) * g``, bit for bit AdapterHub's
    ``0.01 * (target - W).pow(2).sum()`` (the same products and the same sum), in fewer passes over
    W: no identity matrix, one saved difference instead of autograd's sub / pow / neg chain (the
    eager chain cost ~4.5 ms per 768 x 768 value matrix per step forward + backward on one CPU
    thread; this ~2x less)."""

    @staticmethod
    def forward(ctx, w):
        d = w.detach().clone()
        d.diagonal().sub_(1)          # W - I (AdapterHub: I - W; squared alike, negation is exact)
        ctx.save_for_backward(d)
        return 0.01 * d.pow(2).sum()

    @staticmethod
    def backward(ctx, g):
        (d,) = ctx.saved_tensors
        return d * (0.02 * g)         # = 2 * (0.01 * g) * (W - I): AdapterHub's rounding


def fusion_regularization_loss(module_or_model: torch.nn.Module) -> torch.Tensor:
    """AdapterHub's ``get_fusion_regularization_loss``: ``0.01 * sum ||I - W_V||_F^2`` over every
    fusion value matrix that is trained (``requires_grad``), fused or AdapterHub's own."""
    total = None
    for mod in module_or_model.modules():
        value = getattr(mod, "value", None)
        is_fusion = type(mod).__name__ in ("FusedAdapterFusion", "BertFusion")
        if not is_fusion or not isinstance(value, torch.nn.Linear) or not value.weight.requires_grad:
            continue
        term = _IdentityDistance.apply(value.weight)
        total = term if total is None else total + term
    if total is None:
        p = next(module_or_model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return total
