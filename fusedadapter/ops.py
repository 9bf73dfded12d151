"""The fused AdapterFusion op: one schema, implemented by every fast backend.

Semantics (per row ``m`` of M tokens; ``N`` adapters; segment ``n`` is columns
``segments[n]:segments[n+1]`` of the ``R = segments[N]`` bottleneck columns)::

    xq = xd if xq is None
    zp   = xd @ w_down.T + b_down                       # (M, R)   GEMM1, adapter half
    t    = xq @ w_query.T + b_query                     # (M, R+N) GEMM1, query half
    z[:, seg n] = act[n](zp[:, seg n])
    logit[n] = sum_{j in seg n} t[j] * z[j] + t[R + n]  # (M, N), fp32 accumulation
    if dropout_p > 0:                                   # training-mode logit dropout
        keep = keep_mask if keep_mask is not None else hash_keep_mask(seed, M, N, dropout_p)
        logit = where(keep, (logit + logit_shift[:, None]) / (1 - dropout_p), 0)
    if adapter_mask is not None:                        # per-row adapter subsets (after dropout)
        logit = where(adapter_mask, logit, -inf)
    p = softmax(logit / temperature)                     # fp32, max subtracted
    p[m] = 0 for a row m with no adapter left (adapter_mask[m] all False): out[m] = residual[m]
    w = [p[seg(j)] * z[j] for j < R] ++ [p[n] for n < N] # (M, R+N)
    out = w @ w_out.T + residual                         # (M, H)   GEMM2
    return out (dtype of xd), p (float32; float64 for float64 inputs)

Dtypes: activations (``xd``, ``xq``, ``residual``) share one floating dtype; the folded weights
(docs/algorithm.md §2, made by :mod:`fusedadapter.fold`) and ``logit_shift`` are in its accumulation dtype
(:func:`acc_dtype`: float32 for fp16/bf16/fp32, float64 for float64), so that their gradients are
never rounded to half precision before the fold's backward (which multiplies them by fusion
matrices, amplifying any rounding). Kernels may round weight tiles to half for tensor cores. ``segments`` and
``activations`` are static int lists (N+1 offsets, N codes from
:mod:`fusedadapter.activations`), so a mixed set of widths and activations is one op call.
``logit_shift`` (M,) is AdapterHub's per-row key-bias term ``kappa``; it cancels in softmax
and only matters under dropout, so callers pass it only then.
``adapter_mask`` (M, N) bool, True = the adapter takes part in row ``m``'s softmax (a masked adapter
gets probability exactly 0, dropout or not); absent (None) it costs nothing. It takes no gradient,
and a backward that reuses the saved ``p`` needs no more than that ``p`` (masked entries are 0, so
their logit gradients are 0); a backward that recomputes the softmax applies it again.

Backends register ``fusedadapter::fusion_<backend>`` with :data:`FUSION_SCHEMA`. The ``torch``
backend is ``CompositeImplicitAutograd`` (plain aten ops: autograd, double backward,
``torch.compile`` and ``torch.export`` see through it); kernel backends register an opaque op
with a fake implementation and a backward op (:func:`fusedadapter.kernel_ops.register_kernel_op`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .activations import apply_activation
from .cpu_gemm import HAS_ONEDNN, onednn_linear, onednn_train_linear, use_onednn_train
from .logit_dropout import hash_keep_mask, hash_uniform  # noqa: F401  (the op's dropout; re-exported)

__all__ = [
    "FUSION_SCHEMA",
    "FUSION_BACKWARD_SCHEMA",
    "FUSION_ARGS",
    "FUSION_GRADS",
    "fusion_torch",
    "fusion_torch_packed",
    "hash_keep_mask",
    "check_fusion_args",
    "fusion_torch_backward",
    "masked_softmax",
]

FUSION_SCHEMA = (
    "(Tensor xd, Tensor? xq, Tensor? residual, Tensor w_down, Tensor? b_down, Tensor w_query, "
    "Tensor? b_query, Tensor w_out, int[] segments, int[] activations, float temperature=1.0, "
    "float dropout_p=0.0, int seed=0, Tensor? keep_mask=None, Tensor? logit_shift=None, Tensor? adapter_mask=None) "
    "-> (Tensor, Tensor)"
)

# Gradients, in order: xd, xq, residual, w_down, b_down, w_query, b_query, w_out, logit_shift.
# `needs` has one flag per gradient; a gradient not needed comes back as an empty tensor.
FUSION_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor? grad_probs, Tensor probs, Tensor xd, Tensor? xq, Tensor w_down, "
    "Tensor? b_down, Tensor w_query, Tensor? b_query, Tensor w_out, int[] segments, int[] activations, "
    "float temperature, float dropout_p, int seed, Tensor? keep_mask, Tensor? logit_shift, bool[] needs, "
    "Tensor? adapter_mask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)

_LIB = torch.library.Library("fusedadapter", "DEF")


def _schema_args(schema: str) -> Tuple[Tuple[str, str], ...]:
    """(type, name) of each argument of a schema string ``"(Type name[=default], ...) -> ..."``."""
    inner = schema[schema.index("(") + 1:schema.index(") ->")]
    return tuple(tuple(a.split("=")[0].rsplit(" ", 1)) for a in inner.split(", "))


# Named slots, derived from the schemas (use these instead of positions):
# FUSION_ARGS   the op's arguments, in order (ctx.needs_input_grad's order; the autograd formula
#               returns one gradient per name);
# FUSION_GRADS  the backward's outputs and its `needs` flags: every floating-point tensor argument
#               (the bool masks keep_mask and adapter_mask have no gradient). csrc/fusion_host.h's
#               `enum Grad` is the C++ twin (tests/test_native.py checks it against this).
FUSION_ARGS: Tuple[str, ...] = tuple(name for _, name in _schema_args(FUSION_SCHEMA))
_NO_GRAD_TENSORS = ("keep_mask", "adapter_mask")
FUSION_GRADS: Tuple[str, ...] = tuple(name for typ, name in _schema_args(FUSION_SCHEMA)
                                      if typ.startswith("Tensor") and name not in _NO_GRAD_TENSORS)
GRAD_INDEX = {name: i for i, name in enumerate(FUSION_GRADS)}
assert FUSION_BACKWARD_SCHEMA.split("-> ")[1].count("Tensor") == len(FUSION_GRADS)

# ---------------------------------------------------------------------------------------------
# Argument checks shared by every backend (cheap: shapes and dtypes only, no data access).
# ---------------------------------------------------------------------------------------------
def check_fusion_args(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations,
                      temperature, dropout_p, keep_mask, logit_shift, adapter_mask=None) -> Tuple[int, int, int]:
    """Validate the op's arguments; return (M, R, N). (Written for few attribute reads: it runs on every
    call of the torch backend, where a one-token call is ~17 small aten ops; torch.Size compares
    with a tuple directly.)"""
    if xd.dim() != 2:
        raise ValueError(f"fusion op: xd must be 2-D (tokens, features), got shape {tuple(xd.shape)}")
    if not xd.is_floating_point():
        raise TypeError(f"fusion op: xd must be floating point, got {xd.dtype}")
    n = len(activations)
    if n < 1 or len(segments) != n + 1:
        raise ValueError(f"fusion op: expected len(segments) == len(activations) + 1 >= 2, got {len(segments)} and {n}")
    seg = list(segments)
    if seg[0] != 0 or sorted(set(seg)) != seg:  # strictly increasing from 0
        raise ValueError(f"fusion op: segments must start at 0 and strictly increase, got {seg}")
    r = int(seg[-1])
    m, kd = xd.shape
    kq = kd if xq is None else xq.shape[-1]
    if xq is not None and (xq.dim() != 2 or xq.shape[0] != m):
        raise ValueError(f"fusion op: xq must have shape ({m}, K), got {tuple(xq.shape)}")
    if w_down.shape != (r, kd):
        raise ValueError(f"fusion op: w_down must have shape ({r}, {kd}), got {tuple(w_down.shape)}")
    if b_down is not None and b_down.shape != (r,):
        raise ValueError(f"fusion op: b_down must have shape ({r},), got {tuple(b_down.shape)}")
    if w_query.shape != (r + n, kq):
        raise ValueError(f"fusion op: w_query must have shape ({r + n}, {kq}), got {tuple(w_query.shape)}")
    if b_query is not None and b_query.shape != (r + n,):
        raise ValueError(f"fusion op: b_query must have shape ({r + n},), got {tuple(b_query.shape)}")
    if w_out.dim() != 2 or w_out.shape[1] != r + n:
        raise ValueError(f"fusion op: w_out must have shape (H, {r + n}), got {tuple(w_out.shape)}")
    h = w_out.shape[0]
    if residual is not None and residual.shape != (m, h):
        raise ValueError(f"fusion op: residual must have shape ({m}, {h}), got {tuple(residual.shape)}")
    act = xd.dtype
    acc = acc_dtype(act)
    for name, t, want in (("xq", xq, act), ("residual", residual, act), ("w_down", w_down, acc),
                          ("b_down", b_down, acc), ("w_query", w_query, acc), ("b_query", b_query, acc),
                          ("w_out", w_out, acc), ("logit_shift", logit_shift, acc)):
        if t is None:
            continue
        if t.dtype != want:
            raise TypeError(f"fusion op: {name} has dtype {t.dtype}, expected {want} (activations share xd's dtype "
                            f"{act}; weights and logit_shift are in its accumulation dtype {acc})")
    check_on_xd_device("fusion op", xd, xq=xq, residual=residual, w_down=w_down, b_down=b_down, w_query=w_query,
                       b_query=b_query, w_out=w_out, logit_shift=logit_shift, adapter_mask=adapter_mask)
    if not temperature > 0:
        raise ValueError(f"fusion op: temperature must be > 0, got {temperature}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fusion op: dropout_p must be in [0, 1), got {dropout_p}")
    if keep_mask is not None and (keep_mask.shape != (m, n) or keep_mask.dtype != torch.bool):
        raise ValueError(f"fusion op: keep_mask must be a bool tensor of shape ({m}, {n}), got "
                         f"{keep_mask.dtype} {tuple(keep_mask.shape)}")
    if logit_shift is not None and logit_shift.shape != (m,):
        raise ValueError(f"fusion op: logit_shift must have shape ({m},), got {tuple(logit_shift.shape)}")
    if adapter_mask is not None:
        if adapter_mask.shape != (m, n) or adapter_mask.dtype != torch.bool:
            raise ValueError(f"fusion op: adapter_mask must be a bool tensor of shape ({m}, {n}) (tokens, adapters), "
                             f"got {adapter_mask.dtype} {tuple(adapter_mask.shape)}")
    codes = [int(code) for code in activations]
    if min(codes) < 0 or max(codes) > 8:
        code = next(c for c in codes if not 0 <= c <= 8)
        raise ValueError(f"fusion op: unknown activation code {code}; expected 0..8")
    return m, r, n


def check_on_xd_device(where: str, xd: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """Raise a ValueError naming the first of ``tensors`` (None: absent) not on ``xd``'s device: the
    kernels read every pointer on it, so a tensor elsewhere would be a bad read, not a copy."""
    for name, t in tensors.items():
        if t is not None and t.device != xd.device:
            raise ValueError(f"{where}: {name} is on {t.device}, expected {xd.device} (the device of xd)")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The op's accumulation dtype for activations of ``dtype``: float64 for float64, else float32.
    Folded weights, ``logit_shift`` and the returned probabilities use it."""
    return torch.float64 if dtype == torch.float64 else torch.float32



