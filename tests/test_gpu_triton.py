"""GPU-only tests of the `triton` backend: what the rest of the suite skips on a GPU machine or cannot
check in the interpreter. Skipped without CUDA (CI); ``benchmarks/device_check.sh`` runs them first.

- adapter masks through the compiled kernels (tests/test_adapter_mask.py's Triton tests need the
  interpreter, so they skip on a GPU machine), fp32 / fp16 / bf16, eval and train;
- tests/test_numerics.py's cases (saturated logits, NaN/Inf propagation, ties, N=1) for Triton on
  the GPU (that file lists only the backends that take CPU tensors), with bf16 added;
- bf16 parity with CUDA tensors end to end (bf16 is wrong in the interpreter, so it is checked
  only here), forward and backward, with dropout;
- every config of the autotune lists (configs.GPU_CONFIGS), one run each, forward and backward
  with dropout replayed against the torch op;
- dropout replay: the same seed gives the same mask and output twice, and the torch op's;
- the new sides of the kernel switches the device check times (kernels/fusion.py GEMM2=v2, PRESPLIT,
  PRECAST, each alone and together), forward and backward at bf16 and fp16, and every autotune config
  with all of them on.

``FUSEDADAPTER_GPU_TESTS_IN_INTERPRETER=1`` runs the non-bf16 cases through the Triton interpreter
on CPU instead (to check the tests themselves where no GPU is; slow).
"""

import os

import pytest
import torch

from backends import bridge_to_cuda
from conftest import _cuda_present
from parity import check_parity, make_site

fusion = pytest.importorskip("fusedadapter.kernels.fusion", reason="needs the `triton` package")
from fusedadapter.kernels import configs  # noqa: E402

ON_GPU = _cuda_present() and not fusion.INTERPRET
IN_INTERPRETER = (not ON_GPU) and fusion.INTERPRET and os.environ.get("FUSEDADAPTER_GPU_TESTS_IN_INTERPRETER") == "1"
DEV = "cuda" if ON_GPU else "cpu"
OP = torch.ops.fusedadapter.fusion_triton
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_GPU or IN_INTERPRETER), reason="needs a CUDA device (the compiled Triton kernels)"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
BF16 = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(not ON_GPU, reason="bf16: GPU only"))


@pytest.fixture(autouse=True)
def _gpu_setup(monkeypatch):
    """As tests/test_triton.py on a GPU: CPU-tensor sites run the op on CUDA (a bridge through copies,
    autograd flows through), one fixed config per kernel, fresh outputs poisoned with NaN."""
    monkeypatch.setattr(fusion, "POISON_OUTPUTS", True)
    if ON_GPU:
        bridge_to_cuda(monkeypatch, "triton", OP)
        monkeypatch.setattr(fusion, "CONFIG_OVERRIDE", dict(configs.GPU_DEFAULT))
    yield


# ---------------------------------------------------------------------------------------------- masks
MASK_CASES = [pytest.param(torch.float32, "token", id="fp32-token"), pytest.param(torch.float16, "batch", id="fp16-batch"),
              pytest.param(torch.bfloat16, "token", id="bf16-token", marks=BF16.marks),
              pytest.param(torch.bfloat16, "batch", id="bf16-batch", marks=BF16.marks)]


@pytest.mark.parametrize("dtype,kind", MASK_CASES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gpu_adapter_mask_parity(dtype, kind, train):
    from test_adapter_mask import masks

    site = make_site(40, [3, 8, 5, 6], ["relu", "gelu", "swish", "tanh"], ln_before=(1,), seed=4)
    check_parity("triton", site, dtype, train=train, seed=5, adapter_mask=masks(n=4, seed=3)[kind])


# ------------------------------------------------------------------------------------------ numerics
NUMERICS = ["test_adversarially_large_logits_do_not_overflow", "test_all_equal_logits_give_uniform_probs",
            "test_single_adapter", "test_nan_and_inf_propagate_like_the_reference"]


@pytest.mark.parametrize("name", NUMERICS)
def test_gpu_numerics(name, monkeypatch):
    import test_numerics

    # on the GPU bf16 is real: both half dtypes (the interpreter: fp16 only, as test_numerics has it)
    halves = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float16]
    monkeypatch.setattr(test_numerics, "half_dtypes", lambda backend: halves)
    fn = getattr(test_numerics, name)
    if name == "test_nan_and_inf_propagate_like_the_reference":
        for bad in (float("nan"), float("inf"), -float("inf")):
            fn("triton", bad)
    else:
        fn("triton")


# ------------------------------------------------------------------------------------- bf16 on CUDA
@pytest.mark.skipif(not ON_GPU, reason="bf16: GPU only")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gpu_bf16_parity_cuda_tensors(train):
    # the site, its inputs, the reference and the op all on CUDA (no bridge); truth: fp64 on CPU
    from test_native import _check_parity_on

    site = make_site(768, [48] * 8, ["relu"] * 8, seed=8)
    if train:
        site.dropout_p = 0.1
    _check_parity_on("cuda", "triton", site, torch.bfloat16, lead=(2, 200), train=train)


