"""``fusedadapter::fusion_triton_grouped``: several fusions' row groups in one launch of each Triton
kernel (multi-task serving and training, issue 16; punica's SGMV pattern for AdapterFusion).

A call holds G row groups, each a fusion of its own (its R, N, activations, temperature, the xd
columns it reads, its rows of the packed weights: :data:`GROUP_FIELDS`). Launches, whatever G::

    forward   _fwd_gemm1_kernel GROUPED   grid (row blocks of the largest group, G)
              _fwd_gemm2_kernel GROUPED   grid (row blocks, H blocks, G)
    backward  _bwd_epilogue_kernel GROUPED   grid (row blocks, G): G = [dzp | dy | dlogit] and
                                             Wmix = [p (x) z | p] in each group's own columns
              _mm_kernel GROUPED (<= 7)    one GEMM per group per launch (split-K over its rows):
                                           dX = G @ [w_down; w_query] rows, dW = G.T @ X,
                                           dw_out = dO.T @ Wmix, the bias sums G.T @ 1

Each group's rows are what ``fusion_triton`` gives that group alone (bitwise in the interpreter,
dropout draws included: a group's draw is keyed on its own rows from 0 and its own seed), forward
and backward. The kernels live in :mod:`fusedadapter.kernels.fusion`; this module is the host side.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch
import triton

from ..ops import _LIB, acc_dtype, check_on_xd_device
from . import configs as _configs
from . import fusion as _fusion  # (_fusion._check_device looked up per call: tests spy on it)
from .fusion import (_BWD1, _FWD1, _FWD2, _M32, _MM, _TL_DTYPE, GEMM2, SPLIT_WEIGHTS_QUERY, _c, _dot_weight,
                     _lowbias32_int, _new, _split, keep_threshold, split_plan)

__all__ = ["fusion_triton_grouped", "fusion_triton_grouped_backward", "check_grouped_args", "GROUP_FIELDS",
           "GROUPED_GRADS", "GROUPED_OP"]

# One int64 row per row group of fusion_triton_grouped's ``groups`` (GROUPED kernels): its first
# row and row count, the first column and width of xd it reads, its first row of the packed
# w_down / b_down (and of the column tables), its first row of w_query / b_query (and column of
# w_out), its bottleneck width R and adapter count N.
GROUP_FIELDS = ("row0", "rows", "xd_col", "kd", "w_row", "q_row", "r", "n")
_GROUP_TABLES: Dict[tuple, tuple] = {}


def _group_tables(groups: List[int], segments: List[int], activations: List[int], temperatures: List[float],
                  n_rows_w: int, device: torch.device):
    """(group table (G, 8) int64, temperatures (G, 2) fp32 hi/lo, segment ids and activation codes per
    packed w_down row (int32), the set of activation codes) on ``device``, cached per call layout."""
    key = (tuple(groups), tuple(segments), tuple(activations), tuple(temperatures), n_rows_w, str(device))
    hit = _GROUP_TABLES.get(key)
    if hit is None:
        seg = [0] * max(n_rows_w, 1)
        code = [0] * max(n_rows_w, 1)
        s0 = a0 = 0
        for gi in range(len(groups) // 8):
            w_row, n = groups[gi * 8 + 4], groups[gi * 8 + 7]
            bounds, acts = segments[s0:s0 + n + 1], activations[a0:a0 + n]
            s0, a0 = s0 + n + 1, a0 + n
            for i, a in enumerate(acts):
                for c in range(bounds[i], bounds[i + 1]):
                    seg[w_row + c] = i
                    code[w_row + c] = a
        temps = [half for t in temperatures for half in _split(float(t))]
        hit = (torch.tensor(groups, dtype=torch.int64, device=device).view(-1, 8),
               torch.tensor(temps, dtype=torch.float32, device=device),
               torch.tensor(seg, dtype=torch.int32, device=device), torch.tensor(code, dtype=torch.int32, device=device),
               set(activations))
        if len(_GROUP_TABLES) > 256:
            _GROUP_TABLES.clear()
        _GROUP_TABLES[key] = hit
    return hit


def check_grouped_args(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, groups, segments, activations,
                       temperatures, adapter_mask=None, dropout_p=0.0, seeds=(), keep_mask=None, logit_shift=None):
    """Validate fusion_triton_grouped's arguments (clear errors naming what was expected); returns
    (G, per-group (row0, rows, xd_col, kd, w_row, q_row, r, n) tuples)."""
    where = "fusion_triton_grouped"
    if len(groups) % 8 or not groups:
        raise ValueError(f"{where}: groups must hold 8 ints per row group {GROUP_FIELDS}, got {len(groups)} ints")
    g = len(groups) // 8
    rows = [tuple(int(v) for v in groups[i * 8:(i + 1) * 8]) for i in range(g)]
    if len(temperatures) != g:
        raise ValueError(f"{where}: one temperature per row group ({g}), got {len(temperatures)}")
    if any(not (float(t) > 0.0) for t in temperatures):
        raise ValueError(f"{where}: every temperature must be > 0, got {list(temperatures)}")
    w_rows = sorted((r[4], r[4] + r[6]) for r in rows)
    if any(b[0] < a[1] for a, b in zip(w_rows, w_rows[1:])):
        raise ValueError(f"{where}: groups' w_down rows [w_row, w_row + R) must be disjoint (each row's segment "
                         f"and activation tables are the group's own), got {w_rows}")
    q_rows = sorted((r[5], r[5] + r[6] + r[7]) for r in rows)
    if any(b[0] < a[1] for a, b in zip(q_rows, q_rows[1:])):
        raise ValueError(f"{where}: groups' w_query rows [q_row, q_row + R + N) must be disjoint (the backward "
                         f"writes each group's weight gradients into its own rows), got {q_rows}")
    if sum(r[7] for r in rows) != len(activations) or sum(r[7] + 1 for r in rows) != len(segments):
        raise ValueError(f"{where}: activations must hold each group's N codes and segments each group's N + 1 "
                         f"bounds, concatenated (groups' N {[r[7] for r in rows]}); got {len(activations)} and "
                         f"{len(segments)}")
    if xd.dim() != 2 or w_down.dim() != 2 or w_query.dim() != 2 or w_out.dim() != 2:
        raise ValueError(f"{where}: xd, w_down, w_query, w_out must be 2-D")
    check_on_xd_device(where, xd, xq=xq, residual=residual, w_down=w_down, b_down=b_down, w_query=w_query,
                       b_query=b_query, w_out=w_out, adapter_mask=adapter_mask, keep_mask=keep_mask,
                       logit_shift=logit_shift)
    m, h = xd.shape[0], w_out.shape[0]
    kq = (xq if xq is not None else xd).shape[1]
    if xq is not None and (xq.dim() != 2 or xq.shape[0] != m):
        raise ValueError(f"{where}: xq must be ({m}, K), got {tuple(xq.shape)}")
    if residual is not None and tuple(residual.shape) != (m, h):
        raise ValueError(f"{where}: residual must be ({m}, {h}), got {tuple(residual.shape)}")
    if w_query.shape[1] != kq or w_query.shape[0] != w_out.shape[1]:
        raise ValueError(f"{where}: w_query must be (rows of w_out's columns {w_out.shape[1]}, {kq}), got "
                         f"{tuple(w_query.shape)}")
    for name, b, n_rows in (("b_down", b_down, w_down.shape[0]), ("b_query", b_query, w_query.shape[0])):
        if b is not None and tuple(b.shape) != (n_rows,):
            raise ValueError(f"{where}: {name} must be ({n_rows},), got {tuple(b.shape)}")
    dts = {t.dtype for t in (w_down, w_query, w_out) + tuple(t for t in (b_down, b_query) if t is not None)}
    if dts != {acc_dtype(xd.dtype)}:
        raise TypeError(f"{where}: weights must be {acc_dtype(xd.dtype)} for {xd.dtype} activations, got {dts}")
    for t in (xq, residual):
        if t is not None and t.dtype != xd.dtype:
            raise TypeError(f"{where}: xq and residual must be {xd.dtype}, got {t.dtype}")
    end = 0
    for i, (row0, n_rows, xd_col, kd, w_row, q_row, r, n) in enumerate(sorted(rows)):
        if row0 < end or n_rows < 1 or row0 + n_rows > m:
            raise ValueError(f"{where}: row groups must be non-empty, inside the {m} rows and disjoint, got {rows}")
        end = row0 + n_rows
        if n < 1 or xd_col < 0 or kd < 1 or xd_col + kd > xd.shape[1] or kd > w_down.shape[1]:
            raise ValueError(f"{where}: group {i}: xd columns {xd_col}..{xd_col + kd} outside xd ({xd.shape[1]}) "
                             f"or w_down ({w_down.shape[1]}), or no adapters")
        if xq is None and (xd_col != 0 or kd != kq):
            raise ValueError(f"{where}: without xq every group reads all of xd (the query half reads it too)")
        if w_row < 0 or w_row + r > w_down.shape[0] or q_row < 0 or q_row + r + n > w_query.shape[0]:
            raise ValueError(f"{where}: group {i}: rows w_down[{w_row}:{w_row + r}] / w_query[{q_row}:"
                             f"{q_row + r + n}] outside the packed weights {tuple(w_down.shape)} / "
                             f"{tuple(w_query.shape)}")
    n_max = max(r[7] for r in rows)
    if adapter_mask is not None and (adapter_mask.dtype != torch.bool or tuple(adapter_mask.shape) != (m, n_max)):
        raise ValueError(f"{where}: adapter_mask must be a bool ({m}, {n_max}) tensor (each row's group's adapters "
                         f"first), got {adapter_mask.dtype} {tuple(adapter_mask.shape)}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{where}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0 and keep_mask is None and len(seeds) != g:
        raise ValueError(f"{where}: with dropout_p > 0 and no keep_mask, one seed per row group ({g}), got "
                         f"{len(seeds)}")
    if keep_mask is not None and (keep_mask.dtype != torch.bool or tuple(keep_mask.shape) != (m, n_max)):
        raise ValueError(f"{where}: keep_mask must be a bool ({m}, {n_max}) tensor (each row's group's adapters "
                         f"first), got {keep_mask.dtype} {tuple(keep_mask.shape)}")
    if logit_shift is not None and (tuple(logit_shift.shape) != (m,) or logit_shift.dtype != acc_dtype(xd.dtype)):
        raise ValueError(f"{where}: logit_shift must be a {acc_dtype(xd.dtype)} ({m},) tensor, got "
                         f"{logit_shift.dtype} {tuple(logit_shift.shape)}")
    # each group's segments: 0 = s_0 <= s_1 <= ... <= s_N = R
    s0 = 0
    for i, row in enumerate(rows):
        bounds = [int(b) for b in segments[s0:s0 + row[7] + 1]]
        s0 += row[7] + 1
        if bounds[0] != 0 or bounds[-1] != row[6] or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"{where}: group {i}: segments {bounds} must rise from 0 to its R = {row[6]}")
    return g, rows


class _Dropout:
    """The logit-dropout constants of one grouped call (forward and backward alike)."""

    def __init__(self, dropout_p: float, seeds: Sequence[int], keep_mask, device):
        self.on = dropout_p > 0.0
        self.has_keep = self.on and keep_mask is not None
        self.keep = keep_mask.contiguous().view(torch.uint8) if self.has_keep else None
        # one seed hash per group (the kernels key a group's draw on its own rows and seed)
        self.seeds = (torch.tensor([_lowbias32_int(int(s) & _M32) for s in seeds], dtype=torch.int64, device=device)
                      if self.on and not self.has_keep else None)
        self.thr = keep_threshold(float(dropout_p)) if self.on else 0
        self.hi, self.lo = _split(1.0 / (1.0 - dropout_p)) if self.on else (1.0, 0.0)


def _guard(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _meta(xd, activations, uniq, n_max):
    return dict(ACT_MASK=sum(1 << c for c in uniq), UNIFORM_ACT=activations[0] if len(uniq) == 1 else -1,
                ACC=_TL_DTYPE[acc_dtype(xd.dtype)], DOT=_TL_DTYPE[xd.dtype], N_PAD=_configs.n_pad(n_max),
                SPLIT_WD=False)


def _checked(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, groups, segments, activations, temperatures,
             *rest):
    """The call's lists as ints / floats, checked (:func:`check_grouped_args`): (groups, segments,
    activations, temperatures, G, per-group rows)."""
    groups, segments = [int(v) for v in groups], [int(v) for v in segments]
    activations, temperatures = [int(v) for v in activations], [float(t) for t in temperatures]
    g, rows = check_grouped_args(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, groups, segments,
                                 activations, temperatures, *rest)
    return groups, segments, activations, temperatures, g, rows


def fusion_triton_grouped(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, groups, segments,
                          activations, temperatures, adapter_mask=None, dropout_p=0.0, seeds=(), keep_mask=None,
                          logit_shift=None):
    """Forward of ``fusedadapter::fusion_triton_grouped``: G row groups, each through its own fusion,
    in one launch of each forward kernel.

    Semantics::

        out = empty(M, H); probs = empty(M, max N)       # rows in no group, and probs[t, N:], stay unwritten
        for g, (row0, rows, xd_col, kd, w_row, q_row, R, N) in groups (8 ints each, GROUP_FIELDS):
            t = row0 .. row0 + rows
            out[t], probs[t, :N] = fusion_triton(
                xd[t, xd_col:xd_col + kd], xq[t] (None: xd[t]), residual[t],
                w_down[w_row:w_row + R, :kd], b_down[w_row:w_row + R],
                w_query[q_row:q_row + R + N], b_query[q_row:q_row + R + N], w_out[:, q_row:q_row + R + N],
                segments (group g's N + 1), activations (group g's N), temperatures[g],
                dropout_p, seeds[g], keep_mask[t, :N], logit_shift[t], adapter_mask=adapter_mask[t, :N])

    Grid: (blocks of the largest group, G) for GEMM1, (..., H blocks, G) for GEMM2; a block past its
    group's rows does no work.
    """
    groups, segments, activations, temperatures, g, rows = _checked(
        xd, xq, residual, w_down, b_down, w_query, b_query, w_out, groups, segments, activations, temperatures,
        adapter_mask, dropout_p, seeds, keep_mask, logit_shift)
    _fusion._check_device(xd.device, xd.dtype)  # (here: tests spy on which function called it)
    if xd.dtype not in _TL_DTYPE:
        raise TypeError(f"fusion_triton_grouped: unsupported activation dtype {xd.dtype} "
                        f"(float16, bfloat16, float32, float64)")
    acc = acc_dtype(xd.dtype)
    m, h = xd.shape[0], w_out.shape[0]
    r_max, n_max = max(r[6] for r in rows), max(r[7] for r in rows)
    out = _new((m, h), xd.dtype, xd.device)
    probs = _new((m, n_max), acc, xd.device)
    table, temps, segid, codes, uniq = _group_tables(groups, segments, activations, temperatures, w_down.shape[0],
                                                     xd.device)
    drop = _Dropout(float(dropout_p), seeds, keep_mask, xd.device)
    xd, residual, w_down, b_down, w_query, b_query, w_out = map(_c, (xd, residual, w_down, b_down, w_query, b_query,
                                                                     w_out))
    x_q = xd if xq is None else xq.contiguous()
    shift = _c(logit_shift) if drop.on else None
    z = _new((m, r_max), xd.dtype, xd.device)
    max_rows = max(r[1] for r in rows)
    mk = _configs.token_key(max_rows)
    meta = dict(_meta(xd, activations, uniq, n_max), SPLIT_WQ=xd.dtype in SPLIT_WEIGHTS_QUERY)
    p_once = GEMM2 == "v2" and xd.dtype in (torch.float16, torch.bfloat16)
    wd_k = _dot_weight(w_down, xd.dtype, False)
    wq_k = _dot_weight(w_query, xd.dtype, meta["SPLIT_WQ"])
    wo_k = _dot_weight(w_out, xd.dtype, False, precast=True if p_once else None)
    amask = adapter_mask.contiguous().view(torch.uint8) if adapter_mask is not None else None
    dummy = segid
    with _guard(xd.device):
        _FWD1(lambda META: (triton.cdiv(max_rows, META["BLOCK_M"]), g),
              xd, x_q, wd_k, b_down if b_down is not None else dummy, wq_k, b_query if b_query is not None else dummy,
              shift if shift is not None else dummy, drop.keep if drop.has_keep else dummy,
              amask if amask is not None else dummy, segid, codes, z, probs, table, temps,
              drop.seeds if drop.seeds is not None else dummy,
              m, max(r[3] for r in rows), x_q.shape[1], r_max, n_max, 0, drop.thr, drop.hi, drop.lo, 1.0, 0.0,
              xd.stride(0), x_q.stride(0), w_down.stride(0), w_query.stride(0), z.stride(0), probs.stride(0), 0, mk,
              HAS_XQ=xq is not None, HAS_BD=b_down is not None, HAS_BQ=b_query is not None,
              HAS_SHIFT=shift is not None, DROPOUT=drop.on, HAS_KEEP=drop.has_keep, HAS_AMASK=amask is not None,
              PRESPLIT_WQ=False, GROUPED=True, **meta)
        if h > 0:
            _FWD2(lambda META: (triton.cdiv(max_rows, META["BLOCK_M"]), triton.cdiv(h, META["BLOCK_H"]), g),
                  z, probs, segid, wo_k, residual if residual is not None else out, out, table,
                  m, h, r_max, n_max, z.stride(0), probs.stride(0), w_out.stride(0),
                  residual.stride(0) if residual is not None else 0, out.stride(0), mk, HAS_RES=residual is not None,
                  ACC=meta["ACC"], DOT=meta["DOT"], P_ONCE=p_once, N_PAD=meta["N_PAD"], GROUPED=True)
    return out, probs


# The grouped op's arguments that take a gradient, in the order the backward returns them.
GROUPED_GRADS = ("xd", "xq", "residual", "w_down", "b_down", "w_query", "b_query", "w_out", "logit_shift")


class _GroupedGemms:
    """The backward's per-group GEMMs, launched kind by kind (one launch per kind, all groups): each
    kind's table rows (a_off, b_off, c_off, M, N, K) go to the device in one copy for the call."""

    def __init__(self, device):
        self.device = device
        self.kinds: List[tuple] = []

    def add(self, a, b, out_shape, strides, entries, out_dtype, dot, split_k=False):
        """C (``out_shape``, zeroed) with C[c_off + i*cm + j*cn] = sum_k A[a_off + i*am + k*ak] *
        B[b_off + k*bk + j*bn] per group entry; ``strides`` = (am, ak, bk, bn, cm, cn)."""
        self.kinds.append((a, b, tuple(out_shape), strides, [tuple(int(v) for v in e) for e in entries], out_dtype,
                           dot, split_k))
        return len(self.kinds) - 1

    def run(self) -> List[torch.Tensor]:
        flat = [v for k in self.kinds for e in k[4] for v in e]
        tabs = torch.tensor(flat, dtype=torch.int64, device=self.device)
        outs, at = [], 0
        for a, b, shape, (am, ak, bk, bn, cm, cn), entries, out_dtype, dot, split_k in self.kinds:
            g = len(entries)
            m_max, n_max, k_max = (max(e[i] for e in entries) for i in (3, 4, 5))
            splits, chunk = split_plan(m_max, n_max, k_max, self.device, tiles=g) if split_k else (1, k_max)
            acc = acc_dtype(dot)
            c = torch.zeros((splits, *shape), dtype=acc if splits > 1 else out_dtype, device=self.device)
            numel = c[0].numel()  # (M, N, K below: the largest group's, the autotune key's N)
            if m_max and n_max and k_max:
                _MM(lambda META: (triton.cdiv(m_max, META["BLOCK_M"]), triton.cdiv(n_max, META["BLOCK_N"]),
                                  g * splits),
                    a, b, c, tabs[at:at + 6 * g], m_max, n_max, k_max, chunk, splits, am, ak, bk, bn, numel, cm, cn,
                    _configs.token_key(m_max), _configs.token_key(k_max), ACC=_TL_DTYPE[acc], DOT=_TL_DTYPE[dot],
                    GROUPED=True)
            at += 6 * g
            outs.append(c[0] if splits == 1 else c.sum(0).to(out_dtype))
        return outs


