"""Compile the Triton kernels for an NVIDIA target without a GPU, and report their resources.

Triton ships ``ptxas`` and ``cuobjdump``, so every kernel x config x representative variant can be
compiled to a cubin on any machine: this catches what the interpreter cannot (type errors in the
compiled path, dot shapes the GPU rejects, shared memory over the SM's limit) and shows registers,
spills and whether the dots became Hopper warp-group MMAs.

Spills come from ``ptxas -v`` (its ``N bytes stack frame, N bytes spill stores, N bytes spill
loads`` and ``Used N registers`` lines), run on the PTX Triton produced with the flags Triton's
own ``make_cubin`` uses; cuobjdump's ``LOCAL`` field is not a spill measure (it stays 0 when
ptxas spills to the stack frame).

    python -m fusedadapter.kernels.aot_check [--arch 90] [--quick] [--json] [--kernel NAME]
                                             [--require-no-spills]

Runs in its own process: TRITON_INTERPRET must be unset when the kernels are defined.
Exit status 1 if a compile fails, a kernel needs more shared memory than the target has, or
(``--require-no-spills``) a config of the issue-3 target row (``configs.TARGET_VARIANTS``) spills.
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
# "i32" / "i64" / "u8" / "f32" pointers; scalars are i32 unless named in _FLOATS.
_PTRS = {
    "fwd_gemm1": dict(xd_ptr="act", xq_ptr="act", wd_ptr="acc", bd_ptr="acc", wq_ptr="acc", bq_ptr="acc",
                      shift_ptr="acc", keep_ptr="u8", amask_ptr="u8", segid_ptr="i32", code_ptr="i32", z_ptr="act",
                      p_ptr="acc", grp_ptr="i64", temp_ptr="f32", seed_ptr="i64"),
    "fwd_gemm2": dict(z_ptr="act", p_ptr="acc", segid_ptr="i32", wo_ptr="acc", res_ptr="act", out_ptr="act",
                      grp_ptr="i64"),
    "bwd_epilogue": dict(do_ptr="act", gp_ptr="acc", p_ptr="acc", xd_ptr="act", xq_ptr="act", wd_ptr="acc",
                         bd_ptr="acc", wq_ptr="acc", bq_ptr="acc", wo_ptr="acc", keep_ptr="u8", segid_ptr="i32",
                         code_ptr="i32", g_ptr="acc", wm_ptr="act", dshift_ptr="acc", grp_ptr="i64",
                         temp_ptr="f32", seed_ptr="i64"),
    "mm": dict(a_ptr="acc", b_ptr="act", c_ptr="acc", tab_ptr="i64"),
}
_FLOATS = {"drop_hi", "drop_lo", "temp_hi", "temp_lo"}

# The integer arguments that are multiples of 16 at the issue-3 target row (M=16384, H=768, N=8,
# R=384): Triton's JIT marks such arguments (and 16-byte aligned pointers) ``tt.divisibility=16``
# when it specializes a kernel for a call, which lets loads vectorize; a compile without these hints
# is the unaligned worst case (e.g. H=776) and spills more. ``--unaligned`` compiles that case.
_DIVISIBLE = {
    "fwd_gemm1": {"M", "KD", "KQ", "R", "stride_xd", "stride_xq", "stride_wd", "stride_wq", "stride_z", "wq_lo",
                  "M_KEY"},  # wq_lo = (R + N) * KQ
    "fwd_gemm2": {"M", "H", "R", "stride_z", "stride_res", "stride_out", "M_KEY"},  # stride_wo = R + N = 392
    "bwd_epilogue": {"M", "KD", "KQ", "H", "R", "stride_do", "stride_xd", "stride_xq", "stride_wd", "stride_wq",
                     "M_KEY"},  # stride_wo = R + N, stride_g = 2R + N, stride_wm = R + N: not multiples of 16
    "mm": {"M_KEY", "K_KEY"},  # shapes and strides differ per call (dX, dW, dw_out)
}


# The variants the issue-3 target row (bf16, 16384 tokens, H=768, N=8, r=48, relu, shared input)
# runs: its no-grad forward (eval) and its training step (hash dropout with the logit shift).
# "precast": the same with FUSEDADAPTER_TRITON_PRECAST=1 (weights cast to bf16 once, not per tile);
# "presplit": FUSEDADAPTER_TRITON_PRESPLIT=1 (w_query's hi/lo halves made once on the host);
# "v2": FUSEDADAPTER_TRITON_GEMM2=v2 (p loaded once per tile, w_out precast).
TARGET_VARIANTS = {
    "fwd_gemm1": ("bf16 shared-x eval relu", "bf16 shared-x train-hash relu", "bf16 shared-x eval relu precast",
                  "bf16 shared-x eval relu presplit", "bf16 shared-x train-hash relu presplit"),
    "fwd_gemm2": ("bf16 residual", "bf16 residual precast", "bf16 residual v2"),
    "bwd_epilogue": ("bf16 shared-x train-hash", "bf16 shared-x train-hash precast"),
    "mm": ("bf16 operands",),
}


def _variants(name, quick):
    """(label, dtype name, constexpr flags) per kernel: the shapes of call the op makes."""
    base_fwd = dict(HAS_BD=True, HAS_BQ=True, ACT_MASK=2, UNIFORM_ACT=1, N_PAD=16, SPLIT_WD=False, HAS_AMASK=False,
                    PRESPLIT_WQ=False, GROUPED=False)
    out = []
    if name == "fwd_gemm1":
        out.append(("bf16 shared-x eval relu", "bf16", dict(base_fwd, HAS_XQ=False, HAS_SHIFT=False, DROPOUT=False,
                                                            HAS_KEEP=False, SPLIT_WQ=True)))
        if not quick:
            out.append(("bf16 shared-x train-hash relu", "bf16", dict(base_fwd, HAS_XQ=False, HAS_SHIFT=True,
                                                                      DROPOUT=True, HAS_KEEP=False, SPLIT_WQ=True)))
            out.append(("bf16 xq train-hash mixed-acts N32 masked", "bf16",
                        dict(base_fwd, HAS_XQ=True, HAS_SHIFT=True, DROPOUT=True, HAS_KEEP=False, SPLIT_WQ=True,
                             ACT_MASK=(1 << 1) | (1 << 2) | (1 << 4), UNIFORM_ACT=-1, N_PAD=32, HAS_AMASK=True)))
            out.append(("fp32 shared-x train-keep", "fp32", dict(base_fwd, HAS_XQ=False, HAS_SHIFT=True, DROPOUT=True,
                                                                 HAS_KEEP=True, SPLIT_WQ=False)))
        if not quick:  # FUSEDADAPTER_TRITON_PRECAST=1: w_down cast to bf16 once (w_query is hi/lo split)
            out.append(("bf16 shared-x eval relu precast", "bf16", dict(out[0][2], _ROLES=dict(wd_ptr="act"))))
            # FUSEDADAPTER_TRITON_PRESPLIT=1: w_query's [hi; lo] halves in bf16, no split in the loop
            for i, tag in ((0, "eval"), (1, "train-hash")):
                out.append((f"bf16 shared-x {tag} relu presplit", "bf16",
                            dict(out[i][2], SPLIT_WQ=False, PRESPLIT_WQ=True, _ROLES=dict(wq_ptr="act"))))
            # fusion_triton_grouped (multi-task serving): K fusions' row groups in one launch
            out.append(("bf16 shared-x eval relu grouped", "bf16", dict(out[0][2], GROUPED=True)))
            out.append(("fp32 xq eval mixed-acts grouped", "fp32",
                        dict(out[0][2], HAS_XQ=True, SPLIT_WQ=False, ACT_MASK=(1 << 1) | (1 << 2), UNIFORM_ACT=-1,
                             GROUPED=True)))
            # the grouped op under autograd (multi-task training): per-group dropout seeds
            out.append(("bf16 shared-x train-hash relu grouped", "bf16", dict(out[1][2], GROUPED=True)))
    elif name == "fwd_gemm2":
        v1 = dict(HAS_RES=True, P_ONCE=False, N_PAD=16, GROUPED=False)
        out.append(("bf16 residual", "bf16", v1))
        if not quick:
            out.append(("bf16 residual precast", "bf16", dict(v1, _ROLES=dict(wo_ptr="act"))))
            # FUSEDADAPTER_TRITON_GEMM2=v2: p once per tile, gathered in registers; w_out precast
            out.append(("bf16 residual v2", "bf16", dict(v1, P_ONCE=True, _ROLES=dict(wo_ptr="act"))))
            out.append(("fp32 residual", "fp32", v1))  # (v2 is a half-precision path: fp32 keeps v1)
            out.append(("bf16 residual grouped", "bf16", dict(v1, GROUPED=True)))
    elif name == "bwd_epilogue":
        common = dict(HAS_BD=True, HAS_BQ=True, HAS_GP=True, STORE_G=True, STORE_WM=True, ACT_MASK=2, UNIFORM_ACT=1,
                      N_PAD=16, SPLIT_WD=False, SPLIT_WQ=False, GROUPED=False)
        out.append(("bf16 shared-x train-hash", "bf16", dict(common, HAS_XQ=False, DROPOUT=True, HAS_KEEP=False,
                                                             STORE_DSHIFT=True)))
        if not quick:
            out.append(("bf16 shared-x train-hash precast", "bf16",
                        dict(out[0][2], _ROLES=dict(wd_ptr="act", wq_ptr="act", wo_ptr="act"))))
            out.append(("bf16 xq eval mixed-acts N32", "bf16",
                        dict(common, HAS_XQ=True, DROPOUT=False, HAS_KEEP=False, STORE_DSHIFT=False,
                             ACT_MASK=(1 << 2) | (1 << 3) | (1 << 8), UNIFORM_ACT=-1, N_PAD=32)))
            out.append(("fp32 shared-x eval", "fp32", dict(common, HAS_XQ=False, DROPOUT=False, HAS_KEEP=False,
                                                           STORE_DSHIFT=False)))
            out.append(("bf16 xq train-hash grouped", "bf16", dict(common, HAS_XQ=True, DROPOUT=True, HAS_KEEP=False,
                                                                   STORE_DSHIFT=True, GROUPED=True)))
    elif name == "mm":
        out.append(("bf16 operands", "bf16", dict(GROUPED=False)))
        if not quick:
            out.append(("fp32 operands", "fp32", dict(GROUPED=False)))
            out.append(("bf16 operands grouped", "bf16", dict(GROUPED=True)))  # the grouped op's backward
    if not quick:  # float64 runs on its own small config (configs.FP64_CONFIG)
        first = dict(out[0][2])
        if "SPLIT_WQ" in first:
            first["SPLIT_WQ"] = False
        out.append(("fp64", "fp64", first))
    return out


def _resources(cubin: bytes, tool: str):
    """cuobjdump's resource line: registers, stack, static shared memory (LOCAL is always 0 here)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", text)
    return {k: int(v) for k, v in zip(("regs", "stack", "static_shared", "local"), m.groups())} if m else {}


