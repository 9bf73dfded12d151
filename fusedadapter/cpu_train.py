"""The ``cpu`` backend's training call: ``fusedadapter::fusion_cpu_train`` (the op's forward, also
returning GEMM1's output ``[zp | t]``, (M, 2R+N) in the accumulation dtype) and
``fusion_cpu_train_backward`` (the backward differentiating that output instead of recomputing GEMM1),
tied by the forward op's autograd formula (as kernel_ops ties every backend's pair).
:func:`fusedadapter.runner._call_op` runs it instead of ``fusion_cpu`` when a call trains (autograd
on, some argument requiring grad, outside torch.compile and export, which trace ``fusion_cpu`` with
its registered autograd formula).

Why: ``fusion_cpu_backward`` recomputes GEMM1 (M·H·(2R+N) multiply-adds: about a quarter of the
backward's arithmetic, on ATen's or oneDNN's GEMM where the forward ran the packed AVX-512 kernel),
so it also differentiates a recomputed, differently rounded p. Saved, GEMM1's output costs M·(2R+N)
elements (3.0 MiB at 1024 tokens, H=768, N=8, r=48). The forward's arithmetic and outputs are
fusion_cpu's, bit for bit. One site's training step (H=768, N=8, r=48, fp32, 1 thread, interleaved,
15 repeats, the backward's products on oneDNN): 1.03x-1.05x the torch backend's speed from 16 to 1024
tokens, where the recomputing backward with ATen's products ran 0.74x-0.96x (the pair with ATen's:
0.85x-0.97x); no site of the precision survey moves across the §4 bound
(benchmarks/results/cpu-amd-epyc-avx512-2core/train-precision-default/). On the small-M kernel's rows
the kept output is GEMM1 as ATen computes it (csrc/fusion_cpu.cpp says why).
"""

from __future__ import annotations

import torch

from .kernel_ops import TRAINING_PATHS, _fusion_backward_fake, _fusion_fake, op_backward, save_op_inputs
from .ops import acc_dtype

__all__ = ["register", "fusion_cpu_train", "trains_as_measured"]

# The extension's configuration when it loaded (register): does it train as the dispatch table's
# training rows for the cpu backend were measured, its backward's float32 products on oneDNN
# (AVX-512 active, torch's oneDNN matmul present, FUSEDADAPTER_CPU_ONEDNN not 0)? A plain bool, read
# by dispatch per training call (also inside torch.compile: no op call there).
_AS_MEASURED = False


def _train_fake(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations,
                temperature=1.0, dropout_p=0.0, seed=0, keep_mask=None, logit_shift=None, adapter_mask=None):
    out, probs = _fusion_fake(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations)
    gemm1 = xd.new_empty((xd.shape[0], 2 * segments[-1] + len(activations)), dtype=acc_dtype(xd.dtype))
    return out, probs, gemm1


def _train_backward_fake(grad_out, grad_probs, probs, gemm1, *rest, **kw):
    return _fusion_backward_fake(grad_out, grad_probs, probs, *rest, **kw)


def fusion_cpu_train(*args):
    """``fusion_cpu(*args)`` for a training call (the op's positional arguments, FUSION_ARGS order):
    (out, probs), GEMM1's output kept by autograd for the backward."""
    return torch.ops.fusedadapter.fusion_cpu_train(*args)[:2]


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[2])
    save_op_inputs(ctx, inputs, output[1], output[2])


def _backward(ctx, grad_out, grad_probs, _grad_gemm1):
    return op_backward(ctx, torch.ops.fusedadapter.fusion_cpu_train_backward, grad_out, grad_probs)


def register(lib) -> None:
    """Fakes and the autograd formula of the C++ training pair (defined by the cpu extension), and the training path of
    ``fusion_cpu`` (kernel_ops.TRAINING_PATHS); ``lib``: the namespace's FRAGMENT library."""
    torch.library.register_fake("fusedadapter::fusion_cpu_train", _train_fake, lib=lib)
    torch.library.register_fake("fusedadapter::fusion_cpu_train_backward", _train_backward_fake, lib=lib)
    torch.library.register_autograd("fusedadapter::fusion_cpu_train", _backward, setup_context=_setup_context, lib=lib)
    TRAINING_PATHS[torch.ops.fusedadapter.fusion_cpu.default] = fusion_cpu_train
    global _AS_MEASURED
    cfg = torch.ops.fusedadapter._cpu_config()  # [detected isa, active isa, ..., f32_gemm, ..., oneDNN op, ...]
    _AS_MEASURED = cfg[1] >= 1 and cfg[5] == 2 and cfg[7] == 1


def trains_as_measured() -> bool:
    """See _AS_MEASURED (False before the extension loads)."""
    return _AS_MEASURED
