"""Folding adapter and fusion weights into the op's weights (docs/algorithm.md §2), in float64.

Per adapter n, with ``U_n = diag(s_n) W_U,n`` (H x r_n) and ``c_n = s_n * b_U,n`` (H)::

    w_query = [U_1^T; ...; U_N^T; c_1^T; ...; c_N^T] @ W_K^T @ W_Q     # (R+N, H): G_n rows, then e_n rows
    b_query = [U^T; C] @ W_K^T @ b_Q                                  # (R+N,):  g_n, then e0_n
    w_out   = W_V @ [U_1 ... U_N | c_1 ... c_N]                       # (H, R+N): V_n, then v_n
    w_down  = W_D,n diag(gamma_n), b_down = W_D,n beta_n + b_D,n      # ln_before folds the LN affine
    shift   = c . (W_Q^T b_K) + b_Q . b_K                             # kappa, only needed under dropout

Flags that are off are identities. Folding is O(H^2 R) once per parameter change (eval: cached
by the module) and differentiable, so training runs it under autograd every step.
Folding in float32 came close to the 2x error budget of docs/algorithm.md §4; float64 then a cast does not.
The forms a call takes (folded, per-token, plain) and the training fold's precision are chosen here
alone: :func:`call_form`, :func:`training_fold_form` and the constants next to them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence

import torch

from .cpu_gemm import HAS_ONEDNN as _HAS_ONEDNN  # tests read fold._HAS_ONEDNN
from .fold_autograd import _F64, _f64, _FoldFusion64, key_bias_shift, key_bias_shift_f64

__all__ = ["AdapterWeights", "FusionWeights", "Folded", "AdapterHalf", "fold", "fold_adapters", "fold_fusion",
           "fold_fusion_train", "training_fold_form", "call_form", "fold_plain", "pack_gemm1", "PLAIN_FORM_RATIO"]

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
    # The per-token form (training, few tokens; see fold_fusion_train): the op runs on the frozen
    # rows alone (w_query = [U^T; C], w_out = [U | C^T]) and the trained fusion weights are applied
    # per token around it: xq = W_K^T (W_Q c + b_Q) before, o = W_V (sum_n p_n u_n) after.
    query_pre: Optional[FusionWeights] = None  # fusion weights (weight dtype) for the per-token form
    # [w_down; w_query] and [b_down; b_query] as one buffer each, of which those four are views (set by
    # pack_gemm1 on cached eval folds): the torch backend's eval call runs GEMM1 as one GEMM on them.
    gemm1_weight: Optional[torch.Tensor] = None
    gemm1_bias: Optional[torch.Tensor] = None


def pack_gemm1(f: Folded) -> Folded:
    """``f`` with ``w_down``/``b_down``/``w_query``/``b_query`` moved into one weight and one bias buffer
    (``gemm1_weight``, ``gemm1_bias``; the four become contiguous views of them: same values and
    shapes, no extra memory), or ``f`` itself where a bias is missing, ``xq``'s width is not ``xd``'s or it
    is a training form. Made
    once per cached fold; it saves the torch backend one aten GEMM (with its transpose and bias
    broadcast) per eval call, ~6 us of a one-token call's host time on a 1-thread CPU (issue 12,
    ``python -m benchmarks host-overhead``)."""
    if (f.query_pre is not None or f.b_query is None or f.b_down is None or f.gemm1_weight is not None
            or f.w_down.shape[1] != f.w_query.shape[1]):  # xq of another width than xd: two GEMMs anyway
        return f
    r = f.w_down.shape[0]
    w = torch.cat([f.w_down, f.w_query], 0)
    b = torch.cat([f.b_down, f.b_query], 0)
    return replace(f, w_down=w[:r], b_down=b[:r], w_query=w[r:], b_query=b[r:], gemm1_weight=w, gemm1_bias=b)


@dataclass
class AdapterHalf:
    """The part of the fold that depends on the adapters alone (docs/algorithm.md §2; issue 11).

    With the adapters frozen (AdapterFusion stage 2) it never changes between training steps, so
    the module caches it like the eval fold and only the products with the trained fusion weights
    are recomputed under autograd (:func:`fold_fusion`)."""
    rows64: torch.Tensor                   # (R+N, H) [U^T; C] in float64
    rows: torch.Tensor                     # the same rows in the weight dtype (per-token form, fp32 products)
    w_down: torch.Tensor                   # LN-folded down projections, weight dtype
    b_down: torch.Tensor
    segments: List[int]
    activations: List[int]
    ln_mode: str
    rows_t: Optional[torch.Tensor] = None  # rows.t(), contiguous (the per-token form's w_out)


def fold_adapters(adapters: Sequence[AdapterWeights], dtype: torch.dtype, *, training: bool = False) -> AdapterHalf:
    """The adapter half of the fold, in float64 and cast to ``dtype`` (differentiable).
    ``training=True`` (the cached stage-2 half) also keeps ``rows.t()`` for the per-token form."""
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
    rows64 = torch.cat(uts + cs, dim=0)                     # (R+N, H): [U^T; C]
    rows = rows64.to(dtype)
    return AdapterHalf(rows64=rows64, rows=rows, w_down=torch.cat(downs, dim=0).to(dtype),
                       b_down=torch.cat(dbiases, dim=0).to(dtype), segments=segments, activations=acts,
                       ln_mode=ln_mode, rows_t=rows.t().contiguous() if training else None)


def fold_fusion(half: AdapterHalf, fusion: FusionWeights, dtype: torch.dtype, precision: torch.dtype = _F64) -> Folded:
    """Fold the fusion's query/key/value into the adapter half: ``precision`` is the dtype of the
    products (float64, then a cast to ``dtype``; or ``dtype`` itself, see :data:`TRAIN_FOLD_PRECISION`)."""
    if precision == _F64:
        rows = half.rows64 if half.rows64 is not None else half.rows.to(_F64)
        cvt = _f64
    else:
        rows = half.rows if half.rows.dtype == precision else half.rows64.to(precision)
        cvt = (lambda t: None if t is None else t.to(precision))
    wk, bk = cvt(fusion.key_weight), cvt(fusion.key_bias)
    wq, bq = cvt(fusion.query_weight), cvt(fusion.query_bias)
    wv = cvt(fusion.value_weight)
    # q . (W_K u) = (u^T W_K^T) q: in row form, rows @ W_K^T (torch stores W_K as (out, in)).
    rows_k = rows @ wk.t() if wk is not None else rows
    if wq is not None:
        w_query = rows_k @ wq
        b_query = rows_k @ bq if bq is not None else None
    else:
        w_query, b_query = rows_k, None
    w_out = (wv @ rows.t()) if wv is not None else rows.t()   # (H, R+N): W_V [U | C^T]

    # kappa = q . b_K = x . (W_Q^T b_K) + b_Q . b_K (x the query input)
    if precision == _F64:
        shift_weight, shift_bias = key_bias_shift(wq, bq, bk)
    else:
        shift_weight, shift_bias = key_bias_shift_f64(fusion.query_weight, fusion.query_bias, fusion.key_bias, dtype)

    def cast(t):
        return None if t is None else t.to(dtype)

    return Folded(
        w_down=half.w_down,
        b_down=half.b_down,
        w_query=cast(w_query),
        b_query=cast(b_query),
        w_out=cast(w_out),
        segments=half.segments,
        activations=half.activations,
        ln_mode=half.ln_mode,
        shift_weight=cast(shift_weight),
        shift_bias=cast(shift_bias),
    )


def fold(adapters: Sequence[AdapterWeights], fusion: FusionWeights, dtype: torch.dtype) -> Folded:
    """Fold in float64 and cast to ``dtype`` (differentiable)."""
    return fold_fusion(fold_adapters(adapters, dtype), fusion, dtype)


# ---------------------------------------------------------------------------------------------
# Training: which exact form, and at what precision (issue 11). One place.
# ---------------------------------------------------------------------------------------------
# Precision of the folded form's trained products (rows @ W_K^T @ W_Q, W_V @ rows^T) under
# autograd, by measurement (benchmarks/train_fold_precision.py; committed in
# benchmarks/results/cpu-amd-epyc-2core-1thread/train_fold/precision.json): float32 products put
# the key-bias and input gradients of residual_before / dropout sites over the docs/algorithm.md §4 bound
# (worst 3.7x) where float64 products stay within today's tail, so they stay float64, with the
# float64 intermediates recomputed in backward (_FoldFusion64), never saved. The per-token form
# runs in float32: it holds the oracle as well as the float64 fold (same measurement).
TRAIN_FOLD_PRECISION = torch.float64
# Precision of the fold's backward products (d_WQ = (rows W_K^T)^T g_wq, d_WK, d_WV: ~5·(R+N)·H²,
# two thirds of the fold's cost) when the forward products are float64. Their inputs, the op's
# gradients g, are float32 already; float32 products measured as float64 ones against the §4
# oracle (benchmarks/train_fold_precision.py, train_fold/precision_bwd*.json: 120 small sites
# and 40 at H = 256 / 768, fp32 and bf16, no site over the bound where the float64 backward holds
# it, per-site ratio at worst 1.32x float64's), where float32 *forward* products do not (7 of the
# 40 large sites over the bound where float64 holds it). So: float64 forward, float32 backward.
TRAIN_FOLD_BACKWARD_PRECISION = torch.float32
# Precision of the forward's two single products when TRAIN_FOLD_PRECISION is float64: the key
# rows ``rows @ W_K^T`` and ``w_out = W_V @ rows^T``. Measured (train_fold_precision, variants
# folded-fp64-bwd32-{k32,o32,k32-o32}; AVX-512 machine, train_fold/README.md): float32 key rows put
# 3 of 40 large sites (H 256/768) and 5 of 120 small ones over the bound where the float64 fold
# holds it, float32 w_out 1 of 120 small ones (d_key.bias under dropout, 5.8x the bound): both stay
# float64 (the switches are kept for that measurement).
TRAIN_FOLD_KEY_PRECISION = torch.float64
TRAIN_FOLD_OUT_PRECISION = torch.float64
# The float32 GEMMs of the fold's backward on x86 CPUs: "onednn" (oneDNN's matmul, the
# mkldnn._linear_pointwise op) or "aten" (torch.mm, MKL). MKL's sgemm runs its AVX2 code on AMD
# CPUs (~95 GFLOP/s a core here); oneDNN's picks AVX-512 by the CPU's features: 2.1x faster on the
# five (R+N) x H x H products at H=768, N=8, r=48 (4.7 -> 2.2 ms each, 1 thread, AMD EPYC Zen 5),
# 108 -> 94 ms a full training step of the site at 1024 tokens. Same float32 precision class
# (train_fold_precision: 0 sites over the bound where the float64 fold holds it, 40 large + 120
# small sites, fp32 and bf16). A double backward (create_graph) keeps aten's, differentiable.
TRAIN_FOLD_BACKWARD_GEMM = "onednn"

# The cost model: the folded form pays ~3·(R+N)·H² multiply-adds per call for the trained products
# in float64 (forward) and ~5·(R+N)·H² in float32 (backward); the per-token form pays ~3·M·H² (q,
# W_K^T q, W_V after the sum) forward and ~2x that backward, in float32, so the per-token form wins
# while M < TRAIN_PER_TOKEN_RATIO · (R+N). The ratio is measured (benchmarks/bench_train_forms.py,
# committed in benchmarks/results/cpu-amd-epyc-2core-1thread/train_fold/forms.json, the trained
# weights changing every step, H=768, N=8, r=48, 1 thread: crossover at M* = 1.59 (R+N) for the
# torch backend, 1.50 (R+N) for cpu; 2.1 before the backward ran in float32).
TRAIN_PER_TOKEN_RATIO = 1.55
# The same with the fold's backward GEMMs on oneDNN (TRAIN_FOLD_BACKWARD_GEMM, x86 CPUs; the torch
# op's training GEMM2 too): the folded form is cheaper, M* = 1.00 (R+N) torch, 1.04 (R+N) cpu
# (bench_train_forms --tokens 256 384 512 768 --variants folded-fp64-bwd32-onednn per_token, AMD
# EPYC Zen 5 with AVX-512, 1 thread; benchmarks/results/cpu-amd-epyc-2core-1thread/train_fold/forms_onednn.json).
TRAIN_PER_TOKEN_RATIO_ONEDNN = 1.02
# Wide adapters (R > PLAIN_FORM_RATIO·H) on the cpu backend in training: the plain form from
# TRAIN_WIDE_PLAIN_RATIO·H tokens (call_form). Measured: benchmarks/bench_train_forms.py --width 384
# (train_fold/forms_wide.json, H=768, N=8, r=384, 1 thread: the cpu backend's per-token form and
# the plain form cost the same at M* = 221 tokens = 0.29·H).
TRAIN_WIDE_PLAIN_RATIO = 0.29
# "auto" (the cost model), "folded" or "per_token": a switch for benchmarks and tests.
TRAIN_FORM = "auto"


# The folded form costs ~3·H·R multiply-adds per token; the plain form (adapters' own up
# projections, W_K^T W_Q folded into one H x H matrix, W_V after the sum) ~2·H·R + 2·H².
# Folded wins while R < 2H (docs/algorithm.md §2.3 quotes 3H with Q and K unfolded).
PLAIN_FORM_RATIO = 2.0


def call_form(backend: str, hidden: int, bottleneck: int, training=False, n_tokens: Optional[int] = None) -> str:
    """``"plain"`` or ``"folded"`` for one call of a site; the folded form's training variants (the
    per-token form) are :func:`training_fold_form`'s choice. The one place the runner asks.
    ``training``: a bool, or a callable returning it (asked only for wide adapters on ``cpu``).

    Wide adapters (R > PLAIN_FORM_RATIO·H) take the plain form on the ``torch`` backend. The ``cpu``
    backend, in a training call, takes it from TRAIN_WIDE_PLAIN_RATIO·H tokens up; fewer tokens keep
    its fused op in the per-token form (nothing trainable folded, the op on the frozen rows: ~3·H·(R+N)
    per token against the plain form's ~2·H·(R+H) plus its W_K^T W_Q fold, O(H³) per call). Folded,
    a training call would re-fold the (R+N) rows against the trained matrices on every call
    (O((R+N)·H²) in float64: 0.36x the reference at r=384). With ``TRAIN_FORM`` pinned, "folded"
    means the plain form and "per_token" the per-token form there."""
    if bottleneck <= PLAIN_FORM_RATIO * hidden:
        return "folded"
    if backend == "torch":
        return "plain"
    if backend != "cpu" or not (training() if callable(training) else training):
        return "folded"
    if TRAIN_FORM == "folded" or (TRAIN_FORM == "auto" and n_tokens is not None
                                  and n_tokens >= TRAIN_WIDE_PLAIN_RATIO * hidden):
        return "plain"
    return "folded"


def training_fold_form(n_tokens: Optional[int], hidden: int, rows: int, device_type: str = "cpu") -> str:
    """``"per_token"`` or ``"folded"`` for a training call of ``n_tokens`` rows (``rows`` = R+N) on
    ``device_type``. Both crossovers were measured on CPUs; the oneDNN one applies only where the
    fold's backward runs on oneDNN (CPU tensors on an x86 host), not to CUDA training on such a host."""
    if TRAIN_FORM != "auto":
        return TRAIN_FORM
    if n_tokens is None:
        return "folded"
    onednn = device_type == "cpu" and TRAIN_FOLD_BACKWARD_GEMM == "onednn" and _HAS_ONEDNN
    return "per_token" if n_tokens < (TRAIN_PER_TOKEN_RATIO_ONEDNN if onednn else TRAIN_PER_TOKEN_RATIO) * rows \
        else "folded"


def _fusion_stamp(fusion: FusionWeights, half: AdapterHalf, dtype):
    ts = (fusion.query_weight, fusion.query_bias, fusion.key_weight, fusion.value_weight)
    return (id(half.rows64), dtype, TRAIN_FOLD_KEY_PRECISION, TRAIN_FOLD_OUT_PRECISION) + tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in ts)


