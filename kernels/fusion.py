"""The ``triton`` backend: the fused AdapterFusion op (fusedadapter/ops.py schema) as Triton kernels.

Forward, two launches per site::

    _fwd_gemm1_kernel   grid (M / BLOCK_M,)        GEMM1 over xd (and xq) by column blocks of the R
                                                   bottleneck columns, epilogue in registers, softmax
                                                   (over the adapters a row's adapter_mask keeps)
                                                   -> z (M x R, activation dtype), probs (M x N)
    _fwd_gemm2_kernel   grid (M / BLOCK_M, H / BLOCK_H)   [p (x) z | p] @ w_out.T + residual -> out

Backward (``fusion_triton_backward``)::

    _bwd_epilogue_kernel  grid (M / BLOCK_M,)      recompute GEMM1 and dO @ w_out by column blocks,
                                                   softmax / dropout / activation backward
                                                   -> G = [dzp | dy | dlogit] (M x (2R+N), fp32),
                                                      Wmix = [p (x) z | p] (M x (R+N)), d logit_shift
    _mm_kernel (x 2-5)                             dX = G @ [w_down; w_query], dW = G.T @ X,
                                                   dw_out = dO.T @ Wmix (split-K over tokens)

The grouped op (several fusions' row groups per launch, multi-task serving and training) is the host
side in :mod:`fusedadapter.kernels.fusion_grouped` over these kernels' GROUPED variants.

Only (tokens x (R+N))-sized intermediates touch memory; no (tokens, N, H) tensor exists. Accumulation
is in fp32 (fp64 for fp64 activations); dot operands are in the activation dtype (the fp32 folded
weights are rounded to fp16/bf16 tile by tile, as the op schema allows; fp32 and fp64 dots use
``input_precision="ieee"``, never TF32). The epilogue's segmented sums and gathers over the adapter
axis are dots with a 0/1 segment matrix in fp32/fp64 ("ieee"), which are exact. fp64 activations
are supported (the interpreter tests them; on a GPU Triton's fp64 dots are slow, but correct).

Dropout replays ``fusedadapter.logit_dropout.hash_keep_mask`` bit for bit: ``lowbias32`` on uint32 of
``(row * N + n) ^ lowbias32(seed)``, keep when ``(h >> 8) >= ceil-threshold(p)`` (the threshold is
found with the same float32 comparison the torch code makes, so the masks are identical).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import struct
from typing import Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..errors import BackendUnavailable
from ..kernel_ops import register_kernel_op
from ..ops import FUSION_GRADS, acc_dtype, check_fusion_args
from . import configs as _configs

__all__ = ["fusion_triton", "fusion_triton_backward", "hash_keep_mask_triton", "keep_threshold", "unsupported_reason",
           "unsupported_dtype_reason", "INTERPRET", "AUTOTUNE"]

# Triton reads TRITON_INTERPRET when a kernel is *defined* (below), so this is what the kernels do.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = (not INTERPRET) and os.environ.get("FUSEDADAPTER_TRITON_AUTOTUNE", "1") != "0"

# Test hooks: poison fresh outputs with NaN (docs/algorithm.md §4), force a config per kernel, and the split-K
# chunk quantum of the weight-gradient GEMMs (tests lower it to cover the split path on small M).
POISON_OUTPUTS = False
CONFIG_OVERRIDE: Dict[str, dict] = {}
SPLIT_K_QUANTUM = _configs.SPLIT_K_QUANTUM
# Half-precision activations: fp32 weight tiles that are split into hi + lo halves (two dots) instead of
# rounded to one. The query half of GEMM1 (w_query, which makes the unscaled logits) needs it for the
# docs/algorithm.md §4 oracle at fp16 (rounded, a probs error 1.35x over the bound showed up in the gradients);
# w_down and the backward's recomputation do not (the kernels' SPLIT_WD, and SPLIT_WQ in the backward,
# are always False: the split path stays in the kernels for the query half).
# FUSEDADAPTER_TRITON_SPLIT_BF16=0 rounds w_query to one bf16 tile instead (GEMM1 1.2 instead of 1.8
# MFLOP/token at the target row); not measured on a GPU yet, so the split stays the default
# (device_check.sh times both; tests/test_gpu_triton.py checks the oracle without it).
SPLIT_WEIGHTS_QUERY = {torch.float16} | ({torch.bfloat16} if os.environ.get("FUSEDADAPTER_TRITON_SPLIT_BF16", "1")
                                         != "0" else set())
# FUSEDADAPTER_TRITON_PRECAST=1: the fp32 weight tiles the kernels round to fp16/bf16 one by one in
# every CTA's main loop (w_out, w_down, and w_query where it is not hi/lo split) are cast once per
# weight tensor instead (cached while the tensor and its version are unchanged) and read at half
# the bytes; the dots see bit-identical operands. Off by default until a GPU measures it.
PRECAST = os.environ.get("FUSEDADAPTER_TRITON_PRECAST", "0") == "1"
# FUSEDADAPTER_TRITON_PRESPLIT=1: the hi/lo split of w_query (SPLIT_WEIGHTS_QUERY) made once per weight
# tensor (cached like PRECAST: hi and lo stacked in one half-precision tensor) instead of in every GEMM1
# CTA's main loop; the dots see bit-identical operands. Off by default until a GPU measures it.
PRESPLIT = os.environ.get("FUSEDADAPTER_TRITON_PRESPLIT", "0") == "1"
# FUSEDADAPTER_TRITON_GEMM2=v2: _fwd_gemm2_kernel loads each row block's probabilities once (one
# BLOCK_M x N_PAD tile) and expands them to the bottleneck columns in registers (tl.gather), where v1
# re-gathers p from memory for every K block of every CTA; the p columns of [p (x) z | p] are one
# N_PAD-deep dot instead of a mostly padded BLOCK_K block; w_out is read as the precast half tensor
# (as PRECAST). Same products, bit-identical z part. Half-precision activations only: at fp32 its
# (BLOCK_M, N_PAD) fp32 tile spills on sm_90 (552-2160 bytes, aot_check "fp32 residual v2"), and fp32 and
# fp64 keep v1. v1 stays the default until a GPU measures v2.
GEMM2 = os.environ.get("FUSEDADAPTER_TRITON_GEMM2", "v1").strip().lower()
if GEMM2 not in ("v1", "v2"):
    raise ValueError(f"FUSEDADAPTER_TRITON_GEMM2 must be v1 or v2, not {GEMM2!r}")

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
_M32 = 0xFFFFFFFF


# =============================================================================================
# Device helpers (@triton.jit, inlined)
# =============================================================================================
@triton.jit
def _gemm_acc(acc, x_ptr, stride_x, rows, rmask, w_ptr, stride_wk, stride_wc, cols, cmask, K,
              BLOCK_K: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, SPLIT: tl.constexpr = False,
              lo_off=0, PRESPLIT: tl.constexpr = False):
    """Semantics: acc[i, j] += sum_k x[rows[i], k] * W[k, cols[j]]  for k < K,
    with W[k, c] at ``w_ptr + k * stride_wk + c * stride_wc`` (operands rounded to DOT).
    PRESPLIT: W is the hi half (in DOT) and its lo half lies ``lo_off`` elements further (two dots)."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        kmask = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w_at = w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wc
        wmask = kmask[:, None] & cmask[None, :]
        w = tl.load(w_at, mask=wmask, other=0.0)
        acc = _dot_split(x.to(DOT), w, acc, SPLIT, DOT, ACC)
        if PRESPLIT:
            acc = tl.dot(x.to(DOT), tl.load(w_at + lo_off, mask=wmask, other=0.0), acc, input_precision="ieee",
                         out_dtype=ACC)
    return acc


@triton.jit
def _dot_split(x, w, acc, SPLIT: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr):
    """Semantics: acc += x @ w, with w (fp32) rounded to DOT; SPLIT: w = hi + lo, both in DOT, two dots
    (x is exact in DOT), so the weights keep ~2x DOT's mantissa (fp32 weights under fp16/bf16)."""
    hi = w.to(DOT)
    acc = tl.dot(x, hi, acc, input_precision="ieee", out_dtype=ACC)
    if SPLIT:
        lo = (w - hi.to(w.dtype)).to(DOT)
        acc = tl.dot(x, lo, acc, input_precision="ieee", out_dtype=ACC)
    return acc


