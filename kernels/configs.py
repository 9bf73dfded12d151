"""Block-size configurations of the Triton kernels (no Triton import: tests read these plainly).

Every block dimension here ends up as a ``tl.dot`` operand dimension (rows, reduction or columns),
and the adapter axis is padded to :func:`n_pad` (>= 16) before it meets a dot, so every dot
operand dimension is >= 16 in every config, as the GPU requires (the CPU interpreter does not
check; ``tests/test_triton.py`` does, statically and by running each config in the interpreter
with the GPU's minimum dot size switched on).

On a GPU the kernels are autotuned over ``GPU_CONFIGS[kernel]``, keyed on the problem shape with
the token count bucketed to a power of two (:func:`token_key`); in the Triton interpreter (no GPU)
and when ``FUSEDADAPTER_TRITON_AUTOTUNE=0`` each kernel runs one fixed config
(``INTERPRET_CONFIG`` / ``GPU_DEFAULT``), because autotuning several configs does not work in
the interpreter.
"""

from __future__ import annotations

import os
from typing import Dict, List

# Kernel names: "fwd_gemm1" (GEMM1 + epilogue), "fwd_gemm2" (GEMM2 + residual),
# "bwd_epilogue" (recomputed GEMM1, dO @ w_out, epilogue backward), "mm" (plain GEMM for the
# input and weight gradients).
BLOCK_KEYS: Dict[str, tuple] = {
    "fwd_gemm1": ("BLOCK_M", "BLOCK_R", "BLOCK_K"),
    "fwd_gemm2": ("BLOCK_M", "BLOCK_H", "BLOCK_K"),
    "bwd_epilogue": ("BLOCK_M", "BLOCK_R", "BLOCK_K"),
    "mm": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
}


def _cfg(names, values, warps, stages):
    d = dict(zip(names, values))
    d["num_warps"] = warps
    d["num_stages"] = stages
    return d


_G1 = BLOCK_KEYS["fwd_gemm1"]
_G2 = BLOCK_KEYS["fwd_gemm2"]
_BE = BLOCK_KEYS["bwd_epilogue"]
_MM = BLOCK_KEYS["mm"]

# The configs before the spill measurement (issue 12); FUSEDADAPTER_TRITON_CONFIGS=v1 selects them, so
# one GPU run can time both lists.
GPU_CONFIGS_V1: Dict[str, List[dict]] = {
    "fwd_gemm1": [_cfg(_G1, (128, 64, 64), 8, 3), _cfg(_G1, (64, 64, 64), 4, 3), _cfg(_G1, (128, 128, 32), 8, 3)],
    "fwd_gemm2": [_cfg(_G2, (128, 128, 64), 8, 3), _cfg(_G2, (128, 64, 64), 4, 4), _cfg(_G2, (64, 128, 64), 4, 4)],
    "bwd_epilogue": [_cfg(_BE, (64, 64, 32), 4, 3), _cfg(_BE, (64, 64, 64), 8, 3), _cfg(_BE, (32, 64, 64), 4, 3)],
    "mm": [_cfg(_MM, (128, 128, 32), 8, 3), _cfg(_MM, (128, 64, 64), 4, 4), _cfg(_MM, (64, 64, 64), 4, 4)],
}