def fold_fusion_train(half: AdapterHalf, fusion: FusionWeights, dtype: torch.dtype, n_tokens: Optional[int],
                      memo: Optional[dict] = None) -> Folded:
    """The differentiable fusion half for a training call over the (cached, frozen) adapter half.

    ``memo`` (a dict the caller keeps per site): the folded form's float64 products for the current
    fusion weights, so a forward rerun with unchanged weights (gradient checkpointing's recompute,
    gradient accumulation) does not pay them again; the backward is always computed."""
    hidden = half.rows.shape[1]
    form = training_fold_form(n_tokens, hidden, half.rows.shape[0], half.rows.device.type)
    if form == "folded":
        if dtype == torch.float64 or TRAIN_FOLD_PRECISION != torch.float64 or half.rows64 is None:
            return fold_fusion(half, fusion, dtype, precision=torch.float64 if dtype == torch.float64 else TRAIN_FOLD_PRECISION)
        stamp = _fusion_stamp(fusion, half, dtype) if memo is not None else None
        hit = memo.get("train64") if memo is not None else None
        vals = hit[1] if hit is not None and hit[0] == stamp else None
        w_query, b_query, w_out = _FoldFusion64.apply(half.rows64, half.rows, fusion.query_weight, fusion.query_bias,
                                                      fusion.key_weight, fusion.value_weight, dtype,
                                                      TRAIN_FOLD_BACKWARD_PRECISION, TRAIN_FOLD_KEY_PRECISION,
                                                      TRAIN_FOLD_OUT_PRECISION, TRAIN_FOLD_BACKWARD_GEMM, vals)
        if memo is not None and vals is None:
            memo["train64"] = (stamp, (w_query.detach(), b_query.detach(), w_out.detach()),
                               [half.rows64] + [t for t in (fusion.query_weight, fusion.query_bias, fusion.key_weight,
                                                             fusion.value_weight) if t is not None])  # kept alive: ids stay unique
        shift_weight, shift_bias = key_bias_shift_f64(fusion.query_weight, fusion.query_bias, fusion.key_bias, dtype)
        has_bq = fusion.query_bias is not None and fusion.query_weight is not None
        return Folded(w_down=half.w_down, b_down=half.b_down, w_query=w_query, b_query=b_query if has_bq else None,
                      w_out=w_out, segments=half.segments, activations=half.activations, ln_mode=half.ln_mode,
                      shift_weight=shift_weight, shift_bias=shift_bias)
    cast = (lambda t: None if t is None else t.to(dtype))
    rows_t = half.rows_t if half.rows_t is not None else half.rows.t().contiguous()
    return Folded(w_down=half.w_down, b_down=half.b_down, w_query=half.rows, b_query=None, w_out=rows_t,
                  segments=half.segments, activations=half.activations, ln_mode=half.ln_mode,
                  shift_weight=None, shift_bias=None,
                  query_pre=FusionWeights(cast(fusion.query_weight), cast(fusion.query_bias), cast(fusion.key_weight),
                                          cast(fusion.key_bias), cast(fusion.value_weight)))


def fold_plain(fusion: FusionWeights, dtype: torch.dtype) -> dict:
    """The plain form's fusion fold (wide adapters): W_K^T W_Q and W_K^T b_Q, and the key-bias shift,
    in float64, cast to ``dtype``. The adapters stay unfolded."""
    f64 = torch.float64
    wq = None if fusion.query_weight is None else fusion.query_weight.to(f64)
    bq = None if fusion.query_bias is None else fusion.query_bias.to(f64)
    wk = None if fusion.key_weight is None else fusion.key_weight.to(f64)
    bk = None if fusion.key_bias is None else fusion.key_bias.to(f64)
    if wk is not None:
        w_qk = wk.t() @ wq if wq is not None else wk.t()
        b_qk = wk.t() @ bq if bq is not None else None
    else:
        w_qk, b_qk = wq, bq
    shift_w, shift_b = key_bias_shift(wq, bq, bk)
    cast = (lambda t: None if t is None else t.to(dtype))
    return {"w_qk": cast(w_qk), "b_qk": cast(b_qk), "shift_weight": cast(shift_w), "shift_bias": cast(shift_b)}
