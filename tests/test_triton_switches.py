"""The Triton switches the device check flips (FUSEDADAPTER_TRITON_*): each side must compute what it
says. PRECAST (weights cast to the half dtype once instead of tile by tile in the kernels) gives
bit-identical results; its cache follows in-place updates. Runs in the interpreter without a GPU."""

import pytest
import torch

fusion = pytest.importorskip("fusedadapter.kernels.fusion", reason="needs the `triton` package")
from conftest import _cuda_present  # noqa: E402

DEV = "cuda" if _cuda_present() and not fusion.INTERPRET else "cpu"
OP = torch.ops.fusedadapter.fusion_triton
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


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