def fusion_triton_grouped_backward(grad_out, grad_probs, probs, xd, xq, w_down, b_down, w_query, b_query, w_out,
                                   groups, segments, activations, temperatures, dropout_p, seeds, keep_mask,
                                   logit_shift, needs):
    """Backward of ``fusedadapter::fusion_triton_grouped``: gradients in :data:`GROUPED_GRADS` order
    (None where ``needs``, in that order, is False). Each group's slice of every gradient is what
    ``fusion_triton_backward`` gives the group alone; rows in no group, and packed weight entries no
    group reads (w_down's padding columns), get 0. The adapter mask needs no argument: it is in the
    saved ``probs`` (0 where masked)."""
    groups, segments, activations, temperatures, g, rows = _checked(
        xd, xq, None, w_down, b_down, w_query, b_query, w_out, groups, segments, activations, temperatures, None,
        dropout_p, seeds, keep_mask, logit_shift)
    _fusion._check_device(xd.device, xd.dtype)
    need = dict(zip(GROUPED_GRADS, (bool(x) for x in needs)))
    dt, acc, dev = xd.dtype, acc_dtype(xd.dtype), xd.device
    m, h = xd.shape[0], w_out.shape[0]
    r_max, n_max = max(r[6] for r in rows), max(r[7] for r in rows)
    grads: Dict[str, Optional[torch.Tensor]] = dict.fromkeys(GROUPED_GRADS)
    if need["residual"]:  # d residual = dO on the rows a group writes, 0 elsewhere
        grads["residual"] = torch.zeros_like(grad_out)
        for row0, n_rows, *_ in rows:
            grads["residual"][row0:row0 + n_rows] = grad_out[row0:row0 + n_rows]
    drop = _Dropout(float(dropout_p), seeds, keep_mask, dev)
    need_g = any(need[k] for k in ("xd", "xq", "w_down", "b_down", "w_query", "b_query"))
    need_wm = need["w_out"]
    need_ds = need["logit_shift"] and drop.on and logit_shift is not None
    if need["logit_shift"] and logit_shift is not None and not need_ds:  # without dropout the shift cancels
        grads["logit_shift"] = torch.zeros_like(logit_shift)
    if not (need_g or need_wm or need_ds):
        return tuple(grads[k] for k in GROUPED_GRADS)

    table, temps, segid, codes, uniq = _group_tables(groups, segments, activations, temperatures, w_down.shape[0],
                                                     dev)
    xd, w_down, b_down, w_query, b_query, w_out, probs = map(_c, (xd, w_down, b_down, w_query, b_query, w_out, probs))
    grad_out = grad_out.contiguous()
    x_q = xd if xq is None else xq.contiguous()
    gp = None if grad_probs is None else grad_probs.to(acc).contiguous()
    gbuf = _new((m, 2 * r_max + n_max), acc, dev) if need_g else None
    wm = _new((m, r_max + n_max), dt, dev) if need_wm else None
    dshift = torch.zeros((m,), dtype=acc, device=dev) if need_ds else None
    max_rows = max(r[1] for r in rows)
    dummy = segid
    with _guard(dev):
        _BWD1(lambda META: (triton.cdiv(max_rows, META["BLOCK_M"]), g),
              grad_out, gp if gp is not None else dummy, probs, xd, x_q, _dot_weight(w_down, dt, False),
              b_down if b_down is not None else dummy, _dot_weight(w_query, dt, False),
              b_query if b_query is not None else dummy, _dot_weight(w_out, dt, False),
              drop.keep if drop.has_keep else dummy, segid, codes, gbuf if gbuf is not None else dummy,
              wm if wm is not None else dummy, dshift if dshift is not None else dummy, table, temps,
              drop.seeds if drop.seeds is not None else dummy,
              m, max(r[3] for r in rows), x_q.shape[1], h, r_max, n_max, 0, drop.thr, drop.hi, drop.lo, 1.0, 0.0,
              grad_out.stride(0), xd.stride(0), x_q.stride(0), w_down.stride(0), w_query.stride(0),
              w_out.stride(0), gbuf.stride(0) if gbuf is not None else 0, wm.stride(0) if wm is not None else 0,
              probs.stride(0), _configs.token_key(max_rows),
              HAS_XQ=xq is not None, HAS_BD=b_down is not None, HAS_BQ=b_query is not None, HAS_GP=gp is not None,
              DROPOUT=drop.on, HAS_KEEP=drop.has_keep, STORE_G=need_g, STORE_WM=need_wm, STORE_DSHIFT=need_ds,
              GROUPED=True, **dict(_meta(xd, activations, uniq, n_max), SPLIT_WQ=False))

        mm = _GroupedGemms(dev)
        sg = gbuf.stride(0) if gbuf is not None else 0
        kdt, kq, kdm, rq = xd.shape[1], x_q.shape[1], w_down.shape[1], w_query.shape[0]
        # per group: A = G's columns, B = the packed weight rows or the group's inputs (strides shared)
        dx_down = [(r0 * sg, wr * kdm, r0 * kdt + col, n_rows, kd, r) for r0, n_rows, col, kd, wr, qr, r, n in rows]
        dx_query = [(r0 * sg + r, qr * kq, r0 * kq, n_rows, kq, r + n) for r0, n_rows, col, kd, wr, qr, r, n in rows]
        at = {}
        if need["xd"]:
            # xd feeds both halves when xq is None: the two GEMMs' sums in the accumulation dtype, rounded once
            both = xq is None
            at["xd"] = mm.add(gbuf, w_down, (m, kdt), (sg, 1, kdm, 1, kdt, 1), dx_down, acc if both else dt, dt)
            if both:
                at["xd+"] = mm.add(gbuf, w_query, (m, kq), (sg, 1, kq, 1, kq, 1), dx_query, acc, dt)
        if need["xq"] and xq is not None:
            at["xq"] = mm.add(gbuf, w_query, (m, kq), (sg, 1, kq, 1, kq, 1), dx_query, dt, dt)
        if need["w_down"]:
            at["w_down"] = mm.add(gbuf, xd, tuple(w_down.shape), (1, sg, kdt, 1, kdm, 1),
                                  [(r0 * sg, r0 * kdt + col, wr * kdm, r, kd, n_rows)
                                   for r0, n_rows, col, kd, wr, qr, r, n in rows], acc, dt, split_k=True)
        ones = torch.ones((max_rows, 1), dtype=acc, device=dev) if (need["b_down"] or need["b_query"]) else None
        if need["b_down"] and b_down is not None:  # G.T @ 1 over the group's rows, in the accumulation dtype
            at["b_down"] = mm.add(gbuf, ones, (b_down.shape[0], 1), (1, sg, 1, 1, 1, 1),
                                  [(r0 * sg, 0, wr, r, 1, n_rows) for r0, n_rows, col, kd, wr, qr, r, n in rows],
                                  acc, acc, split_k=True)
        if need["w_query"]:
            at["w_query"] = mm.add(gbuf, x_q, tuple(w_query.shape), (1, sg, kq, 1, kq, 1),
                                   [(r0 * sg + r, r0 * kq, qr * kq, r + n, kq, n_rows)
                                    for r0, n_rows, col, kd, wr, qr, r, n in rows], acc, dt, split_k=True)
        if need["b_query"] and b_query is not None:
            at["b_query"] = mm.add(gbuf, ones, (rq, 1), (1, sg, 1, 1, 1, 1),
                                   [(r0 * sg + r, 0, qr, r + n, 1, n_rows) for r0, n_rows, col, kd, wr, qr, r, n in rows],
                                   acc, acc, split_k=True)
        if need["w_out"]:
            swm = wm.stride(0)
            at["w_out"] = mm.add(grad_out, wm, (h, rq), (1, h, swm, 1, rq, 1),
                                 [(r0 * h, r0 * swm, qr, h, r + n, n_rows) for r0, n_rows, col, kd, wr, qr, r, n in rows],
                                 acc, dt, split_k=True)
        outs = mm.run() if mm.kinds else []
    for name, i in at.items():
        if name == "xd+":
            continue
        t = outs[i]
        if name == "xd" and "xd+" in at:
            t = (t + outs[at["xd+"]]).to(dt)
        if name in ("b_down", "b_query"):
            t = t.view(-1)
        grads[name] = t
    if need_ds:
        grads["logit_shift"] = dshift
    return tuple(grads[k] for k in GROUPED_GRADS)


