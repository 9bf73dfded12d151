"""The training fold's autograd pieces (docs/algorithm.md §2; issue 11): the products with the trained
fusion weights in float64 where measured to need it, with hand-written backwards that keep float64
copies out of what autograd saves, and the key-bias shift. :mod:`fusedadapter.fold` picks the form
and precisions (its ``TRAIN_FOLD_*`` constants) and calls these."""

from __future__ import annotations

import torch

from .cpu_gemm import HAS_ONEDNN, onednn_mm

__all__ = ["key_bias_shift", "key_bias_shift_f64", "backward_mm"]

_F64 = torch.float64


def _f64(t):
    return None if t is None else t.to(_F64)


def key_bias_shift(wq, bq, bk):
    """kappa = q . b_K = x . (W_Q^T b_K) + b_Q . b_K as (weight, bias), in bk's dtype; (None, None) without b_K."""
    if bk is None:
        return None, None
    weight = bk @ wq if wq is not None else bk
    bias = (bq @ bk) if bq is not None else torch.zeros((), dtype=bk.dtype, device=bk.device)
    return weight, bias


class _KeyBiasShift64(torch.autograd.Function):
    """kappa's (weight, bias) = (W_Q^T b_K, b_Q . b_K) in float64, cast to the weights' dtype.

    A matrix-vector product (O(H^2)): float64 costs nothing here, and the key-bias gradient under
    dropout is a cancelling sum that fp32 products put over the oracle (train_fold_precision). The
    float64 copies are recomputed in backward, never saved: autograd keeps only the parameters."""

    @staticmethod
    def forward(ctx, wq, bq, bk, dtype):
        ctx.save_for_backward(wq, bq, bk)
        w, b = key_bias_shift(_f64(wq), _f64(bq), bk.to(_F64))
        return w.to(dtype), b.to(dtype)

    @staticmethod
    def backward(ctx, gw, gb):
        wq, bq, bk = ctx.saved_tensors
        gw64, gb64, bk64 = gw.to(_F64), gb.to(_F64), bk.to(_F64)
        d_bk = (_f64(wq) @ gw64 if wq is not None else gw64) + (_f64(bq) * gb64 if bq is not None else 0.0)
        # One product per element: in float64 then rounded, or rounded once in the common dtype of
        # float32 / bfloat16 inputs (their exact product fits a float32 significand), the same bits.
        same = (gw.dtype == gb.dtype == bk.dtype and gw.dtype in (torch.float32, torch.bfloat16)
                and (wq is None or wq.dtype == gw.dtype) and (bq is None or bq.dtype == gw.dtype))
        d_wq = d_bq = None
        if wq is not None and ctx.needs_input_grad[0]:
            d_wq = torch.outer(bk, gw) if same else torch.outer(bk64, gw64).to(wq.dtype)
        if bq is not None and ctx.needs_input_grad[1]:
            d_bq = bk * gb if same else (bk64 * gb64).to(bq.dtype)
        return d_wq, d_bq, d_bk.to(bk.dtype), None