def _segment_activation(zp: torch.Tensor, segments: Sequence[int], activations: Sequence[int]) -> torch.Tensor:
    # Merge runs of adjacent segments with the same activation: one call in the common case.
    if len(set(activations)) == 1:
        return apply_activation(zp, activations[0])
    runs: List[Tuple[int, int, int]] = []
    for k, code in enumerate(activations):
        lo, hi = segments[k], segments[k + 1]
        if runs and runs[-1][2] == code:
            runs[-1] = (runs[-1][0], hi, code)
        else:
            runs.append((lo, hi, code))
    if len(runs) == 1:
        return apply_activation(zp, runs[0][2])
    return torch.cat([apply_activation(zp[:, lo:hi], code) for lo, hi, code in runs], dim=1)


def _segment_ids(segments: Sequence[int], device) -> torch.Tensor:
    # Built from the static offsets (not repeat_interleave on a tensor, whose output shape depends
    # on data and breaks torch.compile graphs).
    ids = [k for k in range(len(segments) - 1) for _ in range(segments[k + 1] - segments[k])]
    return torch.tensor(ids, dtype=torch.long, device=device)


def fusion_torch(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations,
                 temperature=1.0, dropout_p=0.0, seed=0, keep_mask=None, logit_shift=None, adapter_mask=None):
    """The op in plain torch ops (the ``torch`` backend; see the module docstring)."""
    segments = [int(s) for s in segments]
    activations = [int(a) for a in activations]
    m, r, n = check_fusion_args(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments,
                                activations, temperature, dropout_p, keep_mask, logit_shift, adapter_mask)
    return _fusion_torch_body(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations,
                              temperature, dropout_p, seed, keep_mask, logit_shift, adapter_mask, m, r, n)


