"""Numerics: unscaled logits in half precision, NaN/Inf propagation, ties, N=1."""

import copy
import math

import pytest
import torch

import fusedadapter as fa
from backends import backend_params, runnable_dtypes
from fusedadapter.testing import assert_oracle
from parity import make_inputs, make_site


def runnable_backends():
    """torch, cpu and triton on the CPU; one that cannot run is a skip naming why (tests/backends.py)."""
    return backend_params(("torch", "cpu", "triton"), "cpu")


def half_dtypes(backend):
    # the half dtypes the backend accepts here: the Triton interpreter refuses bf16 (BackendUnavailable:
    # its bf16 arithmetic is wrong), so bf16 Triton runs on GPU only
    return runnable_dtypes(backend, [torch.bfloat16, torch.float16], "cpu")


@pytest.mark.parametrize("backend", runnable_backends())
def test_adversarially_large_logits_do_not_overflow(backend):
    # Large query/key weights: logits in the thousands; exp() would overflow fp16 (max 65504) and
    # even fp32 without the max subtracted. Probabilities must stay finite and match the reference.
    site = make_site(32, [6, 6, 6], ["relu", "relu", "relu"])
    with torch.no_grad():
        site.query.weight.mul_(30.0)
        site.key.weight.mul_(30.0)
    a, res, _, _ = make_inputs(site, lead=(2, 5))
    truth = copy.deepcopy(site).eval()
    truth_out, truth_p = truth(a, res, return_probs=True)
    assert truth_p.max() > 0.99  # the test really is in the saturated regime
    for dtype in half_dtypes(backend):
        m = copy.deepcopy(site).to(dtype).eval()
        ref_out, ref_p = m(a.to(dtype), res.to(dtype), return_probs=True)
        m.backend = backend
        out, p = m(a.to(dtype), res.to(dtype), return_probs=True)
        assert torch.isfinite(out).all() and torch.isfinite(p).all()
        # truth on the weights/inputs the backend saw
        t = copy.deepcopy(site).to(dtype).double().eval()
        t_out, t_p = t(a.to(dtype).double(), res.to(dtype).double(), return_probs=True)
        assert_oracle(out, ref_out, t_out, dtype, "out")
        assert_oracle(p, ref_p, t_p, dtype, "probs")


@pytest.mark.parametrize("backend", runnable_backends())
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_propagate_like_the_reference(backend, bad):
    site = make_site(16, [4, 4], ["relu", "tanh"]).float().eval()
    a, res, _, _ = make_inputs(site, lead=(4,))
    a, res = a.float(), res.float()
    a[1, 3] = bad
    res[2, 5] = bad
    ref = site(a, res)
    site.backend = backend
    out = site(a, res)
    # non-finite exactly where the reference is non-finite; finite rows stay finite (never zeroed)
    assert torch.equal(torch.isfinite(out), torch.isfinite(ref))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", runnable_backends())
def test_all_equal_logits_give_uniform_probs(backend):
    # Identical adapters -> identical keys -> equal logits -> p = 1/N exactly (up to rounding).
    n = 5
    site = fa.FusedAdapterFusion(16, [fa.AdapterConfig(bottleneck_size=4)] * n, backend=backend).eval()
    with torch.no_grad():
        first = site.adapters["0"].state_dict()
        for name in site.adapter_names[1:]:
            site.adapters[name].load_state_dict(first)
    x = torch.randn(3, 16)
    _, p = site(x, x, return_probs=True)
    torch.testing.assert_close(p, torch.full_like(p, 1.0 / n), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", runnable_backends())
def test_single_adapter(backend):
    site = make_site(16, [5], ["gelu"]).float().eval()
    a, res, _, _ = make_inputs(site, lead=(6,))
    a, res = a.float(), res.float()
    ref_out, ref_p = site(a, res, return_probs=True)
    site.backend = backend
    out, p = site(a, res, return_probs=True)
    assert torch.equal(p, torch.ones_like(p))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


def test_temperature_floor_is_one():
    site = make_site(8, [2, 2], ["relu", "relu"], temperature=True)
    site.eval()
    a, res, _, _ = make_inputs(site, lead=(2,))
    for _ in range(1100):
        site.step_temperature()
    assert site.T == 1.0 and not math.isnan(site(a, res).sum().item())
