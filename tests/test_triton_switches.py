"""The Triton switches the device check flips (FUSEDADAPTER_TRITON_*): each side must compute what it
says. PRECAST (weights cast to the half dtype once instead of tile by tile in the kernels) and
PRESPLIT (w_query's hi/lo split made once on the host instead of in every GEMM1 CTA) give
bit-identical results; their cache follows in-place updates. GEMM2=v2 (p loaded once per tile,
gathered in registers) holds the docs/algorithm.md §4 oracle forward and backward and matches v1 to
fp32 rounding (the p columns' dot is summed in another order). Runs in the interpreter without a GPU."""

import pytest
import torch

fusion = pytest.importorskip("fusedadapter.kernels.fusion", reason="needs the `triton` package")
from conftest import _cuda_present  # noqa: E402

DEV = "cuda" if _cuda_present() and not fusion.INTERPRET else "cpu"
OP = torch.ops.fusedadapter.fusion_triton
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


@pytest.fixture(autouse=True)
def _gpu_setup(monkeypatch):
    """On a GPU, as tests/test_triton.py: CPU-tensor sites (tests/parity.py) run the op on CUDA through
    the bridge, one fixed config per kernel (no autotuning of every variant these tests create)."""
    if DEV == "cuda":
        from backends import bridge_to_cuda
        from fusedadapter.kernels import configs

        bridge_to_cuda(monkeypatch, "triton", OP)
        monkeypatch.setattr(fusion, "CONFIG_OVERRIDE", dict(configs.GPU_DEFAULT))
    yield


def _grads(args):
    from test_triton import _grads as grads

    return grads(OP, args)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_precast_is_bit_identical(train, monkeypatch):
    from test_triton import _op_args

    args = _op_args(37, 24, [5, 8, 3], 20, dtype=torch.float16, dropout_p=0.3 if train else 0.0, seed=4,
                    shift=train, device=DEV, gen_seed=2)
    monkeypatch.setattr(fusion, "PRECAST", False)
    want = _grads(args)
    monkeypatch.setattr(fusion, "PRECAST", True)
    got = _grads(args)
    for a, b in zip([got[0], got[1], *got[2]], [want[0], want[1], *want[2]]):
        assert torch.equal(a, b)


def test_precast_cache_follows_the_weight(monkeypatch):
    monkeypatch.setattr(fusion, "PRECAST", True)
    w = torch.randn(6, 4, dtype=torch.float32, device=DEV)
    c1 = fusion._dot_weight(w, torch.float16, False)
    assert c1.dtype == torch.float16 and torch.equal(c1, w.half())
    assert fusion._dot_weight(w, torch.float16, False) is c1  # cached
    w.mul_(2.0)  # in place: a new version, a new cast
    c2 = fusion._dot_weight(w, torch.float16, False)
    assert c2 is not c1 and torch.equal(c2, w.half())
    assert fusion._dot_weight(w, torch.float16, True) is w  # a hi/lo split weight stays fp32
    assert fusion._dot_weight(w, torch.float32, False) is w
    monkeypatch.setattr(fusion, "PRECAST", False)
    assert fusion._dot_weight(w, torch.float16, False) is w


def _flat(res):
    return [res[0], res[1], *res[2]]


@pytest.mark.parametrize("xq", [False, True], ids=["shared-x", "xq"])
def test_presplit_is_bit_identical(xq, monkeypatch):
    # fp16 splits w_query hi/lo; PRESPLIT makes the halves on the host: same operands, same dots
    from test_triton import _op_args

    args = _op_args(37, 24, [5, 8, 3], 20, dtype=torch.float16, xq=xq, dropout_p=0.3, seed=4, shift=True,
                    device=DEV, gen_seed=2)
    monkeypatch.setattr(fusion, "PRESPLIT", False)
    want = _grads(args)
    monkeypatch.setattr(fusion, "PRESPLIT", True)
    got = _grads(args)
    for a, b in zip(_flat(got), _flat(want)):
        assert torch.equal(a, b)


