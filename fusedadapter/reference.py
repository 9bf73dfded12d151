"""The eager reference: AdapterHub's AdapterFusion, op for op (the oracle and the baseline).

This follows ``adapters.methods.bottleneck.BottleneckLayer.compose_fuse`` and
``adapters.methods.modeling.BertFusion.forward`` (adapters 1.3.0): run each adapter, stack the
scaled up-projections into a (..., N, H) tensor that is both key and value, project query, key
and value, take unscaled dot products, dropout on the logits, softmax over N with the
temperature, weighted sum, residual. It is deliberately not optimised beyond what AdapterHub
does, and deliberately not slower either (benchmarks compare it to AdapterHub's own module).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["reference_fusion"]


def reference_fusion(
    adapter_input: torch.Tensor,
    residual: torch.Tensor,
    query_input: torch.Tensor,
    adapters: Sequence[nn.Module],
    query: Optional[nn.Module],
    key: Optional[nn.Module],
    value: Optional[nn.Module],
    *,
    residual_before: bool = False,
    temperature: float = 1.0,
    dropout_p: float = 0.0,
    keep_mask: Optional[torch.Tensor] = None,
    training: bool = False,
    adapter_mask: Optional[torch.Tensor] = None,
):
    """One fusion site, AdapterHub's way. Tensors are (..., H); returns ``(out, probs)``.

    ``adapters``: modules whose ``forward(x)`` returns the scaled up-projection (AdapterHub's
    ``up``). ``query``/``key``/``value``: the fusion ``nn.Linear``s, ``None`` where the flag is
    off. Dropout: with ``keep_mask`` (bool, (..., N)) the logits are ``keep * logit / (1 - p)``
    (a replayed draw); otherwise, in training, a fresh ``nn.functional.dropout`` draw.

    ``adapter_mask`` (bool, (..., N), True = the adapter takes part; not AdapterHub's): after the
    dropout, masked scores are ``-inf`` (``masked_fill``), so a masked adapter gets probability 0.
    A row with every adapter masked has probabilities all 0 and returns the residual path alone:
    ``residual`` (also under ``residual_before``, where the residual is otherwise inside every
    adapter's value: such a row is the bare sub-layer's output).
    """
    ups = [adapter(adapter_input) for adapter in adapters]
    up_list = torch.stack(ups, dim=-2)  # (..., N, H): AdapterHub's stack(...).permute(1, 2, 0, 3)
    if residual_before:
        # AdapterHub adds in place to the tensor that is both key and value (in place also keeps
        # its dtype under autocast).
        up_list += residual.unsqueeze(-2)
    query_layer = query(query_input) if query is not None else query_input
    key_layer = key(up_list) if key is not None else up_list
    value_layer = value(up_list) if value is not None else up_list
    scores = torch.squeeze(torch.matmul(query_layer.unsqueeze(-2), key_layer.transpose(-2, -1)), dim=-2)
    if keep_mask is not None and dropout_p > 0:
        scores = scores * keep_mask.to(scores.dtype) / (1.0 - dropout_p)
    elif training and dropout_p > 0:
        scores = nn.functional.dropout(scores, p=dropout_p, training=True)
    if adapter_mask is None:
        probs = torch.softmax(scores / temperature, dim=-1)
    else:
        # Rows with nothing left softmax zeros instead (no NaN, forward or backward) and are zeroed.
        any_kept = adapter_mask.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~adapter_mask & any_kept, float("-inf")).masked_fill(~any_kept, 0.0)
        probs = torch.softmax(scores / temperature, dim=-1).masked_fill(~adapter_mask, 0.0)
    context = torch.squeeze(torch.matmul(probs.unsqueeze(-2), value_layer), dim=-2)
    if not residual_before:
        context += residual  # in place, as AdapterHub (keeps the matmul's dtype under autocast)
    elif adapter_mask is not None:
        context = torch.where(any_kept, context, residual.to(context.dtype))
    return context, probs