@triton.jit
def _gemm_acc2(acc1, acc2, x_ptr, stride_x, rows, rmask, w1_ptr, stride_w1, w2_ptr, stride_w2, cols, cmask, K,
               BLOCK_K: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr, SPLIT1: tl.constexpr = False,
               SPLIT2: tl.constexpr = False, lo_off2=0, PRESPLIT2: tl.constexpr = False):
    """Semantics: acc1 += x[rows] @ W1[cols].T ; acc2 += x[rows] @ W2[cols].T  (W row-major (C, K));
    one pass over x for both (the shared-input case xq = xd). PRESPLIT2: as _gemm_acc's PRESPLIT, for W2."""
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        kmask = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        x = x.to(DOT)
        wmask = kmask[:, None] & cmask[None, :]
        w1 = tl.load(w1_ptr + ks[:, None] + cols[None, :] * stride_w1, mask=wmask, other=0.0)
        acc1 = _dot_split(x, w1, acc1, SPLIT1, DOT, ACC)
        w2_at = w2_ptr + ks[:, None] + cols[None, :] * stride_w2
        w2 = tl.load(w2_at, mask=wmask, other=0.0)
        acc2 = _dot_split(x, w2, acc2, SPLIT2, DOT, ACC)
        if PRESPLIT2:
            acc2 = tl.dot(x, tl.load(w2_at + lo_off2, mask=wmask, other=0.0), acc2, input_precision="ieee",
                          out_dtype=ACC)
    return acc1, acc2


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _act_one(x, C: tl.constexpr):
    """Activation code C of fusedadapter.activations.apply_activation."""
    if C == 0:  # linear
        y = x
    elif C == 1:  # relu
        y = tl.where(x > 0, x, 0.0)
    elif C == 2:  # gelu (erf)
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif C == 3:  # gelu_new (tanh approximation)
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif C == 4:  # swish / silu
        y = x * _sigmoid(x)
    elif C == 5:  # tanh
        y = _tanh(x)
    elif C == 6:  # sigmoid
        y = _sigmoid(x)
    elif C == 7:  # leaky relu, slope 0.01
        y = tl.where(x > 0, x, 0.01 * x)
    else:  # 8: quick_gelu
        y = x * _sigmoid(1.702 * x)
    return y


@triton.jit
def _dact_one(x, C: tl.constexpr):
    """d act_C(x) / dx (torch's autograd formulas for apply_activation)."""
    if C == 0:
        d = tl.full(x.shape, 1.0, x.dtype)
    elif C == 1:
        d = tl.where(x > 0, 1.0, 0.0).to(x.dtype)
    elif C == 2:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        d = cdf + x * (0.3989422804014327 * tl.exp(-0.5 * x * x))
    elif C == 3:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (0.7978845608028654 * (1.0 + 0.134145 * x * x))
    elif C == 4:
        s = _sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif C == 5:
        t = _tanh(x)
        d = 1.0 - t * t
    elif C == 6:
        s = _sigmoid(x)
        d = s * (1.0 - s)
    elif C == 7:
        d = tl.where(x > 0, 1.0, tl.full(x.shape, 0.01, x.dtype))  # 0.01 exact in fp64 (not an fp32 literal)
    else:
        s = _sigmoid(1.702 * x)
        d = s + 1.702 * x * s * (1.0 - s)
    return d


@triton.jit
def _activation(x, code, ACT_MASK: tl.constexpr, UNIFORM_ACT: tl.constexpr, GRAD: tl.constexpr):
    """Semantics: y[i, j] = act[code[j]](x[i, j])  (GRAD: its derivative). UNIFORM_ACT >= 0: one code
    for every column; else only the codes set in the bitmask ACT_MASK are evaluated."""
    if UNIFORM_ACT >= 0:
        if GRAD:
            y = _dact_one(x, UNIFORM_ACT)
        else:
            y = _act_one(x, UNIFORM_ACT)
    else:
        y = x
        for c in tl.static_range(9):
            if (ACT_MASK >> c) & 1:
                if GRAD:
                    y = tl.where(code == c, _dact_one(x, c), y)
                else:
                    y = tl.where(code == c, _act_one(x, c), y)
    return y


