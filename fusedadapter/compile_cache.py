"""torch.compile's cached graphs, dropped when fusion sites are added or removed (a leaf module:
patching and the integrations both call it, neither through the other)."""

from __future__ import annotations

import torch

__all__ = ["invalidate_compiled_graphs"]


def invalidate_compiled_graphs() -> None:
    """Drop torch.compile's cached graphs after sites are added or removed.

    Dynamo does not guard on module hooks (``skip_nnmodule_hook_guards``) nor on which instance of
    a class it compiled, so a model compiled before ``patch`` (or another instance of its class)
    would otherwise keep running a cached graph without the fusion sites: a silent wrong answer.
    """
    torch._dynamo.reset()
