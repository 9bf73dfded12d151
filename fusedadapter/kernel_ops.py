"""Kernel backends' op plumbing: an opaque forward op, a backward op, a fake (meta) implementation of
each, and the autograd formula tying them together, registered with the schema of
:mod:`fusedadapter.ops`. One helper, so every backend (Triton, the C++ cpu and CUDA extensions) gets
the same plumbing."""

from __future__ import annotations

import torch

from .ops import _LIB, FUSION_ARGS, FUSION_BACKWARD_SCHEMA, FUSION_GRADS, FUSION_SCHEMA, acc_dtype

__all__ = ["register_kernel_op", "save_op_inputs", "op_backward", "TRAINING_PATHS"]

# A kernel backend's op -> the callable a training call (autograd on, some argument requiring grad;
# not while exporting) runs instead, with the op's arguments and results (fusedadapter.runner._call_op;
# the cpu backend's fusedadapter.cpu_train). Filled where a backend is built.
TRAINING_PATHS: dict = {}


# ---------------------------------------------------------------------------------------------
def _fusion_fake(xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations,
                 temperature=1.0, dropout_p=0.0, seed=0, keep_mask=None, logit_shift=None, adapter_mask=None):
    return xd.new_empty((xd.shape[0], w_out.shape[0])), xd.new_empty((xd.shape[0], len(activations)), dtype=acc_dtype(xd.dtype))


def _fusion_backward_fake(grad_out, grad_probs, probs, xd, xq, w_down, b_down, w_query, b_query, w_out,
                          segments, activations, temperature, dropout_p, seed, keep_mask, logit_shift, needs,
                          adapter_mask=None):
    like = dict(xd=xd, xq=xq, residual=grad_out, w_down=w_down, b_down=b_down, w_query=w_query, b_query=b_query,
                w_out=w_out, logit_shift=logit_shift)
    return tuple(like[n].new_empty(like[n].shape) if (like[n] is not None and needs[i]) else xd.new_empty((0,))
                 for i, n in enumerate(FUSION_GRADS))


def register_kernel_op(name: str, forward_impls: dict, backward_impls: dict, lib=None, define: bool = True):
    """Register ``fusedadapter::<name>`` (+ ``<name>_backward``) with the shared schema.

    ``forward_impls``/``backward_impls`` map a dispatch key ("CPU", "CUDA") to a function with the
    schema's signature. ``define=False`` when C++ already defined the ops (then ``lib`` is the
    namespace's "FRAGMENT" library and only fakes and autograd are added here).
    Returns the forward OpOverloadPacket.
    """
    ns = "fusedadapter"
    lib = lib or _LIB
    if define:
        lib.define(name + FUSION_SCHEMA)
        lib.define(name + "_backward" + FUSION_BACKWARD_SCHEMA)
    for key, fn in forward_impls.items():
        lib.impl(name, fn, key)
    for key, fn in backward_impls.items():
        lib.impl(name + "_backward", fn, key)
    qual = f"{ns}::{name}"
    torch.library.register_fake(qual, _fusion_fake, lib=lib)
    torch.library.register_fake(qual + "_backward", _fusion_backward_fake, lib=lib)
    fwd = getattr(torch.ops.fusedadapter, name)
    bwd = getattr(torch.ops.fusedadapter, name + "_backward")

    def setup_context(ctx, inputs, output):
        save_op_inputs(ctx, inputs, output[1])

    def backward(ctx, grad_out, grad_probs):
        return op_backward(ctx, bwd, grad_out, grad_probs)

    torch.library.register_autograd(qual, backward, setup_context=setup_context, lib=lib)
    return fwd


def save_op_inputs(ctx, inputs, probs, *extra) -> None:
    """What the op's backward needs, saved on ``ctx`` (``inputs``: the op's 16 arguments, defaults
    filled in; ``extra``: tensors a backend's backward op takes after ``probs``)."""
    (xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments, activations,
     temperature, dropout_p, seed, keep_mask, logit_shift, adapter_mask) = inputs
    ctx.save_for_backward(xd, xq, w_down, b_down, w_query, b_query, w_out, keep_mask, logit_shift, adapter_mask,
                          probs, *extra)
    ctx.static = (list(segments), list(activations), float(temperature), float(dropout_p), int(seed))
    ctx.has_res = residual is not None


def op_backward(ctx, bwd, grad_out, grad_probs):
    """The op's autograd formula: ``bwd`` (a backward op of FUSION_BACKWARD_SCHEMA, with the extra
    saved tensors of :func:`save_op_inputs` after ``probs``) for the gradients autograd asks for, in
    FUSION_ARGS order (None for arguments without a gradient slot)."""
    xd, xq, w_down, b_down, w_query, b_query, w_out, keep_mask, logit_shift, adapter_mask, probs, *extra = \
        ctx.saved_tensors
    segments, activations, temperature, dropout_p, seed = ctx.static
    # The dispatcher drops trailing arguments equal to their defaults (keep_mask, logit_shift,
    # adapter_mask left None), so needs_input_grad can be shorter than the schema.
    wanted = dict(zip(FUSION_ARGS, ctx.needs_input_grad))
    given = dict(xq=xq is not None, residual=ctx.has_res, b_down=b_down is not None, b_query=b_query is not None,
                 logit_shift=logit_shift is not None)
    needs = [bool(wanted.get(n, False)) and given.get(n, True) for n in FUSION_GRADS]
    if grad_out is None:
        grad_out = torch.zeros(xd.shape[0], w_out.shape[0], dtype=xd.dtype, device=xd.device)
    grads = bwd(grad_out.contiguous(), grad_probs, probs, *extra, xd, xq, w_down, b_down, w_query, b_query, w_out,
                segments, activations, temperature, dropout_p, seed, keep_mask, logit_shift, needs, adapter_mask)
    g = {n: (gi if need else None) for n, gi, need in zip(FUSION_GRADS, grads, needs)}
    return tuple(g.get(n) for n in FUSION_ARGS)
