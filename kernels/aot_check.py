"""Compile the Triton kernels for an NVIDIA target without a GPU, and report their resources.

Triton ships ``ptxas`` and ``cuobjdump``, so every kernel x config x representative variant can be
compiled to a cubin on any machine: this catches what the interpreter cannot (type errors in the
compiled path, dot shapes the GPU rejects, shared memory over the SM's limit) and shows registers,
spills (local memory) and whether the dots became Hopper warp-group MMAs.

    python -m fusedadapter.kernels.aot_check [--arch 90] [--quick] [--json]

Runs in its own process: TRITON_INTERPRET must be unset when the kernels are defined.
Exit status 1 if a compile fails or a kernel needs more shared memory than the target has.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# kilobytes of shared memory one block may use (opt-in maximum) per compute capability major
_SMEM_LIMIT = {8: 163 * 1024, 9: 227 * 1024, 10: 227 * 1024, 12: 99 * 1024}

# Argument roles: "act" = activation dtype, "acc" = accumulation dtype (folded weights, probs, G),
# "i32" / "u8" pointers; scalars are i32 unless named in _FLOATS.
_PTRS = {
    "fwd_gemm1": dict(xd_ptr="act", xq_ptr="act", wd_ptr="acc", bd_ptr="acc", wq_ptr="acc", bq_ptr="acc",
                      shift_ptr="acc", keep_ptr="u8", amask_ptr="u8", segid_ptr="i32", code_ptr="i32", z_ptr="act",
                      p_ptr="acc"),
    "fwd_gemm2": dict(z_ptr="act", p_ptr="acc", segid_ptr="i32", wo_ptr="acc", res_ptr="act", out_ptr="act"),
    "bwd_epilogue": dict(do_ptr="act", gp_ptr="acc", p_ptr="acc", xd_ptr="act", xq_ptr="act", wd_ptr="acc",
                         bd_ptr="acc", wq_ptr="acc", bq_ptr="acc", wo_ptr="acc", keep_ptr="u8", segid_ptr="i32",
                         code_ptr="i32", g_ptr="acc", wm_ptr="act", dshift_ptr="acc"),
    "mm": dict(a_ptr="acc", b_ptr="act", c_ptr="acc"),
}
_FLOATS = {"drop_hi", "drop_lo", "temp_hi", "temp_lo"}


def _variants(name, quick):
    """(label, dtype name, constexpr flags) per kernel: the shapes of call the op makes."""
    base_fwd = dict(HAS_BD=True, HAS_BQ=True, ACT_MASK=2, UNIFORM_ACT=1, N_PAD=16, SPLIT_WD=False, HAS_AMASK=False)
    out = []
    if name == "fwd_gemm1":
        out.append(("bf16 shared-x eval relu", "bf16", dict(base_fwd, HAS_XQ=False, HAS_SHIFT=False, DROPOUT=False,
                                                            HAS_KEEP=False, SPLIT_WQ=True)))
        if not quick:
            out.append(("bf16 xq train-hash mixed-acts N32 masked", "bf16",
                        dict(base_fwd, HAS_XQ=True, HAS_SHIFT=True, DROPOUT=True, HAS_KEEP=False, SPLIT_WQ=True,
                             ACT_MASK=(1 << 1) | (1 << 2) | (1 << 4), UNIFORM_ACT=-1, N_PAD=32, HAS_AMASK=True)))
            out.append(("fp32 shared-x train-keep", "fp32", dict(base_fwd, HAS_XQ=False, HAS_SHIFT=True, DROPOUT=True,
                                                                 HAS_KEEP=True, SPLIT_WQ=False)))
    elif name == "fwd_gemm2":
        out.append(("bf16 residual", "bf16", dict(HAS_RES=True)))
        if not quick:
            out.append(("fp32 residual", "fp32", dict(HAS_RES=True)))
    elif name == "bwd_epilogue":
        common = dict(HAS_BD=True, HAS_BQ=True, HAS_GP=True, STORE_G=True, STORE_WM=True, ACT_MASK=2, UNIFORM_ACT=1,
                      N_PAD=16, SPLIT_WD=False, SPLIT_WQ=False)
        out.append(("bf16 shared-x train-hash", "bf16", dict(common, HAS_XQ=False, DROPOUT=True, HAS_KEEP=False,
                                                             STORE_DSHIFT=True)))
        if not quick:
            out.append(("bf16 xq eval mixed-acts N32", "bf16",
                        dict(common, HAS_XQ=True, DROPOUT=False, HAS_KEEP=False, STORE_DSHIFT=False,
                             ACT_MASK=(1 << 2) | (1 << 3) | (1 << 8), UNIFORM_ACT=-1, N_PAD=32)))
            out.append(("fp32 shared-x eval", "fp32", dict(common, HAS_XQ=False, DROPOUT=False, HAS_KEEP=False,
                                                           STORE_DSHIFT=False)))
    elif name == "mm":
        out.append(("bf16 operands", "bf16", {}))
        if not quick:
            out.append(("fp32 operands", "fp32", {}))
    if not quick:  # float64 runs on its own small config (configs.FP64_CONFIG)
        first = dict(out[0][2])
        if "SPLIT_WQ" in first:
            first["SPLIT_WQ"] = False
        out.append(("fp64", "fp64", first))
    return out


def _resources(cubin: bytes, tool: str):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", text)
    return {k: int(v) for k, v in zip(("regs", "stack", "static_shared", "local"), m.groups())} if m else {}


def run(arch: int = 90, quick: bool = False):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("aot_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import configs
    from . import fusion

    kernels = {"fwd_gemm1": fusion._fwd_gemm1_kernel, "fwd_gemm2": fusion._fwd_gemm2_kernel,
               "bwd_epilogue": fusion._bwd_epilogue_kernel, "mm": fusion._mm_kernel}
    tl_types = {"bf16": ("*bf16", tl.bfloat16), "fp32": ("*fp32", tl.float32), "fp16": ("*fp16", tl.float16),
                "fp64": ("*fp64", tl.float64)}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", arch, 32)
    limit = _SMEM_LIMIT.get(arch // 10, 99 * 1024)
    rows, ok = [], True
    for name, fn in kernels.items():
        cfgs = configs.GPU_CONFIGS[name][:1] if quick else configs.GPU_CONFIGS[name]
        for label, dt, flags in _variants(name, quick):
            act_ptr, act_tl = tl_types[dt]
            acc_ptr, acc_tl = tl_types["fp64"] if dt == "fp64" else tl_types["fp32"]
            for cfg in ([configs.FP64_CONFIG[name]] if dt == "fp64" else cfgs):
                consts = dict(flags, ACC=acc_tl, DOT=act_tl, **{k: cfg[k] for k in configs.BLOCK_KEYS[name]})
                sig = {}
                for arg in fn.arg_names:
                    role = _PTRS[name].get(arg)
                    if role is not None:
                        sig[arg] = {"act": act_ptr, "acc": acc_ptr, "i32": "*i32", "u8": "*u8"}[role]
                    elif arg in consts:
                        sig[arg] = "constexpr"
                    else:
                        sig[arg] = "fp32" if arg in _FLOATS else "i32"
                row = dict(kernel=name, variant=label, config={k: cfg[k] for k in cfg})
                t0 = time.time()
                try:
                    k = triton.compile(ASTSource(fn, sig, consts), target=target,
                                       options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
                except Exception as exc:  # noqa: BLE001 - report every failure
                    row.update(error=f"{type(exc).__name__}: {str(exc)[:400]}")
                    ok = False
                    rows.append(row)
                    continue
                ttgir = k.asm.get("ttgir", "")
                row.update(seconds=round(time.time() - t0, 2), shared=k.metadata.shared,
                           wgmma=ttgir.count("warp_group_dot"), mma=ttgir.count("tt.dot"),
                           **_resources(k.asm["cubin"], tool))
                if k.metadata.shared > limit:
                    row["error"] = f"shared memory {k.metadata.shared} > {limit}"
                    ok = False
                rows.append(row)
    return ok, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80, 90, ...)")
    ap.add_argument("--quick", action="store_true", help="first config, one variant per kernel")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)
    ok, rows = run(args.arch, args.quick)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            cfg = "x".join(str(v) for k, v in r["config"].items() if k.startswith("BLOCK"))
            cfg += f" w{r['config']['num_warps']} s{r['config']['num_stages']}"
            if "error" in r and "shared" not in r:
                print(f"{r['kernel']:13s} {r['variant']:36s} {cfg:18s} ERROR {r['error']}")
                continue
            print(f"{r['kernel']:13s} {r['variant']:36s} {cfg:18s} smem {r['shared']:6d} regs {r.get('regs', '?'):>3} "
                  f"local {r.get('local', '?'):>4} wgmma {r['wgmma']} dots {r['mma']} {r['seconds']:5.1f}s"
                  + (f"  ERROR {r['error']}" if "error" in r else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