def _grouped_fake(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, groups, segments, activations,
                  temperatures, adapter_mask=None, dropout_p=0.0, seeds=(), keep_mask=None, logit_shift=None):
    n_max = max(int(v) for v in list(groups)[7::8]) if len(groups) >= 8 else 0
    return xd.new_empty((xd.shape[0], w_out.shape[0])), xd.new_empty((xd.shape[0], n_max), dtype=acc_dtype(xd.dtype))


GROUPED_SCHEMA = ("(Tensor xd, Tensor? xq, Tensor? residual, Tensor w_down, Tensor? b_down, Tensor w_query, "
                  "Tensor? b_query, Tensor w_out, int[] groups, int[] segments, int[] activations, "
                  "float[] temperatures, Tensor? adapter_mask=None, float dropout_p=0.0, int[] seeds=[], "
                  "Tensor? keep_mask=None, Tensor? logit_shift=None) -> (Tensor, Tensor)")
_ARGS = ("xd", "xq", "residual", "w_down", "b_down", "w_query", "b_query", "w_out", "groups", "segments",
         "activations", "temperatures", "adapter_mask", "dropout_p", "seeds", "keep_mask", "logit_shift")
_LIB.define("fusion_triton_grouped" + GROUPED_SCHEMA)
for _key in ("CUDA", "CPU"):
    _LIB.impl("fusion_triton_grouped", fusion_triton_grouped, _key)
