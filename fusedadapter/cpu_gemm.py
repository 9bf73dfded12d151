"""float32 GEMMs by oneDNN's matmul on x86 CPUs, for the training paths (the fold's backward products,
the torch backend's training GEMM2, the backward products of its training GEMM1 and of the per-token
form's W_Q / W_K / W_V: :func:`onednn_train_linear`).

Why: on x86 CPUs torch's float32 ``mm``/``linear`` go to MKL's sgemm, which runs its AVX2 code on AMD
CPUs (~95 GFLOP/s a core on an AMD EPYC Zen 5), while oneDNN picks AVX-512 from the CPU's features:
2.0-2.2x faster per GEMM at H=768, R+N=392 (benchmarks/results/cpu-amd-epyc-2core-1thread/train_fold/).
The same float32 products, rounded differently (a different summation order); each caller keeps the
aten GEMM under ``create_graph`` (double backward), where the product must stay differentiable.
``torch.ops.mkldnn._linear_pointwise`` is a private op: used only where it exists (``HAS_ONEDNN``).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

__all__ = ["HAS_ONEDNN", "PER_TOKEN_ONEDNN_MIN_ROWS", "onednn_linear", "onednn_mm", "onednn_train_linear", "use_onednn_train"]

HAS_ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))

# The per-token training form's W_Q / W_K / W_V backward products (fusedadapter.runner._run_per_token,
# M x H x H) on oneDNN from this many rows: one site's training step (H=768, N=8, r=48, torch backend,
# 1 thread, interleaved) 0.84x at 4 tokens, 0.81x at 64, 0.75x at 128 / 256; at 1 token the per-site
# precision check put 2 small sites over the bound (d_key.bias), from 3 none. 0 turns it off.
PER_TOKEN_ONEDNN_MIN_ROWS = 4


def onednn_linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.t()`` (w: (N, K)) by oneDNN's matmul."""
    return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` by oneDNN's matmul (its inner product on the (N, K) weight ``b.t()``)."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")


def use_onednn_train(x: torch.Tensor, w: torch.Tensor, min_rows: int) -> bool:
    """Whether a training product ``x @ w^T`` (``x``: (M, K)) takes :func:`onednn_train_linear`: x86 CPU
    float32, ``M >= min_rows`` (0: never), autograd on and outside torch.compile / export (which trace
    the aten ops), and some operand requires grad."""
    # The row count last: under torch.compile / export it is symbolic, and comparing it would add a guard
    # on the token count to the traced graph (an exported model then refused other sequence lengths).
    return (min_rows > 0 and HAS_ONEDNN and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting() and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.device.type == "cpu" and (x.requires_grad or w.requires_grad) and min_rows <= x.shape[0])


class _OnednnLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` (``w``: (N, K)), or ``x @ w + b`` (``transposed``: ``w`` (K, N)), with its
    backward products (``d_x``, ``d_w``) by oneDNN: the autograd formulas of aten's addmm. The forward
    stays aten's GEMM: on oneDNN it put sites over the docs/algorithm.md §4 bound where aten's holds
    them (benchmarks.train_fold_precision, H 256/768: the reference runs the same aten GEMM on the same
    inputs, so its rounding and the fused path's coincide there; oneDNN's differs), the backward did
    not. Saves only what a gradient needs (``x`` for ``w``'s, ``w`` for ``x``'s), as addmm does. Under
    ``create_graph`` (double backward) the backward runs aten's differentiable GEMMs."""

    @staticmethod
    def forward(ctx, x, w, b, transposed):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_w else None, w if need_x else None)
        ctx.transposed, ctx.has_b = transposed, b is not None
        if not transposed:
            return F.linear(x, w, b)
        return x @ w if b is None else torch.addmm(b, x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        tr = ctx.transposed
        dnnl = not torch.is_grad_enabled()  # create_graph: aten's, differentiable
        if dnnl:
            g = g.contiguous()
        d_x = d_w = d_b = None
        if need[0]:  # g @ w (g @ w^T when transposed)
            if dnnl:
                d_x = onednn_linear(g, w if tr else w.t())
            else:
                d_x = g.mm(w.t() if tr else w)
        if need[1]:  # g^T x (x^T g when transposed): w's gradient in w's own layout
            if dnnl:
                d_w = onednn_linear(x.t(), g.t()) if tr else onednn_linear(g.t(), x.t())
            else:
                d_w = x.t().mm(g) if tr else g.t().mm(x)
        if ctx.has_b and need[2]:
            d_b = g.sum(0)
        return d_x, d_w, d_b, None


def onednn_train_linear(x: torch.Tensor, w: torch.Tensor, b=None, transposed: bool = False) -> torch.Tensor:
    """``F.linear(x, w, b)`` (``x @ w + b`` when ``transposed``) for training, its backward products on
    oneDNN (callers check :func:`use_onednn_train` first)."""
    return _OnednnLinear.apply(x, w, b, transposed)
