"""How a :class:`fusedadapter.MultiFusion`'s row groups run and come back together.

Two paths beside the general one (each group through its fusion's own forward, the outputs
concatenated, or put back in the batch's order by one gather, see :mod:`fusedadapter.multitask`):

* :func:`run_group_into` (inference): the ``cpu`` backend's ``fusion_cpu_out`` writes the group's
  output straight into its rows of one preallocated batch output, so a routed forward does the K
  separate forwards' work and nothing more (no concatenation copy of the output afterwards). Rows
  not adjacent per fusion are gathered per group, written in fusion order and put back by one
  gather (:func:`inverse_permutation`).
* :func:`exported_route_ids` / :func:`select_rows` (``torch.export`` / ONNX): the route is a graph
  input, so the grouping cannot be read on the host; every fusion runs on every row and each row
  keeps its fusion's output (``where``). Exact per row; it costs K fusion sites' arithmetic per row.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .dispatch import resolve_backend
from .fold import call_form
from .ops import acc_dtype
from .runner import adapter_mask_rows, check_site_inputs, run_folded

__all__ = ["run_group_into", "exported_route_ids", "select_rows", "inverse_permutation"]


def _into_op(out2d: torch.Tensor):
    """An op with the fused op's signature that writes its output into ``out2d`` (run_folded calls it)."""
    def op(*args):
        return out2d, torch.ops.fusedadapter.fusion_cpu_out(out2d, *args)
    return op


def run_group_into(site, out_rows: torch.Tensor, adapter_input: torch.Tensor, residual: torch.Tensor,
                   query: Optional[torch.Tensor], adapter_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Run fusion ``site`` (a :class:`~fusedadapter.FusedAdapterFusion`) on one row group and write
    its output into ``out_rows`` (contiguous, the group's rows of the batch output); returns the
    probabilities (``(..., N)``, in the output's dtype, as ``site(..., return_probs=True)``), or
    None, having done nothing, where this path does not apply: autograd or autocast on, a training
    site, exporting or compiling, a backend other than ``cpu`` (as ``site.backend`` resolves for
    these rows), a form other than the folded one. The caller then runs ``site`` as usual."""
    if (torch.is_grad_enabled() or site.training or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or adapter_input.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or not out_rows.is_contiguous() or out_rows.dtype != adapter_input.dtype):
        return None
    hidden = site.hidden_size
    check_site_inputs(hidden, adapter_input, residual, query, site.anchor_param, False)
    a = adapter_input.reshape(-1, hidden)
    n_tokens = a.shape[0]
    name, _ = resolve_backend(site.backend, a.device, a.dtype, n_tokens, training=False)
    if name != "cpu" or not hasattr(torch.ops.fusedadapter, "fusion_cpu_out"):
        return None
    if call_form(name, hidden, site.bottleneck, False, n_tokens) == "plain":
        return None
    folded = site.folded(acc_dtype(a.dtype), n_tokens=n_tokens)
    if (folded.query_pre is not None or site.residual_before
            or (folded.ln_mode != "none" and a.dtype in (torch.float16, torch.bfloat16))):
        return None  # forms that finish outside the op, or run it on upcast rows (run_folded)
    lead = adapter_input.shape[:-1]
    c = a if query is None else query.reshape(-1, hidden)
    if adapter_mask is not None:
        adapter_mask = adapter_mask_rows(adapter_mask, lead, site.num_adapters, a.device)
    out2d = out_rows.view(n_tokens, hidden)
    _, probs = run_folded(_into_op(out2d), folded, a, residual.reshape(-1, hidden), c, fusion=None,
                          residual_before=False, temperature=site.step_temperature(), dropout_p=0.0, seed=0,
                          keep_mask=None, adapter_mask=adapter_mask)
    return probs.reshape(*lead, probs.shape[-1]).to(out_rows.dtype)


def exported_route_ids(route: torch.Tensor, device) -> torch.Tensor:
    """A route tensor while exporting (a graph input), used as it is: ``(batch,)`` integer ids in
    the site's fusion order. Its values cannot be checked on the host: a row whose id names no
    fusion comes out NaN (:func:`select_rows`). Names and lists are constants, checked as usual."""
    if route.dim() != 1 or route.is_floating_point() or route.is_complex() or route.dtype == torch.bool:
        raise ValueError(f"MultiFusion: a route tensor must be 1-D (batch,) of integer fusion ids, got "
                         f"{route.dtype} {tuple(route.shape)}")
    return route.to(device=device, dtype=torch.int64)


def select_rows(parts: List[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of ``parts[ids[i]]`` (every part of the whole batch); NaN where ``ids[i]`` names no part."""
    shape = (ids.shape[0],) + (1,) * (parts[0].dim() - 1)
    ids = ids.to(parts[0].device).reshape(shape)
    out = torch.full_like(parts[0], float("nan"))
    for k, part in enumerate(parts):
        out = torch.where(ids == k, part, out)
    return out


def inverse_permutation(order: torch.Tensor, device) -> torch.Tensor:
    """``back`` with ``back[order[j]] = j`` (on ``device``): ``sorted_rows.index_select(0, back)`` puts rows
    that ran in the fusion-sorted ``order`` back in the batch's own order. One gather, ~5x faster on CPU
    than ``index_copy_`` of each group into a fresh tensor (12.6 MB of rows, B=32 S=128 H=768: 0.95 vs
    3.9 ms, 1 thread)."""
    back = torch.empty_like(order)
    back[order] = torch.arange(order.shape[0], device=order.device)
    return back.to(device)
