"""Roofline of one fusion site (the Triton issue's definition), with both rates measured in the run.

    roofline time = max(FLOPs / matmul rate, bytes / copy bandwidth)
    FLOPs = 2 * M * H * (GEMM1 width + GEMM2 depth),  GEMM1 width = 2R + N,  GEMM2 depth = R + N
    bytes = inputs read once (adapter input, residual; the query is the adapter input here)
          + the output written once + the folded weights (at the op's weight dtype)

The matmul rate is that of a large matmul in the benchmark's dtype (bf16 for the issue-3 target)
and the copy bandwidth that of a large device-to-device copy (read + write bytes), both the
median of CUDA-event timings taken in the same process as the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from .providers import SiteShape

__all__ = ["Rates", "measure_rates", "site_flops", "site_bytes", "roofline_ms"]


@dataclass
class Rates:
    matmul_flops_per_s: float
    copy_bytes_per_s: float
    matmul_dtype: str

    def to_dict(self) -> Dict[str, float]:
        return {"matmul_tflops": self.matmul_flops_per_s / 1e12, "copy_gbps": self.copy_bytes_per_s / 1e9,
                "matmul_dtype": self.matmul_dtype}


def _median_event_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def measure_rates(device, dtype: torch.dtype = torch.bfloat16, *, n: int = 8192, copy_mib: int = 2048,
                  iters: int = 10) -> Rates:
    """A large ``dtype`` matmul (n x n x n) and a large device copy, timed with CUDA events."""
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError("the roofline needs a CUDA device")
    mm_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    a = torch.randn(n, n, device=device, dtype=mm_dtype)
    b = torch.randn(n, n, device=device, dtype=mm_dtype)
    c = torch.empty(n, n, device=device, dtype=mm_dtype)
    for _ in range(3):
        torch.matmul(a, b, out=c)
    ms = _median_event_ms(lambda: torch.matmul(a, b, out=c), iters)
    flops = 2.0 * n ** 3 / (ms * 1e-3)
    a = b = c = None  # free the device memory (not `del`: the timed lambda closes over these names)
    numel = copy_mib * 1024 * 1024 // 4
    src = torch.empty(numel, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = _median_event_ms(lambda: dst.copy_(src), iters)
    bw = 2.0 * src.numel() * src.element_size() / (ms * 1e-3)
    src = dst = None
    torch.cuda.empty_cache()
    return Rates(flops, bw, str(mm_dtype).replace("torch.", ""))


def site_flops(spec: SiteShape) -> float:
    m, h, r, n = spec.tokens, spec.hidden, spec.bottleneck, spec.n
    return 2.0 * m * h * ((2 * r + n) + (r + n))


def site_bytes(spec: SiteShape, folded_weight_bytes: int) -> float:
    elt = torch.empty((), dtype=spec.torch_dtype).element_size()
    m, h = spec.tokens, spec.hidden
    return float(2 * m * h * elt + m * h * elt + folded_weight_bytes)


def roofline_ms(spec: SiteShape, folded_weight_bytes: int, rates: Rates) -> float:
    t = max(site_flops(spec) / rates.matmul_flops_per_s, site_bytes(spec, folded_weight_bytes) / rates.copy_bytes_per_s)
    return t * 1e3