# Chosen by what ptxas -v reports for sm_90 (python -m fusedadapter.kernels.aot_check --target-only:
# Triton 3.9 / ptxas 13.4, the JIT's divisibility hints of the target row's call): every config
# below compiles with 0 bytes of spill stores, spill loads and stack frame at the issue-3 target
# row's variants (bf16, shared input, relu; eval and hash-dropout training), registers in brackets.
# Few configs per kernel: each one is compiled for every constexpr variant (activation set, flags,
# dtype) before the first call of a shape bucket, and the kernels are large. Of V1, 9 of the 12
# target-row compiles spilled: fwd_gemm1 128x128x32 w8 (1.5 KB), fwd_gemm2's two 4-warp configs,
# every bwd_epilogue config (200 B - 1.8 KB) and mm's two 4-warp 64-deep configs.
GPU_CONFIGS_V2: Dict[str, List[dict]] = {
    # fwd_gemm1 holds two fp32 accumulators (adapter and query columns) + the logits.
    "fwd_gemm1": [
        _cfg(_G1, (128, 64, 64), 8, 3),   # 184 regs
        _cfg(_G1, (128, 32, 64), 8, 3),   # 140
        _cfg(_G1, (64, 64, 64), 4, 3),    # 240
    ],
    "fwd_gemm2": [
        _cfg(_G2, (128, 128, 64), 8, 3),  # 250
        _cfg(_G2, (128, 64, 64), 8, 3),   # 193
        _cfg(_G2, (128, 128, 32), 8, 3),  # 190
    ],
    # Three accumulators live at once in the second pass (adapter, query and dO @ w_out columns):
    # 64-row tiles need 8 warps and 32 bottleneck columns not to spill (64x64x32 w8: 292 B).
    "bwd_epilogue": [
        _cfg(_BE, (64, 32, 32), 8, 3),    # 226
        _cfg(_BE, (64, 32, 64), 8, 3),    # 246
        _cfg(_BE, (32, 32, 32), 4, 3),    # 239 (32 rows: mma.sync, not warp-group MMA)
    ],
    "mm": [
        _cfg(_MM, (128, 128, 32), 8, 3),  # 218
        _cfg(_MM, (128, 64, 64), 8, 3),   # 220
        _cfg(_MM, (64, 64, 32), 4, 4),    # 150
    ],
}

CONFIG_SET = os.environ.get("FUSEDADAPTER_TRITON_CONFIGS", "v2").strip().lower()
if CONFIG_SET not in ("v1", "v2"):
    raise ValueError(f"FUSEDADAPTER_TRITON_CONFIGS must be v1 or v2, not {CONFIG_SET!r}")
GPU_CONFIGS: Dict[str, List[dict]] = GPU_CONFIGS_V1 if CONFIG_SET == "v1" else GPU_CONFIGS_V2

# float64 on a GPU (a correctness path: fp64 dots run on FMA units): small tiles, so that the
# operand buffers fit in shared memory (the fp32/bf16 tiles above would need up to 256 KiB in fp64).
FP64_CONFIG: Dict[str, dict] = {
    "fwd_gemm1": _cfg(_G1, (32, 32, 32), 4, 2),
    "fwd_gemm2": _cfg(_G2, (32, 64, 32), 4, 2),
    "bwd_epilogue": _cfg(_BE, (32, 32, 32), 4, 2),
    "mm": _cfg(_MM, (64, 64, 32), 4, 2),
}

# Used on a GPU when autotuning is switched off (FUSEDADAPTER_TRITON_AUTOTUNE=0).
GPU_DEFAULT: Dict[str, dict] = {name: cfgs[0] for name, cfgs in GPU_CONFIGS.items()}

# The interpreter: numpy per tile op, so fewer, larger tiles are faster; 32 keeps the tests' small
# problems in one or two programs while still crossing block edges in the odd-shape tests.
INTERPRET_CONFIG: Dict[str, dict] = {
    "fwd_gemm1": dict(BLOCK_M=32, BLOCK_R=32, BLOCK_K=32),
    "fwd_gemm2": dict(BLOCK_M=32, BLOCK_H=32, BLOCK_K=32),
    "bwd_epilogue": dict(BLOCK_M=32, BLOCK_R=32, BLOCK_K=32),
    "mm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
}

MIN_DOT_DIM = 16
# Split-K chunks of the weight-gradient GEMMs (reduction over tokens) are multiples of this, which
# every config's BLOCK_K divides.
SPLIT_K_QUANTUM = 128


def n_pad(n: int) -> int:
    """The adapter axis as the kernels hold it: a power of two, at least 16 (a dot operand)."""
    p = MIN_DOT_DIM
    while p < n:
        p *= 2
    return p


def token_key(m: int) -> int:
    """Autotuning key for a token count: the next power of two, from 64 up to 65536."""
    k = 64
    while k < m and k < 65536:
        k *= 2
    return k


def all_configs() -> Dict[str, List[dict]]:
    """Every config any kernel can run with (both GPU autotune lists, GPU default, interpreter)."""
    out = {name: list(cfgs) + [c for c in GPU_CONFIGS_V1[name] + GPU_CONFIGS_V2[name] if c not in cfgs]
           for name, cfgs in GPU_CONFIGS.items()}
    for name in out:
        out[name].append(GPU_DEFAULT[name])
        out[name].append(FP64_CONFIG[name])
        out[name].append(INTERPRET_CONFIG[name])
    return out
