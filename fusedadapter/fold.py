"""Folding adapter and fusion weights into the op's weights (DESIGN.md §2), in float64.

Per adapter n, with ``U_n = diag(s_n) W_U,n`` (H x r_n) and ``c_n = s_n * b_U,n`` (H)::

    w_query = [U_1^T; ...; U_N^T; c_1^T; ...; c_N^T] @ W_K^T @ W_Q     # (R+N, H): G_n rows, then e_n rows
    b_query = [U^T; C] @ W_K^T @ b_Q                                  # (R+N,):  g_n, then e0_n
    w_out   = W_V @ [U_1 ... U_N | c_1 ... c_N]                       # (H, R+N): V_n, then v_n
    w_down  = W_D,n diag(gamma_n), b_down = W_D,n beta_n + b_D,n      # ln_before folds the LN affine
    shift   = c . (W_Q^T b_K) + b_Q . b_K                             # kappa, only needed under dropout

Flags that are off are identities. Folding is O(H^2 R) once per parameter change (eval: cached
by the module) and differentiable, so training runs it under autograd every step.
Folding in float32 came close to the 2x error budget of DESIGN §4; float64 then a cast does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

__all__ = ["AdapterWeights", "FusionWeights", "Folded", "fold"]

_F64 = torch.float64


@dataclass
class AdapterWeights:
    down_weight: torch.Tensor            # (r, H)
    down_bias: Optional[torch.Tensor]    # (r,)
    up_weight: torch.Tensor              # (H, r)
    up_bias: Optional[torch.Tensor]      # (H,)
    scaling: object = 1.0                # float, or a tensor of shape (1,) or (H,)
    ln_weight: Optional[torch.Tensor] = None  # (H,) when ln_before
    ln_bias: Optional[torch.Tensor] = None
    activation: int = 1                  # op activation code
    ln_before: bool = False


@dataclass
class FusionWeights:
    query_weight: Optional[torch.Tensor] = None  # None: the flag is off (identity)
    query_bias: Optional[torch.Tensor] = None
    key_weight: Optional[torch.Tensor] = None
    key_bias: Optional[torch.Tensor] = None
    value_weight: Optional[torch.Tensor] = None


@dataclass
class Folded:
    w_down: torch.Tensor
    b_down: torch.Tensor
    w_query: torch.Tensor
    b_query: Optional[torch.Tensor]
    w_out: torch.Tensor
    segments: List[int]
    activations: List[int]
    ln_mode: str                           # "none" | "all" | "mixed": what xd is built from
    shift_weight: Optional[torch.Tensor]   # (H,) kappa = xq . shift_weight + shift_bias; None if b_K absent
    shift_bias: Optional[torch.Tensor]     # () tensor

    @property
    def bottleneck(self) -> int:
        return self.segments[-1]


def _f64(t):
    return None if t is None else t.to(_F64)


def key_bias_shift(wq, bq, bk):
    """kappa = q . b_K = x . (W_Q^T b_K) + b_Q . b_K as (weight, bias), float64 in; (None, None) without b_K."""
    if bk is None:
        return None, None
    weight = bk @ wq if wq is not None else bk
    bias = (bq @ bk) if bq is not None else torch.zeros((), dtype=_F64, device=bk.device)
    return weight, bias


def fold(adapters: Sequence[AdapterWeights], fusion: FusionWeights, dtype: torch.dtype) -> Folded:
    """Fold in float64 and cast to ``dtype`` (differentiable)."""
    if len(adapters) == 0:
        raise ValueError("fold: at least one adapter is required")
    hidden = adapters[0].up_weight.shape[0]
    uts, cs, downs, dbiases, segments, acts = [], [], [], [], [0], []
    ln_flags = [bool(a.ln_before) for a in adapters]
    ln_mode = "all" if all(ln_flags) else ("mixed" if any(ln_flags) else "none")
    for a in adapters:
        up = _f64(a.up_weight)
        r = up.shape[1]
        s = a.scaling
        if isinstance(s, torch.Tensor):
            s = s.to(_F64).reshape(-1)
            u = up * s[:, None]
        else:
            u = up * float(s)
        ub = _f64(a.up_bias) if a.up_bias is not None else torch.zeros(hidden, dtype=_F64, device=up.device)
        c = ub * (s if isinstance(s, torch.Tensor) else float(s))
        uts.append(u.t())
        cs.append(c[None, :])
        wd = _f64(a.down_weight)
        bd = _f64(a.down_bias) if a.down_bias is not None else torch.zeros(r, dtype=_F64, device=wd.device)
        if a.ln_before:
            bd = bd + wd @ _f64(a.ln_bias)
            wd = wd * _f64(a.ln_weight)[None, :]
        if ln_mode == "mixed":
            zeros = torch.zeros_like(wd)
            wd = torch.cat([zeros, wd] if a.ln_before else [wd, zeros], dim=1)
        downs.append(wd)
        dbiases.append(bd)
        segments.append(segments[-1] + r)
        acts.append(int(a.activation))

    rows = torch.cat(uts + cs, dim=0)                       # (R+N, H): [U^T; C]
    wk, bk = _f64(fusion.key_weight), _f64(fusion.key_bias)
    wq, bq = _f64(fusion.query_weight), _f64(fusion.query_bias)
    wv = _f64(fusion.value_weight)
    # q . (W_K u) = (u^T W_K^T) q: in row form, rows @ W_K^T (torch stores W_K as (out, in)).
    rows_k = rows @ wk.t() if wk is not None else rows
    if wq is not None:
        w_query = rows_k @ wq
        b_query = rows_k @ bq if bq is not None else None
    else:
        w_query, b_query = rows_k, None
    w_out = (wv @ rows.t()) if wv is not None else rows.t()   # (H, R+N): W_V [U | C^T]

    # kappa = q . b_K = x . (W_Q^T b_K) + b_Q . b_K (x the query input)
    shift_weight, shift_bias = key_bias_shift(wq, bq, bk)

    def cast(t):
        return None if t is None else t.to(dtype)

    return Folded(
        w_down=cast(torch.cat(downs, dim=0)),
        b_down=cast(torch.cat(dbiases, dim=0)),
        w_query=cast(w_query),
        b_query=cast(b_query),
        w_out=cast(w_out),
        segments=segments,
        activations=acts,
        ln_mode=ln_mode,
        shift_weight=cast(shift_weight),
        shift_bias=cast(shift_bias),
    )