_PTXAS_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """``ptxas -v`` output -> {"ptxas_regs", "stack_frame", "spill_stores", "spill_loads"} (bytes; the
    sums over the entry functions the log lists, one for a Triton kernel). {} when the log has none."""
    props = _PTXAS_PROPS.findall(log)
    regs = _PTXAS_REGS.findall(log)
    if not props:
        return {}
    out = {"stack_frame": sum(int(a) for a, _, _ in props), "spill_stores": sum(int(b) for _, b, _ in props),
           "spill_loads": sum(int(c) for _, _, c in props)}
    if regs:
        out["ptxas_regs"] = max(int(r) for r in regs)
    return out


def spills(row: dict) -> int:
    """Bytes a compiled config spills (stores + loads); a stack frame without spills counts too."""
    return int(row.get("spill_stores", 0)) + int(row.get("spill_loads", 0)) + int(row.get("stack_frame", 0))


def _ptxas_flags() -> list:
    """The flags Triton's NVIDIA backend passes ptxas besides -v, the arch, input and output."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    flags = ["-lineinfo"]
    try:
        if "regAllocOptLevel" in inspect.getsource(CUDABackend.make_cubin):
            flags.append("--regAllocOptLevel=2")
    except (OSError, TypeError):  # pragma: no cover - no source shipped
        pass
    return flags


def ptxas_report(ptx: str, arch: int, ptxas: str, flags=None) -> dict:
    """Run ``ptxas -v`` on ``ptx`` for ``sm_<arch>[a]`` and parse what it says (see :func:`parse_ptxas`)."""
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory(prefix="fa-ptxas-") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, *(flags if flags is not None else _ptxas_flags()), "-v", f"--gpu-name={gpu}",
                               src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    rep = parse_ptxas(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not rep:
        rep["ptxas_error"] = (proc.stdout + proc.stderr)[-400:] or f"exit {proc.returncode}"
    return rep


def compile_one(name, fn, label, dt, flags, cfg, arch, *, ptxas=None, flags_ptxas=None, cuobjdump=None,
                aligned=True):
    """Compile kernel ``name`` (variant ``label``) with block config ``cfg`` for ``sm_<arch>``: one report row.
    ``aligned``: the divisibility hints Triton's JIT gives the target row's call (see ``_DIVISIBLE``)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import configs

    tl_types = {"bf16": ("*bf16", tl.bfloat16), "fp32": ("*fp32", tl.float32), "fp16": ("*fp16", tl.float16),
                "fp64": ("*fp64", tl.float64)}
    act_ptr, act_tl = tl_types[dt]
    acc_ptr, acc_tl = tl_types["fp64"] if dt == "fp64" else tl_types["fp32"]
    flags = dict(flags)
    roles = dict(_PTRS[name], **flags.pop("_ROLES", {}))
    consts = dict(flags, ACC=acc_tl, DOT=act_tl, **{k: cfg[k] for k in configs.BLOCK_KEYS[name]})
    sig = {}
    for arg in fn.arg_names:
        role = roles.get(arg)
        if role is not None:
            sig[arg] = {"act": act_ptr, "acc": acc_ptr, "i32": "*i32", "i64": "*i64", "u8": "*u8", "f32": "*fp32"}[role]
        elif arg in consts:
            sig[arg] = "constexpr"
        else:
            sig[arg] = "fp32" if arg in _FLOATS else "i32"
    attrs = {}
    if aligned:
        for i, arg in enumerate(fn.arg_names):
            if sig[arg].startswith("*") or (sig[arg] == "i32" and arg in _DIVISIBLE[name]):
                attrs[(i,)] = [["tt.divisibility", 16]]
    row = dict(kernel=name, variant=label, config={k: cfg[k] for k in cfg},
               target=label in TARGET_VARIANTS.get(name, ()), aligned=aligned)
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    except Exception as exc:  # noqa: BLE001 - report every failure
        row.update(error=f"{type(exc).__name__}: {str(exc)[:400]}")
        return row
    ttgir = k.asm.get("ttgir", "")
    row.update(seconds=round(time.time() - t0, 2), shared=k.metadata.shared,
               wgmma=ttgir.count("warp_group_dot"), mma=ttgir.count("tt.dot"))
    if cuobjdump:
        row.update(_resources(k.asm["cubin"], cuobjdump))
    if ptxas:
        row.update(ptxas_report(k.asm["ptx"], arch, ptxas, flags_ptxas))
    limit = _SMEM_LIMIT.get(arch // 10, 99 * 1024)
    if k.metadata.shared > limit:
        row["error"] = f"shared memory {k.metadata.shared} > {limit}"
    return row


def _tools(arch: int = 90):
    """(ptxas, cuobjdump): the ptxas Triton itself compiles ``sm_<arch>`` with (Triton >= 3.7 uses its
    ``ptxas-blackwell`` for sm_90 too; the PTX it writes is too new for the older bundled ptxas)."""
    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = os.path.join(bindir, "ptxas")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(arch).path
    except ImportError:
        try:
            from triton import knobs

            ptxas = knobs.nvidia.ptxas.path
        except Exception:  # noqa: BLE001 - older Triton: the bundled binary
            pass
    return ptxas, os.path.join(bindir, "cuobjdump")


def run(arch: int = 90, quick: bool = False, kernels=None, target_only: bool = False, candidates=None,
        aligned: bool = True, variants=None):
    """Compile every (kernel, variant, config); returns (ok, rows). ``candidates``: {kernel: [config, ...]}
    to compile instead of ``configs.GPU_CONFIGS`` (the config search of ``configs.py``). ``variants``: only
    the variants with these labels (with ``quick``: at the first config of each)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("aot_check: unset TRITON_INTERPRET (the kernels must be compiled, not interpreted)")
    from . import fusion

    fns = {"fwd_gemm1": fusion._fwd_gemm1_kernel, "fwd_gemm2": fusion._fwd_gemm2_kernel,
           "bwd_epilogue": fusion._bwd_epilogue_kernel, "mm": fusion._mm_kernel}
    ptxas, cuobjdump = _tools(arch)
    pflags = _ptxas_flags()
    rows, ok = [], True
    try:
        _compile_all(fns, rows, arch, quick, kernels, target_only, candidates, aligned, ptxas, cuobjdump, pflags,
                     variants)
    except KeyboardInterrupt:  # `timeout --signal=INT` (device_check.sh): report what was compiled
        rows.append(dict(kernel="-", variant="-", config={}, error="interrupted: the rest was not compiled"))
    ok = all("error" not in r for r in rows)
    return ok, rows


def _compile_all(fns, rows, arch, quick, kernels, target_only, candidates, aligned, ptxas, cuobjdump, pflags,
                 variants=None):
    from . import configs

    for name, fn in fns.items():
        if kernels and name not in kernels:
            continue
        cfgs = (candidates or {}).get(name) or configs.GPU_CONFIGS[name]
        if quick:
            cfgs = cfgs[:1]
        for label, dt, flags in _variants(name, quick and not variants):
            if target_only and label not in TARGET_VARIANTS.get(name, ()):
                continue
            if variants and label not in variants:
                continue
            for cfg in ([configs.FP64_CONFIG[name]] if dt == "fp64" else cfgs):
                rows.append(compile_one(name, fn, label, dt, flags, cfg, arch, ptxas=ptxas, flags_ptxas=pflags,
                                        cuobjdump=cuobjdump, aligned=aligned))


def spill_summary(rows) -> dict:
    """{"compiled", "spilling", "target_spilling": [labels], "ptxas_missing"}: what the report says about spills."""
    done = [r for r in rows if "shared" in r]
    spilling = [r for r in done if spills(r) > 0]
    return {"compiled": len(done), "spilling": len(spilling),
            "target_spilling": [_label(r) for r in spilling if r.get("target")],
            "ptxas_missing": [_label(r) for r in done if "spill_stores" not in r],
            "interrupted": any(r.get("kernel") == "-" for r in rows)}


def _triton_version() -> str:
    import triton

    return triton.__version__


def _label(r) -> str:
    cfg = "x".join(str(v) for k, v in r["config"].items() if k.startswith("BLOCK"))
    return f"{r['kernel']} [{r['variant']}] {cfg} w{r['config'].get('num_warps')} s{r['config'].get('num_stages')}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80, 90, ...)")
    ap.add_argument("--quick", action="store_true", help="first config and first (target-row) variant of each kernel")
    ap.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    ap.add_argument("--target-only", action="store_true", help="only the issue-3 target row's variants")
    ap.add_argument("--variant", action="append", help="only the variant with this label (repeatable)")
    ap.add_argument("--require-no-spills", action="store_true",
                    help="exit 1 if a target-row variant spills (ptxas spill stores/loads or a stack frame)")
    ap.add_argument("--unaligned", action="store_true",
                    help="compile without the target row's divisibility hints (the unaligned-shape worst case)")
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    ap.add_argument("--json-out", help="also write {rows, summary} as JSON to this file")
    args = ap.parse_args(argv)
    ok, rows = run(args.arch, args.quick, kernels=args.kernel, target_only=args.target_only,
                   aligned=not args.unaligned, variants=args.variant)
    summary = spill_summary(rows)
    summary.update(arch=args.arch, triton=_triton_version(), aligned=not args.unaligned)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"rows": rows, "summary": summary}, f, indent=1)
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=1))
    else:
        for r in rows:
            cfg = "x".join(str(v) for k, v in r["config"].items() if k.startswith("BLOCK"))
            cfg += f" w{r['config'].get('num_warps')} s{r['config'].get('num_stages')}"
            tag = "*" if r.get("target") else " "
            if "error" in r and "shared" not in r:
                print(f"{r['kernel']:13s}{tag}{r['variant']:40s} {cfg:18s} ERROR {r['error']}")
                continue
            print(f"{r['kernel']:13s}{tag}{r['variant']:40s} {cfg:18s} smem {r['shared']:6d} "
                  f"regs {r.get('ptxas_regs', r.get('regs', '?')):>3} "
                  f"spill_st {r.get('spill_stores', '?'):>5} spill_ld {r.get('spill_loads', '?'):>5} "
                  f"stack {r.get('stack_frame', '?'):>5} wgmma {r['wgmma']} dots {r['mma']} {r['seconds']:5.1f}s"
                  + (f"  ERROR {r['error']}" if "error" in r else "")
                  + (f"  PTXAS {r['ptxas_error'][:120]!r}" if "ptxas_error" in r else ""))
        print(f"aot_check: {summary['compiled']} compiled, {summary['spilling']} spill (ptxas -v); "
              f"target-row configs (*) spilling: {len(summary['target_spilling'])}")
        for lab in summary["target_spilling"]:
            print(f"  target spills: {lab}")
    if summary["ptxas_missing"]:
        ok = False
        print(f"aot_check: no ptxas -v report for {len(summary['ptxas_missing'])} compile(s)", file=sys.stderr)
    if args.require_no_spills and summary["target_spilling"]:
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