torch.library.register_fake("fusedadapter::fusion_triton_grouped", _grouped_fake, lib=_LIB)


def _setup_context(ctx, inputs, output):
    a = dict(zip(_ARGS, inputs))
    ctx.save_for_backward(a["xd"], a["xq"], a["w_down"], a["b_down"], a["w_query"], a["b_query"], a["w_out"],
                          a.get("keep_mask"), a.get("logit_shift"), output[1])
    ctx.static = (list(a["groups"]), list(a["segments"]), list(a["activations"]), list(a["temperatures"]),
                  float(a.get("dropout_p", 0.0)), list(a.get("seeds", ())))
    ctx.has_res = a["residual"] is not None


def _backward(ctx, grad_out, grad_probs):
    xd, xq, w_down, b_down, w_query, b_query, w_out, keep_mask, logit_shift, probs = ctx.saved_tensors
    groups, segments, activations, temperatures, dropout_p, seeds = ctx.static
    wanted = dict(zip(_ARGS, ctx.needs_input_grad))  # (trailing defaults may be dropped: shorter)
    given = dict(xq=xq is not None, residual=ctx.has_res, b_down=b_down is not None, b_query=b_query is not None,
                 logit_shift=logit_shift is not None)
    needs = [bool(wanted.get(k, False)) and given.get(k, True) for k in GROUPED_GRADS]
    if grad_out is None:
        grad_out = torch.zeros(xd.shape[0], w_out.shape[0], dtype=xd.dtype, device=xd.device)
    grads = dict(zip(GROUPED_GRADS, fusion_triton_grouped_backward(
        grad_out, grad_probs, probs, xd, xq, w_down, b_down, w_query, b_query, w_out, groups, segments, activations,
        temperatures, dropout_p, seeds, keep_mask, logit_shift, needs)))
    return tuple(grads.get(k) for k in _ARGS)


torch.library.register_autograd("fusedadapter::fusion_triton_grouped", _backward, setup_context=_setup_context,
                                lib=_LIB)
GROUPED_OP = torch.ops.fusedadapter.fusion_triton_grouped