def fusion_torch_packed(xd, residual, gemm1_weight, gemm1_bias, w_out, segments, activations, temperature,
                        dropout_p, seed, keep_mask, logit_shift, adapter_mask):
    """:func:`fusion_torch` with ``xq`` None on weights made by :func:`fusedadapter.fold.pack_gemm1`:
    GEMM1 is one GEMM over ``gemm1_weight = [w_down; w_query]``. For the site runner only, whose
    activations :func:`fusedadapter.runner.check_site_inputs` has checked and whose weights come from its
    own fold, so the op's argument checks (~4 us a call) are not repeated; the scalars still are."""
    if not temperature > 0 or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fusion op: temperature must be > 0 and dropout_p in [0, 1), got {temperature}, {dropout_p}")
    n = len(activations)
    r = segments[-1]
    return _fusion_torch_body(xd, None, residual, None, None, None, None, w_out, segments, activations, temperature,
                              dropout_p, seed, keep_mask, logit_shift, adapter_mask, xd.shape[0], r, n,
                              gemm1=(gemm1_weight, gemm1_bias))


def _fusion_torch_body(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations,
                       temperature, dropout_p, seed, keep_mask, logit_shift, adapter_mask, m, r, n, gemm1=None):
    act = xd.dtype
    acc = acc_dtype(act)
    # Half-precision activations are computed with fp32 intermediates, as a kernel's fp32
    # accumulators hold them: rounding GEMM1's outputs or GEMM2's input gradient to bf16 (bf16
    # F.linear calls) cost up to ~8x the reference's bf16 error in the docs/algorithm.md §4 oracle, through
    # the softmax over unscaled logits and its backward. Weights already arrive in fp32.
    # (Casts and the division by T are skipped where they are identities: a one-token eval call is
    # a handful of small aten ops, each a few us of host time.)
    same = act == acc
    xd_c = xd if same else xd.to(acc)
    if gemm1 is not None:  # [zp | t] = xd @ [w_down; w_query]^T + [b_down; b_query], one GEMM
        zp, y, e = F.linear(xd_c, gemm1[0], gemm1[1]).split_with_sizes([r, r, n], 1)
    else:
        xq_c = xd_c if xq is None else (xq if same else xq.to(acc))
        if torch.is_grad_enabled() and (use_onednn_train(xq_c, w_query, TRAIN_GEMM1_ONEDNN_MIN_ROWS)
                                        or use_onednn_train(xd_c, w_down, TRAIN_GEMM1_ONEDNN_MIN_ROWS)):
            # training GEMM1's backward on oneDNN (see TRAIN_GEMM1_ONEDNN_MIN_ROWS)
            zp = onednn_train_linear(xd_c, w_down, b_down)
            t = onednn_train_linear(xq_c, w_query, b_query)
        else:
            zp = F.linear(xd_c, w_down, b_down)
            t = F.linear(xq_c, w_query, b_query)
        y, e = t.split_with_sizes([r, n], 1)  # the C method (Tensor.split is a Python wrapper)
    z = _segment_activation(zp, segments, activations)
    yz = y * z
    equal_widths = len({b - a for a, b in zip(segments[:-1], segments[1:])}) == 1
    if equal_widths:
        logits = yz.view(m, n, r // n).sum(-1)
    else:
        logits = torch.zeros(m, n, dtype=acc, device=xd.device).index_add(1, _segment_ids(segments, xd.device), yz)
    logits = logits + e
    if dropout_p > 0.0:
        if keep_mask is None:
            keep_mask = hash_keep_mask(seed, m, n, dropout_p, device=xd.device)
        if logit_shift is not None:
            logits = logits + logit_shift[:, None]
        logits = torch.where(keep_mask, logits * (1.0 / (1.0 - dropout_p)), torch.zeros((), dtype=acc, device=xd.device))
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):  # x / 1.0 is x, bit for bit
        logits = logits / temperature
    if adapter_mask is None:
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = masked_softmax(logits, adapter_mask)
    seg_ids = None if equal_widths else _segment_ids(segments, xd.device)
    res_c = None if residual is None else (residual if same else residual.to(acc))
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and not torch.compiler.is_exporting() and (
            z.requires_grad or probs.requires_grad or w_out.requires_grad):
        out = _MixOut.apply(res_c, probs, z, w_out, seg_ids)  # training: the mixed rows are not saved
    else:
        out = _mix_out(res_c, probs, z, w_out, seg_ids)
    return (out if same else out.to(act)), probs


