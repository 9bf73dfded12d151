"""float32 GEMMs by oneDNN's matmul on x86 CPUs, for the training paths (the fold's backward products,
the torch backend's training GEMM2).

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

__all__ = ["HAS_ONEDNN", "onednn_linear", "onednn_mm"]

HAS_ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
              and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.t()`` (w: (N, K)) by oneDNN's matmul."""
    return torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` by oneDNN's matmul (its inner product on the (N, K) weight ``b.t()``)."""
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), None, "none", [], "")
