"""kernels/aot_check.py's spill report (what ptxas -v says, not cuobjdump's LOCAL field) and the
Triton autotune keys. The compile runs where Triton's NVIDIA toolchain is installed (no GPU needed)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

fusion = pytest.importorskip("fusedadapter.kernels.fusion", reason="needs the `triton` package")
from fusedadapter.kernels import aot_check  # noqa: E402

# ptxas -v output as ptxas 13 writes it for a Triton kernel (one entry function)
PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_fwd_gemm1_kernel' for 'sm_90a'
ptxas info    : Function properties for _fwd_gemm1_kernel
    376 bytes stack frame, 420 bytes spill stores, 624 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 376 bytes cumulative stack size
"""


def test_parse_ptxas_reads_spills_and_stack():
    rep = aot_check.parse_ptxas(PTXAS_LOG)
    assert rep == {"stack_frame": 376, "spill_stores": 420, "spill_loads": 624, "ptxas_regs": 255}
    assert aot_check.spills(rep) == 376 + 420 + 624
    clean = PTXAS_LOG.replace("376 bytes stack frame, 420 bytes spill stores, 624 bytes spill loads",
                              "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
    assert aot_check.spills(aot_check.parse_ptxas(clean)) == 0
    assert aot_check.parse_ptxas("no ptxas output") == {}


def test_spill_summary_flags_target_rows():
    rows = [dict(kernel="fwd_gemm1", variant="bf16 shared-x eval relu", target=True, shared=1,
                 config=dict(BLOCK_M=64, BLOCK_R=32, BLOCK_K=64, num_warps=4, num_stages=3), spill_stores=8,
                 spill_loads=8, stack_frame=8),
            dict(kernel="mm", variant="fp32 operands", target=False, shared=1,
                 config=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4), spill_stores=4,
                 spill_loads=4, stack_frame=4),
            dict(kernel="mm", variant="bf16 operands", target=True, shared=1,
                 config=dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4))]
    s = aot_check.spill_summary(rows)
    assert s["compiled"] == 3 and s["spilling"] == 2
    assert s["target_spilling"] == ["fwd_gemm1 [bf16 shared-x eval relu] 64x32x64 w4 s3"]
    assert s["ptxas_missing"] == ["mm [bf16 operands] 64x64x64 w4 s4"]


def test_autotune_keys_include_the_flags_that_change_the_kernel():
    # an eval-tuned config must not be reused for training calls (dropout) or masked calls
    assert {"DROPOUT", "HAS_AMASK", "ACT_MASK", "DOT", "M_KEY"} <= set(fusion._FWD1.key)
    assert {"DROPOUT", "ACT_MASK", "STORE_G", "STORE_WM", "STORE_DSHIFT", "DOT"} <= set(fusion._BWD1.key)
    assert {"SPLIT_WQ", "PRESPLIT_WQ"} <= set(fusion._FWD1.key) and "P_ONCE" in fusion._FWD2.key  # the switches
    for launcher in (fusion._FWD1, fusion._FWD2, fusion._BWD1, fusion._MM):
        assert set(launcher.key) <= set(launcher.fn.arg_names), launcher.name


def _nvidia_toolchain() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and os.path.exists(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin",
                                                            "ptxas"))


@pytest.mark.skipif(not _nvidia_toolchain(), reason="needs Triton's bundled ptxas")
def test_target_row_kernels_do_not_spill_on_sm90(tmp_path):
    # the first config of each kernel at the target row's variant (the same compiles as test_triton's
    # sm_90 check, so Triton's cache serves them), with ptxas -v's spill stores/loads and stack frame
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "spills.json"
    proc = subprocess.run([sys.executable, "-m", "fusedadapter.kernels.aot_check", "--quick", "--arch", "90",
                           "--require-no-spills", "--json-out", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and data["summary"]["ptxas_missing"] == []
    for row in data["rows"]:
        assert row["target"] and row["aligned"]
        assert row["spill_stores"] == row["spill_loads"] == row["stack_frame"] == 0, row


@pytest.mark.skipif(not _nvidia_toolchain(), reason="needs Triton's bundled ptxas")
def test_switched_kernels_do_not_spill_on_sm90(tmp_path):
    # the new sides of the device check's kernel switches at the target row, first config of each:
    # FUSEDADAPTER_TRITON_GEMM2=v2 (p once per tile) and FUSEDADAPTER_TRITON_PRESPLIT=1 (w_query [hi; lo])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "spills.json"
    labels = ["bf16 residual v2", "bf16 shared-x eval relu presplit"]
    proc = subprocess.run([sys.executable, "-m", "fusedadapter.kernels.aot_check", "--quick", "--arch", "90",
                           "--require-no-spills", "--json-out", str(out), *(f"--variant={v}" for v in labels)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert sorted(r["variant"] for r in rows) == sorted(labels)
    for row in rows:
        assert row["target"] and row["spill_stores"] == row["spill_loads"] == row["stack_frame"] == 0, row


def test_compile_check_reads_cuda_kernel_spills():
    # csrc/compile_check.py passes -Xptxas -v to nvcc and reports each CUDA kernel's spills
    from fusedadapter.csrc.compile_check import ptxas_spills

    log = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
           "ptxas info    : Function properties for _Z3fooPf\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 0 barriers\n"
           "ptxas info    : Function properties for _Z3barv\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n")
    rows = ptxas_spills(log)
    assert [(r["stack_frame"], r["spill_stores"], r["spill_loads"]) for r in rows] == [(8, 4, 12), (0, 0, 0)]
    assert rows[0]["function"] in ("foo(float*)", "_Z3fooPf")  # demangled where c++filt exists