def test_presplit_halves_and_cache(monkeypatch):
    w = torch.randn(6, 40, dtype=torch.float32, device=DEV)
    s1 = fusion._split_weight(w, torch.float16)
    assert s1.shape == (2, 6, 40) and s1.dtype == torch.float16 and s1.is_contiguous()
    assert torch.equal(s1[0], w.half()) and torch.equal(s1[1], (w - w.half().float()).half())
    # hi + lo keeps ~2x fp16's mantissa: much closer to w than hi alone
    assert (s1[0].float() + s1[1].float() - w).abs().max() < 1e-2 * (s1[0].float() - w).abs().max()
    assert fusion._split_weight(w, torch.float16) is s1  # once per weight tensor (cached)
    w.add_(1.0)  # in place: a new version, a new split
    s2 = fusion._split_weight(w, torch.float16)
    assert s2 is not s1 and torch.equal(s2[0], w.half())


GEMM2_CASES = [  # (site seed, widths, activations): R not a multiple of the block, R < block, N = 5
    (0, [3, 8, 13], ["relu", "gelu", "swish"]),
    (2, [40, 30], ["relu", "tanh"]),
    (4, [2, 9, 4, 7, 1], ["gelu", "relu", "swish", "tanh", "relu"]),
]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", GEMM2_CASES, ids=lambda c: f"seed{c[0]}")
def test_gemm2_v2_holds_the_oracle(case, train, monkeypatch):
    # v2 is a half-precision path (fp16 here; bf16 on a GPU: tests/test_gpu_triton.py)
    from parity import check_parity, make_site

    seed, widths, acts = case
    monkeypatch.setattr(fusion, "GEMM2", "v2")
    site = make_site(40, widths, acts, seed=seed)
    check_parity("triton", site, torch.float16, train=train, seed=seed + 1, lead=(3, 13))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gemm2_v2_matches_v1(dtype, monkeypatch):
    # 70 rows (3 row blocks), R = 144 (several K blocks), N = 3, dropout: only the p columns' summation
    # order differs, so the two agree to rounding; outputs and every gradient. fp32 keeps v1 (v2 spills
    # there on sm_90): bit-identical.
    from test_triton import _op_args

    args = _op_args(70, 40, [48, 48, 48], 33, dtype=dtype, dropout_p=0.3, seed=4, shift=True, device=DEV,
                    gen_seed=2)
    monkeypatch.setattr(fusion, "GEMM2", "v1")
    want = _grads(args)
    monkeypatch.setattr(fusion, "GEMM2", "v2")
    got = _grads(args)
    for a, b in zip(_flat(got), _flat(want)):
        if dtype == torch.float32:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


def test_gemm2_switch_rejects_unknown_values():
    import subprocess
    import sys

    env = dict(__import__("os").environ, FUSEDADAPTER_TRITON_GEMM2="v3", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", "import fusedadapter.kernels.fusion"], env=env, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "FUSEDADAPTER_TRITON_GEMM2 must be v1 or v2" in proc.stderr


def test_cast_cache_keeps_live_weights_past_64_entries(monkeypatch):
    # a captured CUDA graph reads the cached casts: more live weights than 64 (a 24-layer model's sites)
    # must not clear the cache; entries of weights that are gone are dropped
    monkeypatch.setattr(fusion, "PRECAST", True)
    monkeypatch.setattr(fusion, "_CASTS", {})
    ws = [torch.randn(4, 4, device=DEV) for _ in range(80)]
    casts = [fusion._dot_weight(w, torch.float16, False) for w in ws]
    assert all(fusion._dot_weight(w, torch.float16, False) is c for w, c in zip(ws, casts))
    del ws[40:], casts[40:]
    fusion._dot_weight(torch.randn(4, 4, device=DEV), torch.float16, False)
    assert len(fusion._CASTS) <= 42  # the dead ones went