def _mix(probs, z, seg_ids):
    """[p[seg(j)] * z[j] for j < R] ++ p: GEMM2's input (M, R+N)."""
    m, n = probs.shape
    if seg_ids is None:  # equal widths
        pz = (probs.unsqueeze(-1) * z.view(m, n, z.shape[1] // n)).view(m, z.shape[1])
    else:
        pz = probs.index_select(1, seg_ids) * z
    return torch.cat([pz, probs], dim=1)


def _mix_out(residual, probs, z, w_out, seg_ids):
    wmix = _mix(probs, z, seg_ids)
    return F.linear(wmix, w_out) if residual is None else torch.addmm(residual, wmix, w_out.t())


# Training GEMM2 (forward and backward, _MixOut) on oneDNN from this many rows: on x86 CPUs MKL's
# sgemm may run AVX2 code (AMD: ~95 GFLOP/s a core) where oneDNN picks AVX-512 by the CPU's
# features: 2.0-2.2x faster per GEMM at H=768, R+N=392. In one site's training step (interleaved,
# 9 repeats, 1 thread, AMD EPYC Zen 5) 2.5% slower at 16 tokens, equal at 64, 3% faster at 128 and
# 256, 83 vs 94 ms at 1024. 0 turns it off.
TRAIN_ONEDNN_MIN_ROWS = 64


# Training GEMM1's backward products (d_x, d_w of xd @ w_down^T + b_down and xq @ w_query^T + b_query;
# the forward stays aten's: see cpu_gemm._OnednnLinear) on oneDNN from this many rows (CPU float32,
# autograd on, outside torch.compile). One site's step (H=768, N=8, r=48, 1 thread, interleaved, the
# per-token products on oneDNN in both): 0.94x at 16 tokens, 0.96x at 24, 0.95x at 32, 0.94x at 48;
# 0.96x at 128 / 256, 0.87x at 1024; at 4-8 within the noise. 0 turns it off.
TRAIN_GEMM1_ONEDNN_MIN_ROWS = 16


def _onednn(t: torch.Tensor, rows: int) -> bool:
    return (TRAIN_ONEDNN_MIN_ROWS > 0 and rows >= TRAIN_ONEDNN_MIN_ROWS and HAS_ONEDNN
            and t.dtype == torch.float32 and t.device.type == "cpu")


class _MixOut(torch.autograd.Function):
    """GEMM2, ``out = [p * z | p] @ w_out^T + residual``, for the training path: the same ops as
    :func:`_mix_out`, but autograd keeps only ``p``, ``z`` and ``w_out`` (``z`` is saved for the
    logits' backward anyway) and the (M, R+N) mixed rows are rebuilt in backward for ``w_out``'s
    gradient, instead of being saved (issue 11: bytes saved for backward). The backward is the
    same aten ops autograd would run, differentiable (double backward)."""

    @staticmethod
    def forward(ctx, residual, probs, z, w_out, seg_ids):
        ctx.save_for_backward(probs, z, w_out)
        ctx.seg_ids = seg_ids
        ctx.has_res = residual is not None
        if _onednn(w_out, probs.shape[0]):
            out = onednn_linear(_mix(probs, z, seg_ids), w_out)
            return out if residual is None else out.add_(residual)
        return _mix_out(residual, probs, z, w_out, seg_ids)

    @staticmethod
    def backward(ctx, g):
        probs, z, w_out = ctx.saved_tensors
        seg_ids = ctx.seg_ids
        need = ctx.needs_input_grad
        m, n = probs.shape
        r = z.shape[1]
        d_res = g if (ctx.has_res and need[0]) else None
        d_probs = d_z = d_wo = None
        dnnl = _onednn(w_out, m) and not torch.is_grad_enabled()  # create_graph: aten's, differentiable
        if dnnl:
            g = g.contiguous()
        if need[1] or need[2]:
            d_pz, d_p = (onednn_linear(g, w_out.t()) if dnnl else g.mm(w_out)).split_with_sizes([r, n], 1)
            if seg_ids is None:
                d_pz3, z3 = d_pz.reshape(m, n, r // n), z.view(m, n, r // n)
                if need[1]:
                    d_probs = (d_pz3 * z3).sum(-1) + d_p
                if need[2]:
                    d_z = (d_pz3 * probs.unsqueeze(-1)).view(m, r)
            else:
                if need[1]:
                    d_probs = torch.zeros_like(probs).index_add(1, seg_ids, d_pz * z) + d_p
                if need[2]:
                    d_z = d_pz * probs.index_select(1, seg_ids)
        if need[3]:
            wmix = _mix(probs, z, seg_ids)
            if dnnl:
                d_wo = onednn_linear(g.t(), wmix.t())
            else:
                d_wo = g.t().mm(wmix) if not ctx.has_res else wmix.t().mm(g).t()  # as F.linear's / addmm's backward
        return d_res, d_probs, d_z, d_wo, None


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``softmax(where(mask, logits, -inf), -1)`` with rows that mask everything all 0 (not NaN).

    Such a row gets logits 0 before the softmax (finite: no NaN forward or backward) and its
    probabilities are zeroed after it, so its gradient is exactly 0. Plain aten ops (autograd,
    double backward, torch.compile). A few (M, N) element-wise ops: nothing next to the GEMMs."""
    keep_any = mask.any(dim=-1, keepdim=True)
    fill = torch.where(keep_any, float("-inf"), 0.0).to(logits.dtype)
    probs = torch.softmax(torch.where(mask, logits, fill), dim=-1)
    return probs.masked_fill(~mask, 0.0)


def fusion_torch_backward(grad_out, grad_probs, probs, xd, xq, w_down, b_down, w_query, b_query, w_out,
                          segments, activations, temperature, dropout_p, seed, keep_mask, logit_shift, needs,
                          adapter_mask=None):
    """The op's backward by autograd through :func:`fusion_torch` (a slow oracle for kernel backwards)."""
    with torch.enable_grad():
        res = torch.zeros(xd.shape[0], w_out.shape[0], dtype=xd.dtype, device=xd.device)
        given = dict(xd=xd, xq=xq, residual=res, w_down=w_down, b_down=b_down, w_query=w_query, b_query=b_query,
                     w_out=w_out, logit_shift=logit_shift)
        leaves = [None if given[n] is None else given[n].detach().requires_grad_(True) for n in FUSION_GRADS]
        x = dict(zip(FUSION_GRADS, leaves))
        out, p = fusion_torch(x["xd"], x["xq"], x["residual"], x["w_down"], x["b_down"], x["w_query"], x["b_query"],
                              x["w_out"], segments, activations, temperature, dropout_p, seed, keep_mask,
                              x["logit_shift"], adapter_mask)
        inputs = [t for t in leaves if t is not None]
        outs, grads_in = [out], [grad_out]
        if grad_probs is not None:
            outs.append(p)
            grads_in.append(grad_probs)
        got = torch.autograd.grad(outs, inputs, grads_in, allow_unused=True)
    it = iter(got)
    result = []
    for i, t in enumerate(leaves):
        g = next(it) if t is not None else None
        if g is None or not needs[i]:
            g = torch.empty(0, dtype=xd.dtype, device=xd.device)
        result.append(g)
    return tuple(result)


_LIB.define("fusion_torch" + FUSION_SCHEMA)
_LIB.impl("fusion_torch", fusion_torch, "CompositeImplicitAutograd")
