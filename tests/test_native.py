"""The `cpu` backend (C++ extension in csrc/, built just in time) against the eager reference,
and the CUDA sources compiled with nvcc (no GPU needed).

Every kernel path of the CPU op is checked with the docs/algorithm.md §4 oracle (tests/parity.py): the
generic path (ATen BLAS + scalar epilogue), the AVX-512 small-M GEMM, BLAS GEMMs with the AVX-512
epilogue, and the AVX512-BF16 GEMMs. Paths the CPU cannot run are skipped.
"""

import copy
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import fusedadapter as fa
from fusedadapter import dispatch, extension
from fusedadapter.ops import FUSION_BACKWARD_SCHEMA, FUSION_SCHEMA, hash_keep_mask
from cases import ACTIVATIONS, CORE_FLAG_SETS, HAS_AVX512, flags_id
from parity import check_parity, make_inputs, make_site

ACTS = ACTIVATIONS


def _cfg(*args):
    return list(torch.ops.fusedadapter._cpu_config(*args))


# isa cap, small_m_max, bf16_min_m, f32_blas; see csrc/fusion_cpu.cpp
PATHS = {
    "generic": (0, 16, 16, 1),       # ATen BLAS + scalar epilogue
    "small": (2, 10**6, 10**6, 0),   # AVX-512 small-M GEMM
    "packed": (2, 0, 10**6, 0),      # AVX-512 packed fp32 GEMM
    "blas": (2, 0, 10**6, 1),        # ATen BLAS + AVX-512 epilogue
    "bf16": (2, 0, 0, 0),            # AVX512-BF16 GEMMs
}
NEEDS_ISA = {"generic": 0, "small": 1, "packed": 1, "blas": 1, "bf16": 2}


@pytest.fixture(params=list(PATHS))
def cpu_path(request, cpu_op):
    detected = _cfg()[0]
    if detected < NEEDS_ISA[request.param]:
        pytest.skip(f"this CPU has no {request.param} kernels")
    before = _cfg()
    _cfg(*PATHS[request.param])
    yield request.param
    _cfg(-1, before[2], before[3], before[5])


def test_schema_matches_ops(cpu_op):
    for name, schema in (("fusion_cpu", FUSION_SCHEMA), ("fusion_cpu_backward", FUSION_BACKWARD_SCHEMA)):
        want = torch._C.parse_schema(f"fusedadapter::{name}{schema}")
        got = getattr(torch.ops.fusedadapter, name).default._schema
        assert str(got) == str(want)


def test_named_gradient_slots_match_the_schema():
    # one naming of the backward's gradient slots: ops.FUSION_GRADS (derived from the schema) and the
    # C++ enum Grad / kGradNames in csrc/fusion_host.h, in the same order
    import re

    import fusedadapter.csrc
    from fusedadapter.ops import FUSION_ARGS, FUSION_GRADS

    schema_names = [a.split("=")[0].split()[-1] for a in FUSION_SCHEMA[1:FUSION_SCHEMA.index(") ->")].split(", ")]
    assert list(FUSION_ARGS) == schema_names
    assert FUSION_GRADS == ("xd", "xq", "residual", "w_down", "b_down", "w_query", "b_query", "w_out", "logit_shift")
    header = open(os.path.join(list(fusedadapter.csrc.__path__)[0], "fusion_host.h")).read()
    names = re.search(r"kGradNames\[kNumGrads\] = \{([^}]*)\}", header).group(1)
    assert tuple(re.findall(r'"(\w+)"', names)) == FUSION_GRADS
    enum = re.search(r"enum Grad : int \{([^}]*)\}", header).group(1)
    camel = ["kGrad" + "".join(w.title() for w in n.split("_")) for n in FUSION_GRADS] + ["kNumGrads"]
    assert re.findall(r"\b(k\w+)", enum) == camel