class _FoldFusion64(torch.autograd.Function):
    """The trained products of the fold, float64 where measured to need it, cast to ``dtype``:
    ``w_query = (rows @ W_K^T) @ W_Q``, ``b_query = (rows @ W_K^T) @ b_Q``, ``w_out = W_V @ rows^T``.

    ``rows64``/``rows`` are the cached adapter half in float64 and in the weight dtype. The product
    with ``W_Q`` runs in float64; ``rows @ W_K^T`` at ``key_precision`` and ``W_V @ rows^T`` at
    ``out_precision`` (TRAIN_FOLD_KEY_PRECISION / TRAIN_FOLD_OUT_PRECISION). Autograd saves only
    the cached rows at the backward's precision (``rows`` when that is its dtype, so no float64
    copy is kept) and the parameters: ``rows @ W_K^T`` and the float64 copies of the parameters
    are recomputed in backward. The backward's products run at ``backward_precision``
    (TRAIN_FOLD_BACKWARD_PRECISION), by ``backward_gemm`` (TRAIN_FOLD_BACKWARD_GEMM)."""

    @staticmethod
    def forward(ctx, rows64, rows, wq, bq, wk, wv, dtype, backward_precision=_F64, key_precision=_F64,
                out_precision=_F64, backward_gemm="aten", memo=None):
        rows_b = rows if rows.dtype == backward_precision else rows64
        ctx.save_for_backward(rows_b, wq, bq, wk, wv)
        ctx.bp = backward_precision
        ctx.gemm = backward_gemm
        if memo is not None:  # the same weights folded earlier (gradient checkpointing, accumulation)
            return tuple(t.clone() for t in memo)

        def at(p):
            return rows64 if p == _F64 else (rows if rows.dtype == p else rows64.to(p))

        rk = at(key_precision) @ wk.to(key_precision).t() if wk is not None else rows64
        if wq is not None:
            rk = rk.to(_F64)
            w_query = (rk @ wq.to(_F64)).to(dtype)
            b_query = (rk @ bq.to(_F64)).to(dtype) if bq is not None else rows64.new_empty(0, dtype=dtype)
        else:
            w_query, b_query = rk.to(dtype), rows64.new_empty(0, dtype=dtype)
        # w_out = W_V @ rows^T as (rows @ W_V^T)^T: the same float64 product, in the layout MKL's
        # dgemm runs faster (8.6 vs 10.0 ms at R+N = 392, H = 768, 1 thread), cast to a contiguous w_out
        w_out = ((at(out_precision) @ wv.to(out_precision).t()).to(dtype).t().contiguous() if wv is not None
                 else rows64.t().to(dtype))
        return w_query, b_query, w_out

    @staticmethod
    def backward(ctx, g_wq, g_bq, g_wo):
        rows_b, wq, bq, wk, wv = ctx.saved_tensors
        need = ctx.needs_input_grad
        bp = ctx.bp  # the backward products' precision (TRAIN_FOLD_BACKWARD_PRECISION)
        d_wq = d_bq = d_wk = d_wv = None
        rows = rows_b.to(bp)
        wq64 = wq.to(bp) if wq is not None else None
        g_wq64 = g_wq.to(bp)
        has_bq = bq is not None and wq is not None
        g_bq64 = g_bq.to(bp) if has_bq else None
        mm = backward_mm(rows, ctx.gemm)
        if wq is not None and (need[2] or need[3]):
            rk = mm(rows, wk.to(bp).t()) if wk is not None else rows
            if need[2]:
                d_wq = mm(rk.t(), g_wq64).to(wq.dtype)
            if need[3] and has_bq:
                d_bq = (rk.t() @ g_bq64).to(bq.dtype)
        if wk is not None and need[4]:
            g_rk = mm(g_wq64, wq64.t()) if wq is not None else g_wq64
            if has_bq:
                g_rk = g_rk + torch.outer(g_bq64, bq.to(bp))
            d_wk = mm(g_rk.t(), rows).to(wk.dtype)
        if wv is not None and need[5]:
            d_wv = mm(g_wo.to(bp), rows).to(wv.dtype)
        return None, None, d_wq, d_bq, d_wk, d_wv, None, None, None, None, None, None


def backward_mm(like, gemm: str):
    """The GEMM of the training fold's backward products (``gemm``: fold.TRAIN_FOLD_BACKWARD_GEMM)."""
    if gemm == "onednn" and like.device.type == "cpu" and like.dtype == torch.float32 \
            and HAS_ONEDNN and not torch.is_grad_enabled():  # create_graph (double backward): aten's, differentiable
        return onednn_mm
    return torch.mm


def key_bias_shift_f64(wq, bq, bk, dtype):
    """:func:`key_bias_shift` in float64 arithmetic, cast to ``dtype``, no float64 tensor saved for backward."""
    if bk is None:
        return None, None
    return _KeyBiasShift64.apply(wq, bq, bk, dtype)
