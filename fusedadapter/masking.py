"""Per-call adapter masks for callers that do not call the fusion sites themselves (patched models).

``FusedAdapterFusion.forward(..., adapter_mask=mask)`` masks one site. A patched Hugging Face
model calls its sites from inside the model's own forward, so the mask travels another way::

    with fusedadapter.adapter_mask(mask):        # bool (batch, N), True = the adapter takes part
        out = model(**batch)                     # every fusion site of this forward uses it

Inside the block, every :class:`~fusedadapter.FusedAdapterFusion` forward in this thread that gets
no ``adapter_mask`` argument of its own uses ``mask`` (broadcast per site by the module's rule:
``(batch, N)`` over the tokens of each batch element, or ``(..., N)`` per token). Blocks nest, the
innermost wins, and ``adapter_mask(None)`` turns masking off inside a block. The state is a
``threading.local``: other threads (a server's other requests) are not affected, and
``torch.compile`` guards on it (no graph break; a new mask object of the same shape reuses the
compiled graph). Under ``generate(num_beams=k)`` (or ``num_return_sequences=k``) a ``(batch, N)``
mask follows the model's own expansion of the batch to ``batch * k`` rows (each row repeated
``k`` times, as ``input_ids``) at the sites of patched and accelerated models.

Code that runs a site through :func:`fusedadapter.functional.run_site` directly (rather than the
module's forward) reads the block's mask with :func:`current_adapter_mask` and passes it on.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator, Optional, Sequence

import torch

__all__ = ["adapter_mask", "current_adapter_mask"]

_state = threading.local()


@contextlib.contextmanager
def adapter_mask(mask: Optional[torch.Tensor], adapter_names: Optional[Sequence[str]] = None) -> Iterator[None]:
    """Mask adapters per sample in every fusion site called in this thread inside the block.

    ``mask``: bool, ``(batch, N)`` or ``(..., N)`` per token (True = the adapter takes part), on the
    inputs' device; ``None`` turns masking off inside the block. ``adapter_names``: the adapters
    the ``N`` columns stand for. With names, each site takes the columns of its own adapters (by
    name, in its order), so one mask serves sites that fuse different subsets of a pool (e.g.
    AdapterHub's ``leave_out``); a site fusing an adapter the names lack raises. Without names,
    each site reads the columns in its own (``Fuse``) order and ``N`` must equal its adapter count.
    """
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"adapter_mask: mask must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dim() < 1:
            raise ValueError("adapter_mask: mask must have at least one dimension (..., N)")
    names = None if adapter_names is None else [str(n) for n in adapter_names]
    if mask is not None and names is not None and mask.shape[-1] != len(names):
        raise ValueError(f"adapter_mask: mask has {mask.shape[-1]} columns but {len(names)} adapter names were given")
    previous = getattr(_state, "value", None)
    _state.value = None if mask is None else (mask, names)
    try:
        yield
    finally:
        _state.value = previous


def current_adapter_mask(adapter_names: Optional[Iterable[str]] = None, *,
                         batch: Optional[int] = None) -> Optional[torch.Tensor]:
    """The mask of the innermost :func:`adapter_mask` block of this thread, or None outside any.

    ``adapter_names``: the calling site's adapters, in its order (any iterable of names; read only
    when the block named its columns). Then the block's columns are picked (and ordered) for them.

    ``batch``: the calling site's batch (its inputs' first dimension), given by callers inside a
    model's forward (patched and accelerated models). ``generate(num_beams=k)`` (and
    ``num_return_sequences``) runs the model on every input row repeated ``k`` times in a row
    (``input_ids.repeat_interleave(k, dim=0)``); a block's mask of batch ``B`` then meets sites of
    batch ``B*k``, and its rows are repeated the same way. A batch that is not a multiple of the
    mask's raises, saying so. (An explicit ``adapter_mask=`` argument of a site is never expanded.)
    """
    value = getattr(_state, "value", None)
    if value is None:
        return None
    mask, names = value
    if names is not None and adapter_names is not None:
        wanted = list(adapter_names)
        missing = [n for n in wanted if n not in names]
        if missing:
            raise ValueError(f"adapter_mask: this fusion site fuses {wanted} but the mask's columns are {names} "
                             f"(missing {missing})")
        index = [names.index(n) for n in wanted]
        if index != list(range(len(names))):
            mask = mask[..., index]
    if batch is not None and mask.dim() >= 2 and mask.shape[0] != batch:
        rows = mask.shape[0]
        if rows == 0 or batch % rows != 0:
            raise ValueError(
                f"adapter_mask: the mask has batch {rows} (shape {tuple(mask.shape)}) but this fusion site runs on "
                f"{batch} rows, which is not a multiple of {rows}; a mask of batch B follows generate()'s "
                f"expansion to B*k rows (num_beams / num_return_sequences = k, each row repeated k times), other "
                f"batches must match the mask's")
        mask = mask.repeat_interleave(batch // rows, dim=0)
    return mask