def test_backend_runs_through_the_module(cpu_op):
    site = make_site(32, [4, 6], ["relu", "gelu"]).eval()
    site.backend = "cpu"
    assert fa.available_backends("cpu")["cpu"] is None
    a, res, _, _ = make_inputs(site)
    with torch.inference_mode():
        out = site(a, res)
    site.backend = "reference"
    torch.testing.assert_close(out, site(a, res), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_parity_over_n_and_dtype(cpu_path, n, dtype):
    widths = [3 + (5 * i) % 11 for i in range(n)]  # mixed widths
    acts = [ACTS[i % len(ACTS)] for i in range(n)]
    site = make_site(40, widths, acts, seed=n)
    check_parity("cpu", site, dtype)
    if n < 16:
        check_parity("cpu", site, dtype, train=True, lead=(2, 5))


# fp32 failed here (d_key.weight 1.03x the bound) until the backward epilogue's row math went to double
# (issue 13); it must pass now.
@pytest.mark.parametrize("dtype", [
    pytest.param(torch.float64, marks=pytest.mark.xfail(
        strict=False, reason="training-mode gradients at N=16 sit at the oracle's edge for every folded backend: fp64 "
        "d_key.bias is pure cancellation (the torch backend: 9.6e-11 vs the 1e-12 floor); see the report of issue 4")),
    torch.float32], ids=str)
def test_training_grads_many_adapters_at_the_oracle_edge(cpu_op, dtype):
    n = 16
    site = make_site(40, [3 + (5 * i) % 11 for i in range(n)], [ACTS[i % len(ACTS)] for i in range(n)], seed=n)
    try:
        check_parity("cpu", site, dtype, train=True, lead=(2, 5))
    except AssertionError as e:
        if dtype != torch.float32 or HAS_AVX512:
            raise
        # Known open defect (closing note of issue 11's stop 18): on a CPU without AVX-512 (ATen's AVX2 GEMMs round
        # differently) the fp32 d_query.weight here is 2.30e-6 against a bound of 2.25e-6 (1.02x); it holds on
        # AVX-512. Reported as xfail, not hidden; the oracle is unchanged.
        pytest.xfail(f"fp32 gradient at the oracle edge on this AVX2-only CPU: {e}")


# Issue 13: the cpu backend's fp32 gradient tail (measured by benchmarks/grad_tail.py). The worst sites
# found: H=17, N=20 mixed widths (1-256) and activations, ln_before on every other adapter, key and value
# off, one token. With the softmax backward in fp32 the fusion-weight gradients were 8.7x-11.6x past the
# oracle's bound (the torch backend, which runs the plain form at R > 2H: 0.1x-0.5x); csrc/fusion_cpu.cpp's
# epilogue_backward now does the per-row logit, softmax and dl math in double.
TAIL_SITES = [
    (62040, False, [256, 8, 2, 8, 256, 1, 33, 5, 33, 16, 16, 128, 16, 64, 128, 17, 3, 5, 33, 128],
     ["gelu_new", "quick_gelu", "tanh", "linear", "leakyrelu", "sigmoid", "tanh", "linear", "swish", "quick_gelu",
      "sigmoid", "quick_gelu", "leakyrelu", "sigmoid", "linear", "quick_gelu", "relu", "relu", "swish", "swish"]),
    (46021, False, [33, 16, 17, 256, 128, 2, 128, 5, 5, 16, 1, 16, 17, 8, 17, 2, 64, 16, 1, 64],
     ["tanh", "gelu", "tanh", "quick_gelu", "quick_gelu", "sigmoid", "tanh", "sigmoid", "gelu_new", "leakyrelu",
      "leakyrelu", "quick_gelu", "sigmoid", "linear", "gelu_new", "gelu_new", "leakyrelu", "linear", "swish",
      "gelu_new"]),
    (38630, True, [2, 17, 33, 1, 2, 2, 5, 128, 256, 2, 3, 8, 33, 3, 3, 128, 3, 17, 3, 2],
     ["swish", "relu", "quick_gelu", "gelu", "leakyrelu", "gelu", "tanh", "relu", "gelu", "leakyrelu", "gelu_new",
      "relu", "leakyrelu", "gelu", "sigmoid", "linear", "linear", "sigmoid", "sigmoid", "relu"]),
]


@pytest.mark.parametrize("case", TAIL_SITES, ids=lambda c: f"seed{c[0]}{'-train' if c[1] else ''}")
def test_fp32_gradient_tail_sites(cpu_op, case):  # the backward epilogue is one code path for every GEMM path
    seed, train, widths, acts = case
    site = make_site(17, widths, acts, ln_before=tuple(range(0, len(widths), 2)), seed=seed, key=False, value=False)
    check_parity("cpu", site, torch.float32, lead=(1,), train=train, seed=seed % 1000)


@pytest.fixture(params=["generic", "blas"])
def epilogue_path(request, cpu_op):
    """The scalar and the AVX-512 epilogue (the GEMM path does not change the activation code)."""
    if _cfg()[0] < NEEDS_ISA[request.param]:
        pytest.skip(f"this CPU has no {request.param} kernels")
    before = _cfg()
    _cfg(*PATHS[request.param])
    yield request.param
    _cfg(-1, before[2], before[3], before[5])


@pytest.mark.parametrize("act", ACTS)
def test_every_activation(epilogue_path, act):
    site = make_site(24, [5, 7], [act, act])
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        check_parity("cpu", site, dtype)


FLAG_SETS = CORE_FLAG_SETS


@pytest.mark.parametrize("preset", ["dynamic", "static"])
@pytest.mark.parametrize("flags", FLAG_SETS, ids=flags_id)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_flags_eval_and_train(cpu_op, preset, flags, train):
    site = make_site(32, [4, 9, 6], ["relu", "swish", "gelu"], preset, ln_before=(1,), **flags)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        check_parity("cpu", site, dtype, train=train, separate_query=flags.get("query_before_ln", False))


@pytest.mark.parametrize("hidden,lead", [(37, (5, 11)), (64, (1,)), (40, (0,)), (33, (3, 17))])
def test_odd_shapes_and_tails(cpu_path, hidden, lead):
    # odd K (bf16 pairs), column tails of the 32-wide panels, row tails of the 12-row blocks, M = 0 and 1
    site = make_site(hidden, [5, 8, 3], ["gelu", "relu", "tanh"], seed=hidden)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        check_parity("cpu", site, dtype, lead=lead, train=True, separate_query=True)


def test_wide_site_like_the_benchmark(cpu_path):
    # H=96, N=8, r=12: a scaled-down copy of the benchmark site, forward only, many rows
    site = make_site(96, [12] * 8, ["relu"] * 8, seed=3)
    for dtype in (torch.float32, torch.bfloat16):
        check_parity("cpu", site, dtype, lead=(4, 50), grads=False)


def test_float16_runs_through_the_fp32_path(cpu_op):
    site = make_site(24, [5, 7], ["gelu", "relu"], seed=2)
    check_parity("cpu", site, torch.float16)
    check_parity("cpu", site, torch.float16, train=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 13, 50])
