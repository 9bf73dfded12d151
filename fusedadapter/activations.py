"""Adapter non-linearities: names (AdapterHub's), integer codes (the op's), and their math.

Every backend implements the same table; the codes are part of the op schema, so never
renumber them. The reference builds its activations the way AdapterHub does
(``transformers.activations.get_activation``, with ``leakyrelu`` special-cased), so parity
with AdapterHub does not depend on this table being right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATION_CODES", "canonical_activation", "activation_code", "apply_activation", "reference_activation"]

# canonical name -> op code
ACTIVATION_CODES = {
    "linear": 0,
    "relu": 1,
    "gelu": 2,
    "gelu_new": 3,
    "swish": 4,
    "tanh": 5,
    "sigmoid": 6,
    "leakyrelu": 7,
    "quick_gelu": 8,
}

# accepted spellings -> canonical name (AdapterHub lower-cases the name first)
_ALIASES = {
    "linear": "linear",
    "identity": "linear",
    "none": "linear",
    "relu": "relu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_new",
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_fast": "gelu_new",
    "swish": "swish",
    "silu": "swish",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
    "leakyrelu": "leakyrelu",
    "leaky_relu": "leakyrelu",
    "quick_gelu": "quick_gelu",
}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def canonical_activation(name) -> str:
    if name is None:
        return "linear"
    if not isinstance(name, str) or name.lower() not in _ALIASES:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ALIASES)}")
    return _ALIASES[name.lower()]


def activation_code(name) -> int:
    return ACTIVATION_CODES[canonical_activation(name)]


def apply_activation(x: torch.Tensor, code: int) -> torch.Tensor:
    """The op's activation ``code`` applied elementwise (differentiable torch ops)."""
    if code == 0:
        return x
    if code == 1:
        return F.relu(x)
    if code == 2:
        return F.gelu(x)
    if code == 3:
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0))))
    if code == 4:
        return F.silu(x)
    if code == 5:
        return torch.tanh(x)
    if code == 6:
        return torch.sigmoid(x)
    if code == 7:
        return F.leaky_relu(x, 0.01)
    if code == 8:
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation code {code}; expected one of {sorted(ACTIVATION_CODES.values())}")


def reference_activation(name) -> torch.nn.Module:
    """The module AdapterHub's ``Activation_Function_Class`` would build for ``name``."""
    canon = canonical_activation(name)
    if canon == "leakyrelu":
        return _Fn(F.leaky_relu)
    if canon == "linear":
        return torch.nn.Identity()
    from transformers.activations import get_activation

    return get_activation(name.lower() if isinstance(name, str) and name.lower() not in ("none", "identity") else canon)


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)
