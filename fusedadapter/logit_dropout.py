"""The op's logit-dropout mask from (seed, row, adapter).

A counter-based hash every backend computes the same way (the Triton kernels and the C++/CUDA
backends replay it bit for bit), so a training step is replayable (forward and backward see the same
mask) and comparable across backends: lowbias32 (Chris Wellons' 32-bit integer hash), applied twice.
"""

from __future__ import annotations

import torch

__all__ = ["hash_uniform", "hash_keep_mask"]

_M32 = 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic masked to 32 bits; products wrap in int64 but the low 32 bits are exact.
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return x


def hash_uniform(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """uniform in [0, 1) from ``lowbias32(idx ^ lowbias32(seed))`` (24 random bits), float32."""
    s = _lowbias32(torch.tensor(int(seed) & _M32, dtype=torch.int64, device=idx.device))
    x = _lowbias32(idx.to(torch.int64) ^ s)
    return (x >> 8).to(torch.float32) * (1.0 / 16777216.0)


def hash_keep_mask(seed: int, m: int, n: int, dropout_p: float, device=None) -> torch.Tensor:
    """Boolean (m, n) keep-mask of the op's dropout: ``keep[r, k] = u(seed, r*n + k) >= p``."""
    idx = torch.arange(m * n, dtype=torch.int64, device=device).view(m, n)
    return hash_uniform(seed, idx) >= dropout_p