def test_paths_without_residual_or_query(cpu_path, dtype, m):
    a = _op_args(m, 24, [4, 9, 3], 20, dtype=dtype, xq=False, residual=False, seed=m)
    acts = [2, 1, 4]
    got = _call(torch.ops.fusedadapter.fusion_cpu, a, acts)
    want = _call(torch.ops.fusedadapter.fusion_torch, a, acts)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 kernels round the weights to bf16
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=tol * w.double().abs().max().item())


def _op_args(m, kd, r_widths, h, dtype=torch.float64, xq=True, residual=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = len(r_widths)
    segs = [0]
    for w in r_widths:
        segs.append(segs[-1] + w)
    r = segs[-1]

    def rnd(*shape, dt=acc, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    return dict(xd=rnd(m, kd, dt=dtype), xq=rnd(m, kd, dt=dtype) if xq else None,
                residual=rnd(m, h, dt=dtype) if residual else None, w_down=rnd(r, kd, scale=kd ** -0.5),
                b_down=rnd(r, scale=0.1), w_query=rnd(r + n, kd, scale=kd ** -0.5), b_query=rnd(r + n, scale=0.1),
                w_out=rnd(h, r + n, scale=(r + n) ** -0.5), segments=segs)


def _call(op, a, acts, temperature=1.0, dropout_p=0.0, seed=0, keep=None, shift=None):
    return op(a["xd"], a["xq"], a["residual"], a["w_down"], a["b_down"], a["w_query"], a["b_query"], a["w_out"],
              a["segments"], acts, temperature, dropout_p, seed, keep, shift)


@pytest.mark.parametrize("seed", [0, 7, -3, 2**31 - 1, 2**40 + 5])
def test_dropout_hash_replay_matches_torch_backend(cpu_path, seed):
    # Same seed -> the same keep mask as hash_keep_mask (bit-identical) -> the same result as `torch`.
    a = _op_args(600, 16, [3, 4, 2, 5, 1, 6, 2, 3], 12, dtype=torch.float64, seed=1)
    acts = [1, 2, 3, 4, 5, 6, 7, 8]
    shift = torch.randn(600, dtype=torch.float64)
    got = _call(torch.ops.fusedadapter.fusion_cpu, a, acts, 1.7, 0.4, seed, None, shift)
    want = _call(torch.ops.fusedadapter.fusion_torch, a, acts, 1.7, 0.4, seed, None, shift)
    explicit = _call(torch.ops.fusedadapter.fusion_cpu, a, acts, 1.7, 0.4, 0,
                     hash_keep_mask(seed, 600, 8, 0.4), shift)
    for g, w, e in zip(got, want, explicit):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_dropout_hash_is_bit_identical_at_float32_boundaries(cpu_op):
    # p chosen where float32(p) != p: the comparison must happen in float32, as torch does
    for p in (0.1, 0.3, 1 / 3, 0.7, 0.999):
        a = _op_args(2000, 4, [1, 1, 1, 1, 1, 1, 1, 1], 3, seed=2)
        acts = [0] * 8
        got = _call(torch.ops.fusedadapter.fusion_cpu, a, acts, 1.0, p, 99)
        explicit = _call(torch.ops.fusedadapter.fusion_cpu, a, acts, 1.0, p, 0, hash_keep_mask(99, 2000, 8, p))
        assert torch.equal(got[1], explicit[1]), p


def test_module_training_draw_replays_like_torch_backend(cpu_op):
    site = make_site(24, [4, 5, 6], ["relu", "gelu", "swish"])
    site.train()
    a, res, _, _ = make_inputs(site)
    outs = {}
    for backend in ("torch", "cpu"):
        site.backend = backend
        torch.manual_seed(5)
        outs[backend] = site(a, res, return_probs=True)
    for g, w in zip(outs["cpu"], outs["torch"]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["dropout-hash", "dropout-mask", "eval-no-xq-no-res", "temperature"])
def test_op_gradcheck_fp64(cpu_op, variant):
    a = _op_args(5, 6, [2, 3, 2], 6, xq=variant != "eval-no-xq-no-res", residual=variant != "eval-no-xq-no-res",
                 seed=3)
    acts = [1, 4, 5] if variant != "temperature" else [2, 3, 8]
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            v.requires_grad_(True)
    shift = torch.randn(5, dtype=torch.float64, requires_grad=True)
    p = 0.3 if variant.startswith("dropout") else 0.0
    keep = hash_keep_mask(3, 5, 3, 0.3) if variant == "dropout-mask" else None
    temp = 1.7 if variant == "temperature" else 1.0
    names = [k for k in ("xd", "xq", "residual", "w_down", "b_down", "w_query", "b_query", "w_out") if a[k] is not None]

    def f(*ts):
        b = dict(a)
        b.update(zip(names, ts[:-1]))
        return _call(torch.ops.fusedadapter.fusion_cpu, b, acts, temp, p, 11, keep, ts[-1] if p > 0 else None)

    inputs = tuple(a[k] for k in names) + (shift,)
    assert torch.autograd.gradcheck(f, inputs)


def test_gradients_match_torch_backend_op(cpu_path):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        a = _op_args(33, 20, [4, 7, 5], 18, dtype=dtype, seed=4)
        shift = torch.randn(33, dtype=a["w_down"].dtype)
        grads = {}
        for name in ("fusion_cpu", "fusion_torch"):
            b = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
            s = shift.clone().requires_grad_(True)
            out, probs = _call(getattr(torch.ops.fusedadapter, name), b, [2, 1, 6], 1.3, 0.25, 5, None, s)
            g = torch.Generator().manual_seed(0)
            loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + \
                (probs.double() * torch.randn(probs.shape, generator=g, dtype=torch.float64)).sum()
            leaves = [v for v in b.values() if isinstance(v, torch.Tensor)] + [s]
            grads[name] = torch.autograd.grad(loss, leaves)
        tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
        for gc, gt in zip(grads["fusion_cpu"], grads["fusion_torch"]):
            assert gc.dtype == gt.dtype and gc.shape == gt.shape
            torch.testing.assert_close(gc.double(), gt.double(), rtol=tol, atol=tol * gt.abs().max().item())


def test_bf16_backward_sees_the_forwards_rounded_weights(cpu_op):
    """The bf16 GEMMs round w_down / w_query to bf16 in the forward, so the forward cannot tell w
    from round(w); the backward must differentiate that same function: every gradient computed
    from the recomputed GEMM1 (p, z) is the same for w and round(w). (It recomputed GEMM1 from the
    exact weights: a different p.) Needs the AVX512-BF16 kernels (the path exists only there)."""
    if _cfg()[0] < NEEDS_ISA["bf16"]:
        pytest.skip("this CPU has no AVX512-BF16 kernels (the only path that rounds the weights)")
    before = _cfg()
    _cfg(*PATHS["bf16"])
    try:
        a = _op_args(40, 32, [8, 5, 7], 24, dtype=torch.bfloat16, seed=11)
        shift = torch.randn(40)
        results = []
        for rounded in (False, True):
            b = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
            if rounded:
                for k in ("w_down", "w_query"):
                    b[k] = b[k].bfloat16().float()
            b = {k: (v.requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                 for k, v in b.items()}
            s = shift.clone().requires_grad_(True)
            out, probs = _call(cpu_op, b, [2, 1, 6], 1.3, 0.25, 5, None, s)
            g = torch.Generator().manual_seed(0)
            loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + \
                (probs.double() * torch.randn(probs.shape, generator=g, dtype=torch.float64)).sum()
            names = ["w_down", "b_down", "w_query", "b_query", "w_out"]
            grads = torch.autograd.grad(loss, [b[k] for k in names] + [s])
            results.append((out, probs, dict(zip(names + ["shift"], grads))))
        (out0, p0, g0), (out1, p1, g1) = results
        assert torch.equal(out0, out1) and torch.equal(p0, p1)  # the forward rounds: the same function
        for k in g0:  # products of the recomputed p / z / t with activations and grad_out only
            assert torch.equal(g0[k], g1[k]), k
    finally:
        _cfg(-1, before[2], before[3], before[5])


@pytest.mark.parametrize("case", ["fp32", "fp64-dropout", "bf16-no-xq", "fp32-keep-mask"])
def test_opcheck(cpu_op, case):
    dtype = {"fp32": torch.float32, "fp64-dropout": torch.float64, "bf16-no-xq": torch.bfloat16,
             "fp32-keep-mask": torch.float32}[case]
    a = _op_args(6, 8, [3, 5], 7, dtype=dtype, xq=case != "bf16-no-xq", seed=6)
    acc = a["w_down"].dtype
    p = 0.0 if case in ("fp32", "bf16-no-xq") else 0.2
    keep = hash_keep_mask(1, 6, 2, 0.2) if case == "fp32-keep-mask" else None
    shift = torch.randn(6, dtype=acc) if p > 0 else None
    if dtype != torch.bfloat16:
        for v in a.values():
            if isinstance(v, torch.Tensor):
                v.requires_grad_(True)
    args = (a["xd"], a["xq"], a["residual"], a["w_down"], a["b_down"], a["w_query"], a["b_query"], a["w_out"],
            a["segments"], [1, 2], 1.0, p, 3, keep, shift)
    torch.library.opcheck(torch.ops.fusedadapter.fusion_cpu.default, args)


def test_compile_sees_the_op(cpu_op):
    site = make_site(16, [4, 4], ["relu", "gelu"]).float()
    site.backend = "cpu"
    site.eval()
    a, res, _, _ = make_inputs(site)
    a, res = a.float(), res.float()
    with torch.no_grad():
        want = site(a, res)
        got = torch.compile(site, backend="eager", fullgraph=False)(a, res)
    torch.testing.assert_close(got, want)


def test_autocast_bf16_runs_the_bf16_path(cpu_op):
    site = make_site(32, [8, 8], ["relu", "gelu"]).float()
    site.backend = "cpu"
    site.eval()
    a = torch.randn(40, 32)
    res = torch.randn(40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = site(a, res)
    assert out.dtype == torch.bfloat16
    truth = site.double()(a.double(), res.double())
    assert (out.double() - truth).abs().max() / truth.abs().max() < 5e-2


def test_non_contiguous_inputs(cpu_op):
    site = make_site(16, [4, 6], ["relu", "gelu"])
    site.backend = "cpu"
    site.eval()
    base = torch.randn(5, 32, 2, dtype=torch.float64)
    a = base[:, :16, 0]
    res = torch.randn(16, 5, dtype=torch.float64).t()
    assert not a.is_contiguous() and not res.is_contiguous()
    out = site(a, res)
    site.backend = "reference"
    torch.testing.assert_close(out, site(a.contiguous(), res.contiguous()), rtol=1e-12, atol=1e-12)


def test_non_finite_inputs_propagate(cpu_path):
    a = _op_args(4, 8, [3, 5], 6, dtype=torch.float32, seed=8)
    a["xd"][1, 2] = float("nan")
    out, probs = _call(torch.ops.fusedadapter.fusion_cpu, a, [1, 0])
    assert torch.isnan(out[1]).all() and torch.isnan(probs[1]).all()
    assert torch.isfinite(out[[0, 2, 3]]).all() and torch.isfinite(probs[[0, 2, 3]]).all()


# ------------------------------------------------------------------------------------ bad inputs
def _bad(**change):
    a = _op_args(4, 8, [3, 5], 6, dtype=torch.float32, seed=9)
    kw = dict(acts=[1, 2], temperature=1.0, dropout_p=0.0, seed=0, keep=None, shift=None)
    for k, v in change.items():
        if k in kw:
            kw[k] = v
        else:
            a[k] = v
    return lambda: _call(torch.ops.fusedadapter.fusion_cpu, a, kw["acts"], kw["temperature"], kw["dropout_p"],
                         kw["seed"], kw["keep"], kw["shift"])


@pytest.mark.parametrize("change,exc,match", [
    (dict(xd=torch.randn(4, 8, 1)), ValueError, "xd must be 2-D"),
    (dict(xd=torch.ones(4, 8, dtype=torch.int32)), TypeError, "floating point"),
    (dict(xq=torch.randn(3, 8)), ValueError, "xq must have shape"),
    (dict(w_down=torch.randn(7, 8)), ValueError, "w_down must have shape"),
    (dict(b_query=torch.randn(9)), ValueError, "b_query must have shape"),
    (dict(w_out=torch.randn(6, 9)), ValueError, "w_out must have shape"),
    (dict(residual=torch.randn(4, 5)), ValueError, "residual must have shape"),
    (dict(w_query=torch.randn(10, 8, dtype=torch.float64)), TypeError, "w_query has dtype"),
    (dict(residual=torch.randn(4, 6, dtype=torch.float64)), TypeError, "residual has dtype"),
    (dict(segments=[0, 5, 3]), ValueError, "strictly increase"),
    (dict(acts=[1]), ValueError, "len\\(segments\\)"),
    (dict(acts=[1, 9]), ValueError, "unknown activation code 9"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=0.1, keep=torch.ones(4, 2)), ValueError, "keep_mask must be a bool"),
    (dict(dropout_p=0.1, shift=torch.randn(3)), ValueError, "logit_shift must have shape"),
])
def test_bad_inputs_raise_clear_errors(cpu_op, change, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**change)()


def test_bad_backward_inputs(cpu_op):
    a = _op_args(4, 8, [3, 5], 6, dtype=torch.float32, seed=9)
    args = (torch.randn(4, 6), None, torch.rand(4, 2), a["xd"], None, a["w_down"], None, a["w_query"], None,
            a["w_out"], a["segments"], [1, 2], 1.0, 0.0, 0, None, None)
    with pytest.raises(ValueError, match="needs must have 9"):
        torch.ops.fusedadapter.fusion_cpu_backward(*args, [True] * 3)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.fusedadapter.fusion_cpu_backward(torch.randn(4, 5), *args[1:], [True] * 9)


def test_wrong_device_is_unavailable(cpu_op):
    with pytest.raises(fa.BackendUnavailable, match="runs on CPU"):
        extension.load_native_op("cpu", "meta")
    if not torch.cuda.is_available():
        with pytest.raises(fa.BackendUnavailable):
            extension.load_native_op("cuda", "cuda")


# ------------------------------------------------------------------------------------ no toolchain
@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader as in a new process: nothing loaded, no cached failure."""
    monkeypatch.setattr(extension, "_ops", {})
    monkeypatch.setattr(extension, "_errors", {})
    monkeypatch.setattr(dispatch, "_warned", set())
    return monkeypatch


def test_missing_compiler_raises_backend_unavailable(fresh_loader):
    fresh_loader.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(fa.BackendUnavailable, match="C\\+\\+ compiler"):
        extension.load_native_op("cpu", "cpu")
    site = make_site(16, [4], ["relu"])
    site.backend = "cpu"
    a, res, _, _ = make_inputs(site)
    with pytest.raises(fa.BackendUnavailable, match="compiler"):
        site(a, res)
    assert "compiler" in (fa.available_backends("cpu")["cpu"] or "")


def test_missing_ninja_raises_backend_unavailable(fresh_loader):
    from torch.utils import cpp_extension

    fresh_loader.setattr(cpp_extension, "is_ninja_available", lambda: False)
    with pytest.raises(fa.BackendUnavailable, match="ninja"):
        extension.load_native_op("cpu", "cpu")


def test_auto_falls_back_with_one_warning(fresh_loader):
    fresh_loader.setenv("CXX", "/nonexistent/c++")
    table = {"table": {"cpu": {"float64": {b: "cpu" for b in ("0-16", "17-256", "257-4096", ">4096")}}}}
    fresh_loader.setattr(dispatch, "_TABLE", table)
    site = make_site(16, [4], ["relu"]).eval()
    site.backend = "auto"
    a, res, _, _ = make_inputs(site)
    with pytest.warns(RuntimeWarning, match="cannot run here"):
        out = site(a, res)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        site(a, res)  # warned once
    site.backend = "reference"
    torch.testing.assert_close(out, site(a, res), rtol=1e-12, atol=1e-12)


def test_build_knobs(capsys):
    flags = extension.cuda_arch_flags("8.0;9.0+PTX")
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
    with pytest.raises(ValueError):
        extension.cuda_arch_flags("sm90")
    assert extension.main(["cpu"]) == 0
    text = capsys.readouterr().out
    assert "cuda_arch_list: 8.0;9.0" in text and "cpu: ok" in text


def test_skip_cuda_knob(fresh_loader):
    fresh_loader.setenv("FUSEDADAPTER_SKIP_CUDA", "1")
    with pytest.raises(fa.BackendUnavailable):
        extension.load_native_op("cuda", "cuda")


# ------------------------------------------------------------------------------------ shared row code
# csrc/fusion_common.h's row functions (dropout, adapter mask, softmax, softmax backward, dshift)
# run serially in the cpu backend and warp-parallel in the CUDA kernels. No GPU here: 32 host
# threads with a barrier stand in for the warp's lanes and its shuffle reductions, so a lane that
# touches another lane's entry, a missing reduction or a lane-divergent early return (a deadlock
# here, a hang or garbage on the GPU) shows up against the serial run.
_LANES_CPP = r"""
// The row code of fusion_common.h run by 32 host threads that stand in for a warp's lanes (the
// CUDA kernels' WarpLanes), against the same code run serially (the cpu backend's SerialLanes).
#include <barrier>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "fusion_common.h"

using namespace fusedadapter;

static std::barrier<>* g_bar = nullptr;
static double g_scratch[32];
static thread_local int t_lane = 0;

struct ThreadLanes {  // lane l owns n = l, l + 32, ...; reductions give every lane the result
  static int first() { return t_lane; }
  static int stride() { return 32; }
  static double reduce(double x, bool is_max) {
    g_bar->arrive_and_wait();
    g_scratch[t_lane] = x;
    g_bar->arrive_and_wait();
    double r = g_scratch[0];
    for (int i = 1; i < 32; ++i) r = is_max ? (g_scratch[i] > r ? g_scratch[i] : r) : r + g_scratch[i];
    g_bar->arrive_and_wait();
    return r;
  }
  template <typename T> static T max(T x) { return T(reduce(double(x), true)); }
  template <typename T> static T sum(T x) { return T(reduce(double(x), false)); }
  static bool any(bool b) { return reduce(b ? 1.0 : 0.0, false) != 0.0; }
};

static bool close(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  return std::fabs(a - b) <= 1e-12 * (1.0 + std::fabs(a) + std::fabs(b));
}

int main() {
  std::mt19937_64 rng(1234);
  std::normal_distribution<double> nd;
  std::barrier<> bar(32);
  g_bar = &bar;
  int bad = 0, rows = 0;
  const int Ns[] = {1, 2, 5, 31, 32, 33, 64, 100, 128};
  for (int N : Ns) {
    for (int variant = 0; variant < 8; ++variant) {
      const int M = 3;
      std::vector<char> keep(M * N), allow(M * N);
      for (auto& k : keep) k = (rng() % 10) < 7;
      for (auto& a : allow) a = (rng() % 10) < 6;
      for (int n = 0; n < N; ++n) allow[1 * N + n] = 0;  // row 1 masks every adapter
      std::vector<double> shift(M);
      for (auto& s : shift) s = 3 * nd(rng);
      DropParams d;
      if (variant & 1) {
        d.p = 0.3;
        d.scale = 1.0 / 0.7;
        d.key = hash_seed_key(17 + variant);
        d.shift = shift.data();
        if (variant & 2) d.keep = reinterpret_cast<const bool*>(keep.data());
      }
      if (variant & 4) d.allow = reinterpret_cast<const bool*>(allow.data());
      const double temp = variant & 2 ? 0.7 : 1.0;
      for (int m = 0; m < M; ++m, ++rows) {
        std::vector<double> l(N), g(N);
        for (int n = 0; n < N; ++n) l[n] = 4 * nd(rng), g[n] = nd(rng);
        std::vector<double> l1 = l, g1 = g, l2 = l, g2 = g;
        const double sh = d.shift_at<double, double>(m);
        row_probs<SerialLanes>(l1.data(), m, N, d, sh, temp);
        const double ds1 = row_softmax_backward<SerialLanes>(l1.data(), g1.data(), m, N, d, temp);
        std::vector<double> ds2(32);
        std::vector<std::thread> th;
        for (int lane = 0; lane < 32; ++lane)
          th.emplace_back([&, lane] {
            t_lane = lane;
            row_probs<ThreadLanes>(l2.data(), m, N, d, sh, temp);
            ds2[lane] = row_softmax_backward<ThreadLanes>(l2.data(), g2.data(), m, N, d, temp);
          });
        for (auto& t : th) t.join();
        bool ok = true;
        for (int n = 0; n < N; ++n) ok = ok && close(l1[n], l2[n]) && close(g1[n], g2[n]);
        for (int lane = 0; lane < 32; ++lane) ok = ok && close(ds1, ds2[lane]);
        if (!ok) {
          ++bad;
          std::printf("mismatch N=%d variant=%d m=%d\n", N, variant, m);
        }
      }
    }
  }
  std::printf("%d rows, %d mismatches\n", rows, bad);
  return bad != 0;
}
"""


def test_row_code_lane_parallel_matches_serial(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    import fusedadapter.csrc

    csrc = list(fusedadapter.csrc.__path__)[0]
    (tmp_path / "lanes.cpp").write_text(_LANES_CPP)
    exe = str(tmp_path / "lanes")
    build = subprocess.run([cxx, "-O1", "-std=c++20", "-pthread", "-I", csrc, str(tmp_path / "lanes.cpp"), "-o", exe],
                           capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "barrier" in build.stderr and "fusion_common" not in build.stderr:
        pytest.skip("the C++ compiler has no C++20 <barrier>")
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([exe], capture_output=True, text=True, timeout=60)  # a deadlock fails here
    assert run.returncode == 0 and "0 mismatches" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


# ------------------------------------------------------------------------------------ CUDA sources
def _nvcc():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    for cand in (os.path.join(home, "bin", "nvcc"), shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the CUDA tests build and run the "
                    "extension, a compile-only nvcc pass would repeat the build")
def test_cuda_sources_compile():
    """Every .cu (and the CUDA host .cpp) compiles with nvcc against torch's headers, for sm_90."""
    cmd = [sys.executable, "-m", "fusedadapter.csrc.compile_check", "--arch", "9.0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# ------------------------------------------------------------------------------------ CUDA (GPU only)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _check_parity_on(device, backend, site, dtype, *, lead=(3, 7), train=False, separate_query=False):
    """tests/parity.py's oracle with the backend and the reference at `dtype` run on `device`
    (truth: the float64 reference on CPU, on the values rounded to `dtype`)."""
    import parity
    from fusedadapter.testing import assert_oracle

    inputs = make_inputs(site, lead, separate_query=separate_query)
    rounded = copy.deepcopy(site).to(dtype).double()
    inputs = tuple(None if t is None else (t.to(dtype).double() if t.is_floating_point() else t) for t in inputs)
    truth = parity._run(rounded, "reference", torch.float64, inputs, train, True)
    on_dev = tuple(None if t is None else t.to(device) for t in inputs)
    site_dev = copy.deepcopy(site).to(device)
    ref = parity._run(site_dev, "reference", dtype, on_dev, train, True)
    got = parity._run(site_dev, backend, dtype, on_dev, train, True)
    for key in truth:
        if key.startswith("d_adapters.") and dtype == torch.float32:
            continue
        if got[key] is None or truth[key] is None:
            continue
        assert torch.isfinite(got[key]).all(), key
        assert_oracle(got[key].cpu(), ref[key].cpu(), truth[key], dtype, what=f"{backend} {key}")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_cuda_parity(dtype, train):
    extension.load_native_op("cuda", "cuda")
    for n, hidden in ((3, 40), (8, 64)):
        site = make_site(hidden, [3 + (5 * i) % 11 for i in range(n)], [ACTS[i % len(ACTS)] for i in range(n)], seed=n)
        _check_parity_on("cuda", "cuda", site, dtype, train=train)


@requires_cuda
def test_cuda_gradcheck_opcheck_and_dropout_replay():
    op = extension.load_native_op("cuda", "cuda")
    a = _op_args(5, 6, [2, 3, 2], 6, seed=3)
    a = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    for v in a.values():
        if isinstance(v, torch.Tensor):
            v.requires_grad_(True)
    shift = torch.randn(5, dtype=torch.float64, device="cuda", requires_grad=True)
    names = ["xd", "xq", "residual", "w_down", "b_down", "w_query", "b_query", "w_out"]

    def f(*ts):
        b = dict(a)
        b.update(zip(names, ts[:-1]))
        return _call(torch.ops.fusedadapter.fusion_cuda, b, [1, 4, 5], 1.3, 0.3, 11, None, ts[-1])

    assert torch.autograd.gradcheck(f, tuple(a[k] for k in names) + (shift,))
    args = (a["xd"], a["xq"], a["residual"], a["w_down"], a["b_down"], a["w_query"], a["b_query"], a["w_out"],
            a["segments"], [1, 4, 5], 1.0, 0.2, 3, None, shift)
    torch.library.opcheck(op, args)
    got = _call(torch.ops.fusedadapter.fusion_cuda, a, [1, 4, 5], 1.7, 0.4, 123, None, shift)
    want = _call(torch.ops.fusedadapter.fusion_torch, a, [1, 4, 5], 1.7, 0.4, 123, None, shift)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("xq", [True, False], ids=["query", "no-query"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_onednn_gemms_agree_with_aten(cpu_op, xq, residual):
    # f32_gemm 2 (the default on x86 with mkldnn, FUSEDADAPTER_CPU_ONEDNN): the backward's float32
    # products from onednn_min_m rows on oneDNN's matmul (and the forward's GEMMs from
    # onednn_fwd_min_m rows, off by default: lowered here); the same products as the ATen BLAS path
    # (f32_gemm 1) within float32 rounding
    before = _cfg()
    if before[1] < 1 or before[7] != 1:
        pytest.skip("oneDNN GEMMs need AVX-512 and a torch built with mkldnn on x86")
    m = max(64, before[6], before[2] + 1)
    a = _op_args(m, 80, [24, 40, 1, 31], 96, dtype=torch.float32, xq=xq, residual=residual, seed=9)
    acts = [1, 2, 4, 5]
    shift = torch.randn(m, generator=torch.Generator().manual_seed(3))
    results = {}
    try:
        for mode in (1, 2):
            _cfg(-2, -1, -1, mode, -1, 0)
            b = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
            s = shift.clone().requires_grad_(True)
            out, probs = _call(torch.ops.fusedadapter.fusion_cpu, b, acts, 1.3, 0.25, 5, None, s)
            g = torch.Generator().manual_seed(0)
            loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + \
                (probs.double() * torch.randn(probs.shape, generator=g, dtype=torch.float64)).sum()
            leaves = [v for v in b.values() if isinstance(v, torch.Tensor)] + [s]
            results[mode] = [out.detach(), probs.detach()] + list(torch.autograd.grad(loss, leaves))
            buf = torch.empty_like(out)  # the caller's-buffer variant writes the same rows
            with torch.no_grad():
                torch.ops.fusedadapter.fusion_cpu_out(buf, b["xd"], b["xq"], b["residual"], b["w_down"], b["b_down"],
                                                      b["w_query"], b["b_query"], b["w_out"], b["segments"], acts,
                                                      1.3, 0.25, 5, None, s)
            assert torch.equal(buf, out.detach())
    finally:
        _cfg(-1, before[2], before[3], before[5], before[6], before[8])
    for want, got in zip(results[1], results[2]):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * want.abs().max().item())