# ---------------------------------------------------------------------- every autotune config, dropout
def _case(dtype, m=300, hidden=256, widths=(32,) * 8):
    from test_triton import _op_args

    return _op_args(m, hidden, list(widths), hidden, dtype=dtype, dropout_p=0.1, seed=7, shift=True, device=DEV,
                    gen_seed=1)


def _compare(args, dtype):
    from test_triton import _grads

    got = _grads(OP, args)
    want = _grads(torch.ops.fusedadapter.fusion_torch, args)
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}[dtype]
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.skipif(not ON_GPU, reason="the GPU configs compile only for a GPU")
@pytest.mark.parametrize("index", range(max(len(c) for c in configs.GPU_CONFIGS.values())))
def test_gpu_every_config(index, monkeypatch):
    # config `index` of every kernel's autotune list (fixed, no autotuner): bf16 (the target dtype),
    # and fp32 for the first (each config is a fresh JIT compile of every kernel variant)
    override = {name: cfgs[index % len(cfgs)] for name, cfgs in configs.GPU_CONFIGS.items()}
    monkeypatch.setattr(fusion, "CONFIG_OVERRIDE", override)
    for dtype in ((torch.bfloat16, torch.float32) if index == 0 else (torch.bfloat16,)):
        _compare(_case(dtype), dtype)
    for k, v in SWITCHES["new"].items():  # the same config with the switches' new sides
        monkeypatch.setattr(fusion, k, v)
    _compare(_case(torch.bfloat16), torch.bfloat16)


# kernels/fusion.py switches (FUSEDADAPTER_TRITON_GEMM2 / _PRESPLIT / _PRECAST): their new sides
SWITCHES = {"gemm2-v2": dict(GEMM2="v2"), "presplit": dict(PRESPLIT=True), "precast": dict(PRECAST=True),
            "new": dict(GEMM2="v2", PRESPLIT=True, PRECAST=True)}


@pytest.mark.parametrize("dtype", [BF16, pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("switch", list(SWITCHES))
def test_gpu_switch_sides(switch, dtype, monkeypatch):
    for k, v in SWITCHES[switch].items():
        monkeypatch.setattr(fusion, k, v)
    _compare(_case(dtype), dtype)


@pytest.mark.skipif(not ON_GPU, reason="bf16: GPU only")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gpu_switches_hold_the_oracle_bf16(train, monkeypatch):
    # the target row's shape (H=768, 8 adapters of 48) and a mixed site, every new side on
    for k, v in SWITCHES["new"].items():
        monkeypatch.setattr(fusion, k, v)
    for seed, widths, acts in [(0, [3, 8, 13], ["relu", "gelu", "swish"]), (8, [48] * 8, ["relu"] * 8)]:
        site = make_site(768 if len(widths) == 8 else 40, widths, acts, seed=seed)
        check_parity("triton", site, torch.bfloat16, train=train, seed=seed + 1, lead=(2, 100))


def test_gpu_dropout_replay():
    dtype = torch.float32
    args = _case(dtype, m=200, hidden=64, widths=(16,) * 4)
    out1, p1 = OP(*args)
    out2, p2 = OP(*args)
    assert torch.equal(out1, out2) and torch.equal(p1, p2)  # same seed, same mask, same numbers
    other = list(args)
    other[12] = 8
    out3, _ = OP(*other)
    assert not torch.equal(out1, out3)  # another seed draws another mask
    ref, ref_p = torch.ops.fusedadapter.fusion_torch(*args)
    torch.testing.assert_close(out1, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p1, ref_p, rtol=1e-4, atol=1e-4)
    dropped = fusion.hash_keep_mask_triton(7, 200, 4, 0.1, device=DEV)
    assert 0 < (~dropped).sum() < dropped.numel()


@pytest.mark.skipif(not ON_GPU, reason="bf16: GPU only")
@pytest.mark.xfail(strict=False, reason="unmeasured: whether bf16 holds the oracle without the w_query hi/lo split "
                                        "(FUSEDADAPTER_TRITON_SPLIT_BF16=0); an XPASS says the switch could be the default")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_gpu_bf16_without_query_split(train, monkeypatch):
    monkeypatch.setattr(fusion, "SPLIT_WEIGHTS_QUERY", {torch.float16})
    for seed, widths, acts in [(0, [3, 8, 13], ["relu", "gelu", "swish"]), (8, [48] * 8, ["relu"] * 8)]:
        site = make_site(768 if len(widths) == 8 else 40, widths, acts, seed=seed)
        check_parity("triton", site, torch.bfloat16, train=train, seed=seed + 1, lead=(2, 100))