@triton.jit
def _lowbias32(x):
    """Chris Wellons' lowbias32 on uint32 (wrapping multiplies), as fusedadapter.logit_dropout._lowbias32."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _keep_mask(rows, hrows, rmask, offs_n, nmask, N, stride_keep, keep_ptr, seed_hash, drop_thr,
               HAS_KEEP: tl.constexpr):
    """Semantics: keep[i, n] = keep_mask[rows[i], n] (row stride ``stride_keep``) if given, else
    (lowbias32(uint32(hrows[i] * N + n) ^ lowbias32(seed)) >> 8) >= drop_thr   (== hash_keep_mask).
    ``hrows``: the rows the draw is keyed on (``rows`` itself; a row group's own rows from 0 in the
    grouped op, so that a group draws what it would alone)."""
    if HAS_KEEP:
        k = tl.load(keep_ptr + rows[:, None] * stride_keep + offs_n[None, :], mask=rmask[:, None] & nmask[None, :],
                    other=0)
        keep = k != 0
    else:
        idx = (hrows[:, None] * N + offs_n[None, :]).to(tl.uint32)
        h = _lowbias32(idx ^ tl.cast(seed_hash, tl.uint32))
        keep = (h >> 8) >= tl.cast(drop_thr, tl.uint32)
    return keep


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """A host float passed as two fp32 halves (Triton float arguments are fp32): exact enough for fp64."""
    if ACC == tl.float64:
        v = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        v = hi
    return v


@triton.jit
def _group_operands(grp_ptr, temp_ptr, g, xd_ptr, wd_ptr, bd_ptr, segid_ptr, code_ptr, wq_ptr, bq_ptr, stride_wd,
                    stride_wq):
    """Row group g of the grouped op (``grp_ptr[g]``: GROUP_FIELDS of fusedadapter/kernels/fusion_grouped.py):
    (row0, row_end, KD, R, N, the operand pointers moved to the group's xd columns and rows of the
    packed weights and column tables, its first query row, its temperature's fp32 hi and lo)."""
    gt = grp_ptr + g * 8
    row0 = tl.load(gt + 0)
    w_row = tl.load(gt + 4)
    q_row = tl.load(gt + 5)
    return (row0, row0 + tl.load(gt + 1), tl.load(gt + 3).to(tl.int32), tl.load(gt + 6).to(tl.int32),
            tl.load(gt + 7).to(tl.int32), xd_ptr + tl.load(gt + 2), wd_ptr + w_row * stride_wd, bd_ptr + w_row,
            segid_ptr + w_row, code_ptr + w_row, wq_ptr + q_row * stride_wq, bq_ptr + q_row, q_row,
            tl.load(temp_ptr + 2 * g), tl.load(temp_ptr + 2 * g + 1))


# =============================================================================================
# Kernels
# =============================================================================================
@triton.jit
def _fwd_gemm1_kernel(
        xd_ptr, xq_ptr, wd_ptr, bd_ptr, wq_ptr, bq_ptr, shift_ptr, keep_ptr, amask_ptr, segid_ptr, code_ptr, z_ptr,
        p_ptr, grp_ptr, temp_ptr, seed_ptr, M, KD, KQ, R, N, seed_hash, drop_thr, drop_hi, drop_lo, temp_hi, temp_lo,
        stride_xd, stride_xq, stride_wd, stride_wq, stride_z, stride_p, wq_lo, M_KEY,
        HAS_XQ: tl.constexpr, HAS_BD: tl.constexpr, HAS_BQ: tl.constexpr, HAS_SHIFT: tl.constexpr,
        DROPOUT: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_AMASK: tl.constexpr, ACT_MASK: tl.constexpr,
        UNIFORM_ACT: tl.constexpr,
        ACC: tl.constexpr, DOT: tl.constexpr, N_PAD: tl.constexpr, SPLIT_WD: tl.constexpr, SPLIT_WQ: tl.constexpr,
        PRESPLIT_WQ: tl.constexpr, GROUPED: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """GEMM1 + epilogue, one program per BLOCK_M rows. PRESPLIT_WQ: ``wq_ptr`` holds w_query's hi half
    (in DOT) and its lo half ``wq_lo`` elements further, split once on the host (SPLIT_WQ is then off).
    GROUPED (:func:`fusion_triton_grouped`): program (i, g) runs block i of row group g, a fusion of its
    own whose weights are rows of the packed ones; ``grp_ptr[g]`` (:data:`GROUP_FIELDS`) says where,
    ``temp_ptr[2g:2g+2]`` is its temperature's fp32 (hi, lo) and ``seed_ptr[g]`` its dropout seed's hash
    (the draw keyed on the group's own rows from 0: what the group alone draws with that seed); an
    explicit keep mask and the probabilities have row stride ``stride_p``.

    Semantics::

        rows = block of BLOCK_M tokens
        logit = xq[rows] @ w_query[R:R+N].T + b_query[R:]              # (BLOCK_M, N)
        for cols in blocks of BLOCK_R over 0..R:                        # fp32 registers only
            zp = xd[rows] @ w_down[cols].T + b_down[cols]
            y  = xq[rows] @ w_query[cols].T + b_query[cols]
            z  = act[code[cols]](zp);  z_out[rows, cols] = z
            logit[:, seg[j]] += y[:, j] * z[:, j]  for j in cols       # dot with a 0/1 segment matrix
        if DROPOUT: logit = where(keep, (logit + shift[rows]) * 1/(1-p), 0)
        if HAS_AMASK: logit = where(adapter_mask[rows], logit, -inf)    # after dropout
        p_out[rows] = softmax(logit / T)                                # max subtracted
        (HAS_AMASK: a row with every adapter masked gets p = 0, not 0/0)
    """
    pid = tl.program_id(0)
    row0 = 0
    row_end = M
    if GROUPED:
        g = tl.program_id(1)
        (row0, row_end, KD, R, N, xd_ptr, wd_ptr, bd_ptr, segid_ptr, code_ptr, wq_ptr, bq_ptr, q_row, temp_hi,
         temp_lo) = _group_operands(grp_ptr, temp_ptr, g, xd_ptr, wd_ptr, bd_ptr, segid_ptr, code_ptr, wq_ptr, bq_ptr,
                                    stride_wd, stride_wq)
        if DROPOUT and not HAS_KEEP:
            seed_hash = tl.load(seed_ptr + g)
        if pid * BLOCK_M >= row_end - row0:  # a block past its group's rows (the grid fits the largest group)
            return
    rows = row0 + pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    offs_n = tl.arange(0, N_PAD)
    nmask = offs_n < N

    logit = tl.zeros((BLOCK_M, N_PAD), dtype=ACC)
    logit = _gemm_acc(logit, xq_ptr, stride_xq, rows, rmask, wq_ptr + R * stride_wq, 1, stride_wq, offs_n, nmask,
                      KQ, BLOCK_K, DOT, ACC, SPLIT_WQ, wq_lo, PRESPLIT_WQ)
    if HAS_BQ:
        logit += tl.load(bq_ptr + R + offs_n, mask=nmask, other=0.0)[None, :]

    for c0 in range(0, R, BLOCK_R):
        cols = c0 + tl.arange(0, BLOCK_R)
        cmask = cols < R
        zp = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        y = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        if HAS_XQ:
            zp = _gemm_acc(zp, xd_ptr, stride_xd, rows, rmask, wd_ptr, 1, stride_wd, cols, cmask, KD, BLOCK_K, DOT, ACC,
                           SPLIT_WD)
            y = _gemm_acc(y, xq_ptr, stride_xq, rows, rmask, wq_ptr, 1, stride_wq, cols, cmask, KQ, BLOCK_K, DOT, ACC,
                          SPLIT_WQ, wq_lo, PRESPLIT_WQ)
        else:
            zp, y = _gemm_acc2(zp, y, xd_ptr, stride_xd, rows, rmask, wd_ptr, stride_wd, wq_ptr, stride_wq, cols,
                               cmask, KD, BLOCK_K, DOT, ACC, SPLIT_WD, SPLIT_WQ, wq_lo, PRESPLIT_WQ)
        if HAS_BD:
            zp += tl.load(bd_ptr + cols, mask=cmask, other=0.0)[None, :]
        if HAS_BQ:
            y += tl.load(bq_ptr + cols, mask=cmask, other=0.0)[None, :]
        code = tl.load(code_ptr + cols, mask=cmask, other=0)
        z = _activation(zp, code[None, :], ACT_MASK, UNIFORM_ACT, False)
        seg = tl.load(segid_ptr + cols, mask=cmask, other=-1)
        onehot = (seg[:, None] == offs_n[None, :]).to(ACC)  # (BLOCK_R, N_PAD); padded columns: all 0
        logit = tl.dot(y * z, onehot, logit, input_precision="ieee", out_dtype=ACC)
        tl.store(z_ptr + rows[:, None] * stride_z + cols[None, :], z.to(z_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    if DROPOUT:
        if HAS_SHIFT:
            logit += tl.load(shift_ptr + rows, mask=rmask, other=0.0)[:, None]
        keep = _keep_mask(rows, rows - row0, rmask, offs_n, nmask, N, stride_p, keep_ptr, seed_hash, drop_thr,
                          HAS_KEEP)
        logit = tl.where(keep, logit * _scalar(drop_hi, drop_lo, ACC), 0.0)
    s = tl.where(nmask[None, :], logit / _scalar(temp_hi, temp_lo, ACC), float("-inf"))
    if HAS_AMASK:
        allow = tl.load(amask_ptr + rows[:, None] * stride_p + offs_n[None, :], mask=rmask[:, None] & nmask[None, :],
                        other=0)
        s = tl.where(allow != 0, s, float("-inf"))
        mx = tl.max(s, axis=1)
        # A row with every adapter masked: max -inf would make exp(nan); subtract 0 instead, every
        # e is 0, and dividing by 1 instead of the zero sum leaves p = 0 (NaN logits still give NaN).
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.exp(s - mx[:, None])
        den = tl.sum(e, axis=1)
        p = e / tl.where(den == 0.0, 1.0, den)[:, None]
    else:
        e = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
    tl.store(p_ptr + rows[:, None] * stride_p + offs_n[None, :], p.to(p_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


@triton.jit
def _fwd_gemm2_kernel(
        z_ptr, p_ptr, segid_ptr, wo_ptr, res_ptr, out_ptr, grp_ptr,
        M, H, R, N, stride_z, stride_p, stride_wo, stride_res, stride_out, M_KEY,
        HAS_RES: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, P_ONCE: tl.constexpr, N_PAD: tl.constexpr,
        GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """GEMM2 + residual, one program per (BLOCK_M rows, BLOCK_H output columns).

    Semantics::

        for k in 0..R+N:   wmix[:, k] = p[:, seg[k]] * z[:, k]  if k < R  else  p[:, k - R]
        out[rows, hs] = wmix[rows] @ w_out[hs].T + residual[rows, hs]

    P_ONCE (FUSEDADAPTER_TRITON_GEMM2=v2): p[rows] is loaded once as a (BLOCK_M, N_PAD) tile, its
    columns gathered in registers per K block of z, and the p part is one N_PAD-deep dot; else (v1)
    every K block of R + N gathers p[rows, seg[k]] from memory. GROUPED: program (i, j, g) as GEMM1's,
    w_out's columns of group g from ``grp_ptr[g]``'s query row on.
    """
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    row0 = 0
    row_end = M
    if GROUPED:
        gp = grp_ptr + tl.program_id(2) * 8
        row0 = tl.load(gp + 0)
        row_end = row0 + tl.load(gp + 1)
        segid_ptr += tl.load(gp + 4)
        wo_ptr += tl.load(gp + 5)
        R = tl.load(gp + 6).to(tl.int32)
        N = tl.load(gp + 7).to(tl.int32)
        if pid_m * BLOCK_M >= row_end - row0:
            return
    rows = row0 + pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hs < H
    acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=ACC)
    offs_k = tl.arange(0, BLOCK_K)
    if P_ONCE:
        offs_n = tl.arange(0, N_PAD)
        nmask = offs_n < N
        pt = tl.load(p_ptr + rows[:, None] * stride_p + offs_n[None, :], mask=rmask[:, None] & nmask[None, :],
                     other=0.0).to(ACC)
        wp = tl.load(wo_ptr + hs[None, :] * stride_wo + (R + offs_n)[:, None], mask=nmask[:, None] & hmask[None, :],
                     other=0.0)
        acc = tl.dot(pt.to(DOT), wp.to(DOT), acc, input_precision="ieee", out_dtype=ACC)  # the p columns
        for k0 in range(0, R, BLOCK_K):
            ks = k0 + offs_k
            in_z = ks < R
            seg = tl.load(segid_ptr + ks, mask=in_z, other=0)
            ps = tl.gather(pt, tl.broadcast_to(seg[None, :], (BLOCK_M, BLOCK_K)), axis=1)  # p[rows, seg[ks]]
            zz = tl.load(z_ptr + rows[:, None] * stride_z + ks[None, :], mask=rmask[:, None] & in_z[None, :],
                         other=0.0)
            wmix = ps * zz.to(ACC)  # columns past R: z = 0 (a NaN p makes its whole row NaN anyway)
            wo = tl.load(wo_ptr + hs[None, :] * stride_wo + ks[:, None], mask=in_z[:, None] & hmask[None, :],
                         other=0.0)
            acc = tl.dot(wmix.to(DOT), wo.to(DOT), acc, input_precision="ieee", out_dtype=ACC)
    else:
        KC = R + N
        for k0 in range(0, KC, BLOCK_K):
            ks = k0 + offs_k
            in_z = ks < R
            kmask = ks < KC
            seg = tl.load(segid_ptr + ks, mask=in_z, other=0)
            pcol = tl.where(in_z, seg, ks - R)
            pg = tl.load(p_ptr + rows[:, None] * stride_p + pcol[None, :], mask=rmask[:, None] & kmask[None, :],
                         other=0.0)
            zz = tl.load(z_ptr + rows[:, None] * stride_z + ks[None, :], mask=rmask[:, None] & in_z[None, :],
                         other=1.0)
            wmix = pg.to(ACC) * zz.to(ACC)
            wo = tl.load(wo_ptr + hs[None, :] * stride_wo + ks[:, None], mask=kmask[:, None] & hmask[None, :],
                         other=0.0)
            acc = tl.dot(wmix.to(DOT), wo.to(DOT), acc, input_precision="ieee", out_dtype=ACC)
    omask = rmask[:, None] & hmask[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + rows[:, None] * stride_res + hs[None, :], mask=omask, other=0.0).to(ACC)
    tl.store(out_ptr + rows[:, None] * stride_out + hs[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_epilogue_kernel(
        do_ptr, gp_ptr, p_ptr, xd_ptr, xq_ptr, wd_ptr, bd_ptr, wq_ptr, bq_ptr, wo_ptr, keep_ptr, segid_ptr,
        code_ptr, g_ptr, wm_ptr, dshift_ptr, grp_ptr, temp_ptr, seed_ptr,
        M, KD, KQ, H, R, N, seed_hash, drop_thr, drop_hi, drop_lo, temp_hi, temp_lo,
        stride_do, stride_xd, stride_xq, stride_wd, stride_wq, stride_wo, stride_g, stride_wm, stride_p, M_KEY,
        HAS_XQ: tl.constexpr, HAS_BD: tl.constexpr, HAS_BQ: tl.constexpr, HAS_GP: tl.constexpr,
        DROPOUT: tl.constexpr, HAS_KEEP: tl.constexpr, STORE_G: tl.constexpr, STORE_WM: tl.constexpr,
        STORE_DSHIFT: tl.constexpr, ACT_MASK: tl.constexpr, UNIFORM_ACT: tl.constexpr,
        ACC: tl.constexpr, DOT: tl.constexpr, N_PAD: tl.constexpr, SPLIT_WD: tl.constexpr, SPLIT_WQ: tl.constexpr,
        GROUPED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Epilogue backward, one program per BLOCK_M rows; z, y and dO @ w_out recomputed per column block.
    The adapter mask needs no argument here: it is in the saved ``p`` (0 where masked, so ``dl`` = 0).
    ``p``, ``grad_probs`` and an explicit keep mask have row stride ``stride_p``. GROUPED (the grouped
    op's backward): program (i, g) runs block i of row group g with its own weights, temperature and
    dropout seed, as :func:`_fwd_gemm1_kernel`'s GROUPED; G's and Wmix's columns are the group's own
    (its R and N), from column 0 of each row.

    Semantics::

        p = probs[rows]
        # pass A: gradient of the probabilities
        dp = grad_probs[rows] + dO[rows] @ w_out[:, R:R+N]
        for cols in blocks over 0..R:
            z = act(xd @ w_down[cols].T + b_down[cols]);  dwz = dO @ w_out[:, cols]
            dp[:, seg[j]] += dwz[:, j] * z[:, j]
        dl = p * (dp - sum(p * dp)) / T                       # softmax backward
        if DROPOUT: dl = where(keep, dl / (1 - p_drop), 0)
            # d/d shift = sum_n dl, summed as the C++ backends do (csrc/fusion_common.h
            # row_softmax_backward): exactly 0 when nothing is dropped, no cancellation
            dshift[rows] = (P_drop * S_keep - P_keep * S_drop) / (1 - p_drop) / T
            #   P_keep/P_drop = sum p over the kept/dropped adapters, S_* = sum p * dp likewise
        G[rows, 2R:2R+N] = dl                                 # d logit = d e-columns of t
        # pass B: per column gradients
        for cols in blocks over 0..R:
            zp, z, y, dwz as above;  ps = p[:, seg[cols]];  dls = dl[:, seg[cols]]
            Wmix[rows, cols] = ps * z
            G[rows, cols]     = (dwz * ps + dls * y) * act'(zp)     # d zp
            G[rows, R + cols] = dls * z                              # d y
        Wmix[rows, R:R+N] = p
    """
    pid = tl.program_id(0)
    row0 = 0
    row_end = M
    if GROUPED:
        g = tl.program_id(1)
        (row0, row_end, KD, R, N, xd_ptr, wd_ptr, bd_ptr, segid_ptr, code_ptr, wq_ptr, bq_ptr, q_row, temp_hi,
         temp_lo) = _group_operands(grp_ptr, temp_ptr, g, xd_ptr, wd_ptr, bd_ptr, segid_ptr, code_ptr, wq_ptr, bq_ptr,
                                    stride_wd, stride_wq)
        wo_ptr += q_row
        if DROPOUT and not HAS_KEEP:
            seed_hash = tl.load(seed_ptr + g)
        if pid * BLOCK_M >= row_end - row0:
            return
    rows = row0 + pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < row_end
    offs_n = tl.arange(0, N_PAD)
    nmask = offs_n < N
    mn_mask = rmask[:, None] & nmask[None, :]
    p = tl.load(p_ptr + rows[:, None] * stride_p + offs_n[None, :], mask=mn_mask, other=0.0).to(ACC)
    dl = tl.zeros((BLOCK_M, N_PAD), dtype=ACC)

    if STORE_G or STORE_DSHIFT:
        dp = tl.zeros((BLOCK_M, N_PAD), dtype=ACC)
        if HAS_GP:
            dp += tl.load(gp_ptr + rows[:, None] * stride_p + offs_n[None, :], mask=mn_mask, other=0.0).to(ACC)
        dp = _gemm_acc(dp, do_ptr, stride_do, rows, rmask, wo_ptr + R, stride_wo, 1, offs_n, nmask, H,
                       BLOCK_K, DOT, ACC)
        for c0 in range(0, R, BLOCK_R):
            cols = c0 + tl.arange(0, BLOCK_R)
            cmask = cols < R
            zp = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
            zp = _gemm_acc(zp, xd_ptr, stride_xd, rows, rmask, wd_ptr, 1, stride_wd, cols, cmask, KD, BLOCK_K, DOT, ACC,
                           SPLIT_WD)
            if HAS_BD:
                zp += tl.load(bd_ptr + cols, mask=cmask, other=0.0)[None, :]
            code = tl.load(code_ptr + cols, mask=cmask, other=0)
            z = _activation(zp, code[None, :], ACT_MASK, UNIFORM_ACT, False)
            dwz = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
            dwz = _gemm_acc(dwz, do_ptr, stride_do, rows, rmask, wo_ptr, stride_wo, 1, cols, cmask, H, BLOCK_K, DOT, ACC)
            seg = tl.load(segid_ptr + cols, mask=cmask, other=-1)
            onehot = (seg[:, None] == offs_n[None, :]).to(ACC)
            dp = tl.dot(dwz * z, onehot, dp, input_precision="ieee", out_dtype=ACC)
        sd = tl.sum(p * dp, axis=1)
        dl = p * (dp - sd[:, None]) / _scalar(temp_hi, temp_lo, ACC)
        if DROPOUT:
            keep = _keep_mask(rows, rows - row0, rmask, offs_n, nmask, N, stride_p, keep_ptr, seed_hash, drop_thr,
                              HAS_KEEP)
            dl = tl.where(keep, dl * _scalar(drop_hi, drop_lo, ACC), 0.0)
            if STORE_DSHIFT:  # (only with dropout: without it the shift cancels, the host writes 0)
                # sum_n dl without the direct sum's cancellation (it is exactly 0 when every adapter is
                # kept, where the direct sum leaves rounding noise): the C++ backends' form
                pdp = p * dp
                p_keep = tl.sum(tl.where(keep, p, 0.0), axis=1)
                p_drop = tl.sum(tl.where(keep, 0.0, p), axis=1)
                s_keep = tl.sum(tl.where(keep, pdp, 0.0), axis=1)
                s_drop = tl.sum(tl.where(keep, 0.0, pdp), axis=1)
                ds = _scalar(drop_hi, drop_lo, ACC) * (p_drop * s_keep - p_keep * s_drop) / _scalar(temp_hi, temp_lo, ACC)
                tl.store(dshift_ptr + rows, ds.to(dshift_ptr.dtype.element_ty), mask=rmask)
        if STORE_G:
            tl.store(g_ptr + rows[:, None] * stride_g + (2 * R + offs_n)[None, :], dl.to(g_ptr.dtype.element_ty),
                     mask=mn_mask)

    if STORE_G or STORE_WM:
        for c0 in range(0, R, BLOCK_R):
            cols = c0 + tl.arange(0, BLOCK_R)
            cmask = cols < R
            cm_mask = rmask[:, None] & cmask[None, :]
            zp = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
            y = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
            if STORE_G and not HAS_XQ:
                zp, y = _gemm_acc2(zp, y, xd_ptr, stride_xd, rows, rmask, wd_ptr, stride_wd, wq_ptr, stride_wq, cols,
                                   cmask, KD, BLOCK_K, DOT, ACC, SPLIT_WD, SPLIT_WQ)
            else:
                zp = _gemm_acc(zp, xd_ptr, stride_xd, rows, rmask, wd_ptr, 1, stride_wd, cols, cmask, KD,
                               BLOCK_K, DOT, ACC, SPLIT_WD)
                if STORE_G:
                    y = _gemm_acc(y, xq_ptr, stride_xq, rows, rmask, wq_ptr, 1, stride_wq, cols, cmask, KQ,
                                  BLOCK_K, DOT, ACC, SPLIT_WQ)
            if HAS_BD:
                zp += tl.load(bd_ptr + cols, mask=cmask, other=0.0)[None, :]
            code = tl.load(code_ptr + cols, mask=cmask, other=0)
            z = _activation(zp, code[None, :], ACT_MASK, UNIFORM_ACT, False)
            seg = tl.load(segid_ptr + cols, mask=cmask, other=-1)
            onehot_t = (offs_n[:, None] == seg[None, :]).to(ACC)  # (N_PAD, BLOCK_R)
            ps = tl.dot(p, onehot_t, input_precision="ieee", out_dtype=ACC)  # p[:, seg[cols]], exact
            if STORE_WM:
                tl.store(wm_ptr + rows[:, None] * stride_wm + cols[None, :], (ps * z).to(wm_ptr.dtype.element_ty),
                         mask=cm_mask)
            if STORE_G:
                if HAS_BQ:
                    y += tl.load(bq_ptr + cols, mask=cmask, other=0.0)[None, :]
                dwz = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
                dwz = _gemm_acc(dwz, do_ptr, stride_do, rows, rmask, wo_ptr, stride_wo, 1, cols, cmask, H,
                                BLOCK_K, DOT, ACC)
                dls = tl.dot(dl, onehot_t, input_precision="ieee", out_dtype=ACC)
                dzp = (dwz * ps + dls * y) * _activation(zp, code[None, :], ACT_MASK, UNIFORM_ACT, True)
                g_rows = g_ptr + rows[:, None] * stride_g
                tl.store(g_rows + cols[None, :], dzp.to(g_ptr.dtype.element_ty), mask=cm_mask)
                tl.store(g_rows + (R + cols)[None, :], (dls * z).to(g_ptr.dtype.element_ty), mask=cm_mask)
        if STORE_WM:
            tl.store(wm_ptr + rows[:, None] * stride_wm + (R + offs_n)[None, :], p.to(wm_ptr.dtype.element_ty),
                     mask=mn_mask)


@triton.jit
def _mm_kernel(a_ptr, b_ptr, c_ptr, tab_ptr, M, N, K, K_SPLIT, NS,
               stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn, M_KEY, K_KEY,
               ACC: tl.constexpr, DOT: tl.constexpr, GROUPED: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Plain GEMM with arbitrary strides and split-K (program axis 2).

    Semantics::

        s = program_id(2);  ks = [s * K_SPLIT, min(K, (s + 1) * K_SPLIT))
        C[s, i, j] = sum_{k in ks} A[i, k] * B[k, j]        (operands rounded to DOT, ACC accumulation)

    GROUPED (the grouped op's backward: one GEMM per row group in one launch): program axis 2 is
    g * NS + s, and ``tab_ptr[g]`` = (a_off, b_off, c_off, M, N, K) moves A, B, C by those elements
    and gives group g's sizes (the strides are shared); blocks past a group's M, N or K do nothing,
    so C must start zeroed where a group writes nothing.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if GROUPED:
        t = tab_ptr + (pid_s // NS) * 6
        pid_s = pid_s % NS
        a_ptr += tl.load(t + 0)
        b_ptr += tl.load(t + 1)
        c_ptr += tl.load(t + 2)
        M = tl.load(t + 3).to(tl.int32)
        N = tl.load(t + 4).to(tl.int32)
        K = tl.load(t + 5).to(tl.int32)
        if (pid_m * BLOCK_M >= M) | (pid_n * BLOCK_N >= N) | (pid_s * K_SPLIT >= K):
            return
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    k_lo = pid_s.to(tl.int64) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, K_SPLIT, BLOCK_K):
        ks = k_lo + k0 + offs_k
        kmask = ks < k_hi
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak, mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn, mask=kmask[:, None] & cmask[None, :],
                    other=0.0)
        acc = tl.dot(a.to(DOT), b.to(DOT), acc, input_precision="ieee", out_dtype=ACC)
    tl.store(c_ptr + pid_s * stride_cs + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _hash_keep_kernel(out_ptr, row0, M, N, seed_hash, drop_thr, BLOCK_M: tl.constexpr, N_PAD: tl.constexpr):
    """Semantics: out[i, n] = keep(row0 + i, n), the kernels' dropout draw (for tests)."""
    local = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = local < M
    offs_n = tl.arange(0, N_PAD)
    nmask = offs_n < N
    keep = _keep_mask(row0 + local, row0 + local, rmask, offs_n, nmask, N, N, out_ptr, seed_hash, drop_thr, False)
    tl.store(out_ptr + local[:, None] * N + offs_n[None, :], keep.to(tl.int8), mask=rmask[:, None] & nmask[None, :])


# =============================================================================================
# Launching: one fixed config (interpreter, or FUSEDADAPTER_TRITON_AUTOTUNE=0), autotune on a GPU
# =============================================================================================
class _Launcher:
    def __init__(self, name: str, fn, key: Sequence[str]):
        self.name = name
        self.fn = fn
        self.key = list(key)
        self.block_keys = _configs.BLOCK_KEYS[name]
        self.tuned = None
        if AUTOTUNE:
            cfgs = [triton.Config({k: c[k] for k in self.block_keys}, num_warps=c["num_warps"],
                                  num_stages=c["num_stages"]) for c in _configs.GPU_CONFIGS[name]]
            self.tuned = triton.autotune(configs=cfgs, key=list(key))(fn)

    def __call__(self, grid, *args, **meta):
        cfg = CONFIG_OVERRIDE.get(self.name)
        if not INTERPRET and meta.get("DOT") == tl.float64:
            cfg = _configs.FP64_CONFIG[self.name]  # the fast paths' tiles do not fit in shared memory in fp64
        if cfg is None and self.tuned is not None:
            return self.tuned[grid](*args, **meta)
        if cfg is None:
            cfg = _configs.INTERPRET_CONFIG[self.name] if INTERPRET else _configs.GPU_DEFAULT[self.name]
        launch = {k: cfg[k] for k in self.block_keys}
        if not INTERPRET:
            launch.update(num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
        return self.fn[grid](*args, **meta, **launch)


# Autotune keys: the shape, and every flag that changes the compiled kernel's cost (dropout, the
# adapter mask, the activation set, which outputs the backward stores), so that a config tuned on
# eval calls is not reused for training calls (or the reverse).
_FWD1 = _Launcher("fwd_gemm1", _fwd_gemm1_kernel, ["M_KEY", "KD", "KQ", "R", "N", "HAS_XQ", "DOT", "DROPOUT",
                                                   "HAS_AMASK", "ACT_MASK", "SPLIT_WQ", "PRESPLIT_WQ", "GROUPED"])
_FWD2 = _Launcher("fwd_gemm2", _fwd_gemm2_kernel, ["M_KEY", "H", "R", "N", "DOT", "P_ONCE", "GROUPED"])
_BWD1 = _Launcher("bwd_epilogue", _bwd_epilogue_kernel, ["M_KEY", "KD", "KQ", "H", "R", "N", "HAS_XQ", "DOT",
                                                         "DROPOUT", "ACT_MASK", "STORE_G", "STORE_WM",
                                                         "STORE_DSHIFT", "GROUPED"])
_MM = _Launcher("mm", _mm_kernel, ["M_KEY", "N", "K_KEY", "DOT", "GROUPED"])


# =============================================================================================
# Host side
# =============================================================================================
def unsupported_reason(device) -> Optional[str]:
    """None if the kernels can run on ``device``, else why not."""
    device = torch.device(device)
    if device.type == "cpu":
        if INTERPRET:
            return None
        return ("on CPU the Triton kernels run only in the Triton interpreter: set TRITON_INTERPRET=1 before "
                "fusedadapter.kernels is first imported (tests do this when no GPU is present)")
    if device.type == "cuda":
        if INTERPRET:
            return None
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if torch.version.hip is None:
            major, minor = torch.cuda.get_device_capability(device)
            if major < 8:
                return f"needs an NVIDIA GPU of compute capability >= 8.0 (bf16 dots); this one is {major}.{minor}"
        return None
    return f"device type {device.type!r} is not supported (CUDA, or CPU through the Triton interpreter)"


# The Triton interpreter computes with numpy, which has no bfloat16: a dot or an elementwise product of
# bf16 operands there returns garbage with no error (Triton 3.x, measured: a 16x16 bf16 dot off by ~2e10,
# a product NaN; a whole site's output off by ~1e9 relative). fp16 (numpy float16) and fp32/fp64 are
# right there (measured against the float64 reference: within the docs/algorithm.md §4 oracle). TF32 is not
# emulated by the interpreter, but no kernel here uses it (every fp32 dot is input_precision="ieee").
INTERPRETER_WRONG_DTYPES = {torch.bfloat16: "the Triton interpreter's bfloat16 arithmetic is wrong (numpy has no "
                                            "bfloat16: dots and products of bf16 operands return garbage, no error); "
                                            "run bf16 on a GPU, or use the 'torch' or 'cpu' backend"}


def unsupported_dtype_reason(device, dtype: torch.dtype) -> Optional[str]:
    """None if the kernels compute right at activation dtype ``dtype`` on ``device``, else why not."""
    if INTERPRET and dtype in INTERPRETER_WRONG_DTYPES:
        return INTERPRETER_WRONG_DTYPES[dtype]
    return None


def _check_device(device: torch.device, dtype: Optional[torch.dtype] = None) -> None:
    reason = unsupported_reason(device)
    if reason is None and dtype is not None:
        reason = unsupported_dtype_reason(device, dtype)
    if reason is not None:
        raise BackendUnavailable(f"backend 'triton' cannot run on {device}: {reason}")


def _new(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _lowbias32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    x ^= x >> 16
    return x


@functools.lru_cache(maxsize=256)
def keep_threshold(dropout_p: float) -> int:
    """Smallest ``k`` with ``hash_uniform`` draw ``k * 2^-24`` (float32, as torch computes it) ``>= dropout_p``,
    decided by the same torch comparison ``hash_keep_mask`` makes: the kernels keep ``(h >> 8) >= k``."""
    base = int(math.ceil(dropout_p * 16777216.0))
    ks = torch.arange(max(base - 2, 0), min(base + 3, 16777216 + 1), dtype=torch.int64)
    keep = (ks.to(torch.float32) * (1.0 / 16777216.0)) >= dropout_p
    hits = torch.nonzero(keep)
    if hits.numel() == 0:  # cannot happen: k = 2^24 gives 1.0 >= p for p < 1
        return 16777216
    return int(ks[hits[0, 0]].item())


def _fp32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def _split(v: float):
    """(hi, lo) fp32 halves of a float: hi = fp32(v), lo = fp32(v - hi)."""
    hi = _fp32(v)
    return hi, _fp32(v - hi)


_TABLES: Dict[tuple, tuple] = {}


def _tables(segments: List[int], activations: List[int], device: torch.device):
    """Per bottleneck column: its adapter (segment id) and activation code, int32 on ``device`` (cached)."""
    key = (tuple(segments), tuple(activations), str(device))
    hit = _TABLES.get(key)
    if hit is None:
        seg, code = [], []
        for i, a in enumerate(activations):
            w = segments[i + 1] - segments[i]
            seg += [i] * w
            code += [a] * w
        hit = (torch.tensor(seg, dtype=torch.int32, device=device), torch.tensor(code, dtype=torch.int32, device=device))
        if len(_TABLES) > 256:
            _TABLES.clear()
        _TABLES[key] = hit
    return hit


class _LaunchConstants:
    """The launch constants of one op call (dtypes, segments, activation codes, dropout, masks), shared by
    forward and backward."""

    def __init__(self, xd, segments, activations, temperature, dropout_p, seed, keep_mask, adapter_mask=None):
        self.dtype = xd.dtype
        if self.dtype not in _TL_DTYPE:
            raise TypeError(f"backend 'triton': unsupported activation dtype {self.dtype} "
                            f"(float16, bfloat16, float32, float64)")
        self.acc = acc_dtype(self.dtype)
        self.device = xd.device
        self.segments = [int(s) for s in segments]
        self.activations = [int(a) for a in activations]
        self.n = len(self.activations)
        self.r = self.segments[-1]
        self.segid, self.codes = _tables(self.segments, self.activations, xd.device)
        uniq = set(self.activations)
        self.meta = dict(ACT_MASK=sum(1 << c for c in uniq), UNIFORM_ACT=self.activations[0] if len(uniq) == 1 else -1,
                         ACC=_TL_DTYPE[self.acc], DOT=_TL_DTYPE[self.dtype], N_PAD=_configs.n_pad(self.n),
                         SPLIT_WD=False, SPLIT_WQ=self.dtype in SPLIT_WEIGHTS_QUERY)
        self.dropout = dropout_p > 0.0
        self.has_keep = self.dropout and keep_mask is not None
        self.keep = keep_mask.contiguous().view(torch.uint8) if self.has_keep else None
        self.has_amask = adapter_mask is not None
        self.amask = adapter_mask.contiguous().view(torch.uint8) if self.has_amask else None
        self.seed_hash = _lowbias32_int(int(seed) & _M32)
        self.drop_thr = keep_threshold(float(dropout_p)) if self.dropout else 0
        self.drop_hi, self.drop_lo = _split(1.0 / (1.0 - dropout_p)) if self.dropout else (1.0, 0.0)
        self.temp_hi, self.temp_lo = _split(float(temperature))

    def scalars(self):
        return (self.seed_hash, self.drop_thr, self.drop_hi, self.drop_lo, self.temp_hi, self.temp_lo)

    def device_guard(self):
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()


def _c(t):
    return None if t is None else t.contiguous()


_CASTS: Dict[tuple, tuple] = {}


def _cached_weight(w: torch.Tensor, dtype: torch.dtype, kind: str, make):
    """``make()`` of weight ``w`` for ``dtype``, cached while ``w`` (identity and version) is unchanged:
    once per fold, as a cached fold keeps its tensors. Inference tensors have no version: made per call."""
    try:
        version = w._version
    except RuntimeError:  # an inference tensor has no version counter
        return make()
    key = (id(w), kind)
    hit = _CASTS.get(key)
    if hit is not None and hit[0]() is w and hit[1] == version and hit[2] == dtype:
        return hit[3]
    value = make()
    if len(_CASTS) > 64:  # drop the entries of weights that are gone; clear all only past a large bound
        for k in [k for k, e in _CASTS.items() if e[0]() is None]:  # (a captured CUDA graph may read the rest)
            del _CASTS[k]
        if len(_CASTS) > 4096:
            _CASTS.clear()
    import weakref

    _CASTS[key] = (weakref.ref(w), version, dtype, value)
    return value


def _dot_weight(w: torch.Tensor, dtype: torch.dtype, split: bool, precast: Optional[bool] = None) -> torch.Tensor:
    """``w`` as the kernels' dot operand: cast to the half dtype once (``precast``, default PRECAST), else
    ``w`` itself (fp32 tiles rounded in the kernel). A split weight stays fp32 (the kernel takes its hi and
    lo halves; :func:`_split_weight` is the split made once)."""
    precast = PRECAST if precast is None else precast
    if not precast or split or dtype not in (torch.float16, torch.bfloat16) or w.dtype == dtype:
        return w
    return _cached_weight(w, dtype, "cast", lambda: w.to(dtype))


def _split_weight(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w`` (fp32) as ``stack([hi, lo])`` in ``dtype``: hi = dtype(w), lo = dtype(w - hi), the halves the
    kernels' in-loop split (``_dot_split``) makes, once per weight tensor (PRESPLIT)."""
    def make():
        hi = w.to(dtype)
        return torch.stack([hi, (w - hi.to(w.dtype)).to(dtype)]).contiguous()

    return _cached_weight(w, dtype, "split", make)


def fusion_triton(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations,
                  temperature=1.0, dropout_p=0.0, seed=0, keep_mask=None, logit_shift=None, adapter_mask=None):
    """Forward of ``fusedadapter::fusion_triton`` (the op schema of fusedadapter.ops)."""
    segments = [int(s) for s in segments]
    activations = [int(a) for a in activations]
    m, r, n = check_fusion_args(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations,
                                temperature, dropout_p, keep_mask, logit_shift, adapter_mask)
    _check_device(xd.device, xd.dtype)
    site = _LaunchConstants(xd, segments, activations, temperature, dropout_p, seed, keep_mask, adapter_mask)
    h = w_out.shape[0]
    out = _new((m, h), xd.dtype, xd.device)
    probs = _new((m, n), site.acc, xd.device)
    if m == 0:
        return out, probs
    xd, residual, w_down, b_down, w_query, b_query, w_out = map(_c, (xd, residual, w_down, b_down, w_query, b_query,
                                                                     w_out))
    x_q = xd if xq is None else xq.contiguous()
    shift = _c(logit_shift) if site.dropout else None
    z = _new((m, r), xd.dtype, xd.device)
    dummy = site.segid
    mk = _configs.token_key(m)
    meta1 = dict(site.meta)
    presplit = PRESPLIT and meta1["SPLIT_WQ"] and w_query.dtype != xd.dtype
    wd_k = _dot_weight(w_down, xd.dtype, meta1["SPLIT_WD"])
    if presplit:  # [hi; lo] of w_query in the half dtype; the kernel's own split is off
        wq_k = _split_weight(w_query, xd.dtype)
        meta1["SPLIT_WQ"] = False
    else:
        wq_k = _dot_weight(w_query, xd.dtype, meta1["SPLIT_WQ"])
    wq_lo = w_query.numel() if presplit else 0  # elements from the hi half to the lo half
    p_once = GEMM2 == "v2" and xd.dtype in (torch.float16, torch.bfloat16)
    wo_k = _dot_weight(w_out, xd.dtype, False, precast=True if p_once else None)
    with site.device_guard():
        _FWD1(lambda META: (triton.cdiv(m, META["BLOCK_M"]),),
              xd, x_q, wd_k, b_down if b_down is not None else dummy, wq_k,
              b_query if b_query is not None else dummy, shift if shift is not None else dummy,
              site.keep if site.has_keep else dummy, site.amask if site.has_amask else dummy, site.segid, site.codes,
              z, probs, dummy, dummy, dummy,
              m, xd.shape[1], x_q.shape[1], r, n, *site.scalars(),
              xd.stride(0), x_q.stride(0), w_down.stride(0), w_query.stride(0), z.stride(0), n, wq_lo, mk,
              HAS_XQ=xq is not None, HAS_BD=b_down is not None, HAS_BQ=b_query is not None,
              HAS_SHIFT=shift is not None, DROPOUT=site.dropout, HAS_KEEP=site.has_keep, HAS_AMASK=site.has_amask,
              PRESPLIT_WQ=presplit, GROUPED=False, **meta1)
        if h > 0:
            _FWD2(lambda META: (triton.cdiv(m, META["BLOCK_M"]), triton.cdiv(h, META["BLOCK_H"])),
                  z, probs, site.segid, wo_k, residual if residual is not None else out, out, dummy,
                  m, h, r, n, z.stride(0), n, w_out.stride(0), residual.stride(0) if residual is not None else 0,
                  out.stride(0), mk, HAS_RES=residual is not None, ACC=site.meta["ACC"], DOT=site.meta["DOT"],
                  P_ONCE=p_once, N_PAD=site.meta["N_PAD"], GROUPED=False)
    return out, probs


def hash_keep_mask_triton(seed: int, m: int, n: int, dropout_p: float, device="cpu", row0: int = 0) -> torch.Tensor:
    """The keep-mask the kernels draw for rows ``row0 .. row0+m`` (bool (m, n)); equals
    ``fusedadapter.ops.hash_keep_mask(seed, row0 + m, n, dropout_p)[row0:]`` bit for bit."""
    device = torch.device(device)
    _check_device(device)
    out = torch.empty((m, n), dtype=torch.int8, device=device)
    if m > 0:
        _hash_keep_kernel[(triton.cdiv(m, 64),)](out, row0, m, n, _lowbias32_int(int(seed) & _M32),
                                                 keep_threshold(float(dropout_p)), BLOCK_M=64,
                                                 N_PAD=_configs.n_pad(n))
    return out.bool()


def split_plan(mm_: int, nn_: int, kk: int, device: torch.device, tiles: int = 1):
    """(splits, chunk) of a split-K GEMM of an (mm_ x nn_) output over kk: enough programs to fill the
    GPU (``tiles``: output grids launched together, the grouped GEMM's groups), chunks a multiple of
    SPLIT_K_QUANTUM."""
    q = SPLIT_K_QUANTUM
    if INTERPRET:
        target = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        target = max(1, (2 * sms) // max(1, tiles * triton.cdiv(mm_, 128) * triton.cdiv(nn_, 128)))
    splits = max(1, min(target, kk // q))
    chunk = triton.cdiv(triton.cdiv(kk, splits), q) * q
    return triton.cdiv(kk, chunk), chunk


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, dot: torch.dtype, split_k: bool = False) -> torch.Tensor:
    """``a @ b`` (2-D, any strides) with the Triton GEMM: operands rounded to ``dot``, accumulation in
    fp32 (fp64 for fp64); ``split_k`` splits the reduction (token) axis across programs and sums the
    fp32 partials (deterministic) when the output tile grid alone would leave the GPU idle."""
    mm_, kk = a.shape
    nn_ = b.shape[1]
    acc = acc_dtype(dot)
    if mm_ == 0 or nn_ == 0 or kk == 0:
        return torch.zeros((mm_, nn_), dtype=out_dtype, device=a.device)
    splits, chunk = split_plan(mm_, nn_, kk, a.device) if split_k else (1, kk)
    c = _new((splits, mm_, nn_), acc if splits > 1 else out_dtype, a.device)
    _MM(lambda META: (triton.cdiv(mm_, META["BLOCK_M"]), triton.cdiv(nn_, META["BLOCK_N"]), splits),
        a, b, c, c, mm_, nn_, kk, chunk, 1, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        c.stride(0), c.stride(1), c.stride(2), _configs.token_key(mm_), _configs.token_key(kk),
        ACC=_TL_DTYPE[acc], DOT=_TL_DTYPE[dot], GROUPED=False)
    return c[0] if splits == 1 else c.sum(0).to(out_dtype)


def fusion_triton_backward(grad_out, grad_probs, probs, xd, xq, w_down, b_down, w_query, b_query, w_out, segments,
                           activations, temperature, dropout_p, seed, keep_mask, logit_shift, needs, adapter_mask=None):
    """Backward of ``fusedadapter::fusion_triton`` (FUSION_BACKWARD_SCHEMA of fusedadapter.ops). Gradients in
    fusedadapter.ops.FUSION_GRADS order (xd, xq, residual, w_down, b_down, w_query, b_query, w_out,
    logit_shift), ``needs`` likewise; not needed -> empty.
    ``adapter_mask`` is checked only: the kernels read the saved ``probs``, which carry it (0 where masked)."""
    segments = [int(s) for s in segments]
    activations = [int(a) for a in activations]
    m, r, n = check_fusion_args(xd, xq, None, w_down, b_down, w_query, b_query, w_out, segments, activations,
                                temperature, dropout_p, keep_mask, logit_shift, adapter_mask)
    _check_device(xd.device, xd.dtype)
    need = dict(zip(FUSION_GRADS, (bool(x) for x in needs)))  # gradient slot name -> flag
    site = _LaunchConstants(xd, segments, activations, temperature, dropout_p, seed, keep_mask)
    dt, acc, dev = xd.dtype, site.acc, xd.device
    h = w_out.shape[0]
    if tuple(grad_out.shape) != (m, h):
        raise ValueError(f"fusion_triton_backward: grad_out must have shape ({m}, {h}), got {tuple(grad_out.shape)}")
    # not needed -> empty; distinct tensors: outputs must not alias
    grads: Dict[str, torch.Tensor] = {name: xd.new_empty((0,)) for name in FUSION_GRADS}
    if need["residual"]:
        grads["residual"] = grad_out.clone()
    need_g = any(need[k] for k in ("xd", "xq", "w_down", "b_down", "w_query", "b_query"))  # G = [d zp | d t]
    need_wm = need["w_out"]
    need_ds = need["logit_shift"] and site.dropout and logit_shift is not None
    if need["logit_shift"] and not need_ds:  # without dropout the shift cancels in softmax
        grads["logit_shift"] = torch.zeros_like(logit_shift)
    if not (need_g or need_wm or need_ds):
        return tuple(grads[name] for name in FUSION_GRADS)

    xd, w_down, b_down, w_query, b_query, w_out, probs = map(_c, (xd, w_down, b_down, w_query, b_query, w_out, probs))
    grad_out = grad_out.contiguous()
    x_q = xd if xq is None else xq.contiguous()
    gp = None if grad_probs is None else grad_probs.to(acc).contiguous()
    g = _new((m, 2 * r + n), acc, dev) if need_g else None
    wm = _new((m, r + n), dt, dev) if need_wm else None
    dshift = _new((m,), acc, dev) if need_ds else None
    dummy = site.segid
    split_wd = split_wq = False  # the backward recomputes with rounded weight tiles (no hi/lo split)
    if m > 0:
        with site.device_guard():
            _BWD1(lambda META: (triton.cdiv(m, META["BLOCK_M"]),),
                  grad_out, gp if gp is not None else dummy, probs, xd, x_q, _dot_weight(w_down, dt, split_wd),
                  b_down if b_down is not None else dummy, _dot_weight(w_query, dt, split_wq),
                  b_query if b_query is not None else dummy, _dot_weight(w_out, dt, False),
                  site.keep if site.has_keep else dummy, site.segid, site.codes,
                  g if g is not None else dummy, wm if wm is not None else dummy,
                  dshift if dshift is not None else dummy, dummy, dummy, dummy,
                  m, xd.shape[1], x_q.shape[1], h, r, n, *site.scalars(),
                  grad_out.stride(0), xd.stride(0), x_q.stride(0), w_down.stride(0), w_query.stride(0),
                  w_out.stride(0), g.stride(0) if g is not None else 0, wm.stride(0) if wm is not None else 0, n,
                  _configs.token_key(m),
                  HAS_XQ=xq is not None, HAS_BD=b_down is not None, HAS_BQ=b_query is not None, HAS_GP=gp is not None,
                  DROPOUT=site.dropout, HAS_KEEP=site.has_keep, STORE_G=need_g, STORE_WM=need_wm,
                  STORE_DSHIFT=need_ds, GROUPED=False,
                  **dict(site.meta, SPLIT_WD=split_wd, SPLIT_WQ=split_wq))

    with site.device_guard():
        if need["xd"] or need["xq"]:
            if xq is None:  # xd feeds both halves of GEMM1: one GEMM against the stacked weights
                grads["xd"] = _mm(g, torch.cat([w_down, w_query], 0), dt, dt)
            else:
                if need["xd"]:
                    grads["xd"] = _mm(g[:, :r], w_down, dt, dt)
                if need["xq"]:
                    grads["xq"] = _mm(g[:, r:], w_query, dt, dt)
        if need["w_down"]:
            grads["w_down"] = _mm(g[:, :r].t(), xd, acc, dt, split_k=True)
        if need["b_down"]:
            grads["b_down"] = g[:, :r].sum(0)
        if need["w_query"]:
            grads["w_query"] = _mm(g[:, r:].t(), x_q, acc, dt, split_k=True)
        if need["b_query"]:
            grads["b_query"] = g[:, r:].sum(0)
        if need["w_out"]:
            grads["w_out"] = _mm(grad_out.t(), wm, acc, dt, split_k=True)
    if need_ds:
        grads["logit_shift"] = dshift
    return tuple(grads[name] for name in FUSION_GRADS)


_OP = register_kernel_op("fusion_triton", {"CUDA": fusion_triton, "CPU": fusion_triton},
                         {"CUDA": fusion_triton_backward, "CPU": fusion_triton_backward})
