"""Host overhead of a warm eval call (issue 12): the steps that must stay off that path.

Timings are for the benchmark (``python -m benchmarks host-overhead``); these tests pin the
structure that the timings rest on, and that results are unchanged by it."""

import copy
import os
import sys

import torch

from backends import skip_unless_runnable
from parity import make_inputs, make_site


def _site(backend):
    m = make_site(24, [5, 7, 4], ["relu", "gelu", "swish"]).float().eval()
    m.backend = backend
    return m


def _inputs(m):
    a, res, _, _ = make_inputs(m)
    return a.float(), res.float()


def _python_calls_in(filename_tail, fn):
    """The names of the Python functions defined in a file ending in ``filename_tail`` that run during ``fn()``."""
    seen = []

    def prof(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.endswith(filename_tail):
            seen.append(frame.f_code.co_name)

    sys.setprofile(prof)
    try:
        out = fn()
    finally:
        sys.setprofile(None)
    return seen, out


def test_no_grad_kernel_call_skips_the_python_autograd_wrapper():
    """A no-grad call of a kernel backend's op goes below the Autograd key directly (the formula's own
    no-grad branch), not through torch.library's Python autograd wrapper; same output as with grad on."""
    skip_unless_runnable("cpu", "cpu")
    m = _site("cpu")
    a, res = _inputs(m)
    with torch.no_grad():
        m(a, res)  # warm: fold cached, extension loaded
    def no_grad_call():
        with torch.no_grad():
            return m(a, res)

    seen, out = _python_calls_in(os.path.join("_library", "autograd.py"), no_grad_call)
    assert seen == []
    frozen = copy.deepcopy(m).requires_grad_(False)  # grad mode on, nothing trainable: the wrapper's path
    seen_on, want = _python_calls_in(os.path.join("_library", "autograd.py"), lambda: frozen(a, res))
    assert "autograd_impl" in seen_on
    assert torch.equal(out, want)


def test_torch_backend_eval_call_has_no_identity_casts_or_divisions():
    """fp32 at T = 1: no ``aten::to`` (casts to the dtype the tensor has) and no ``aten::div`` (x / 1.0) in
    a one-token eval call; the result equals the reference."""
    m = make_site(24, [6, 6, 6], ["relu"] * 3).float().eval()  # the benchmark's kind: equal widths, one activation
    m.backend = "torch"
    a, res = _inputs(m)
    a, res = a[:1, :1], res[:1, :1]
    with torch.no_grad():
        m(a, res)
        with torch.profiler.profile() as prof:
            out = m(a, res)
        ref = copy.deepcopy(m)
        ref.backend = "reference"
        want = ref(a, res)
    names = [e.name for e in prof.events() if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    assert "aten::to" not in names and "aten::div" not in names, names
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def _reference_of(m):
    ref = copy.deepcopy(m)
    ref.backend = "reference"
    return ref


def test_torch_eval_call_runs_gemm1_as_one_gemm_on_the_packed_fold():
    """A cached eval fold holds GEMM1's weights as one buffer (fold.pack_gemm1): w_down/w_query are views
    of it, same values as the unpacked fold; the torch backend's eval call runs one GEMM for GEMM1 (two
    ``aten::linear`` a call, not three), and its output matches the op on the unpacked weights and the
    reference, over tokens 1 and 21 and fp32/fp64."""
    from fusedadapter.fold import fold
    from fusedadapter.ops import fusion_torch

    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        m = make_site(24, [6, 6, 6], ["relu"] * 3).to(dtype).eval()
        m.backend = "torch"
        a, res = _inputs(m)
        a, res = a.to(dtype), res.to(dtype)
        for lead in ((1, 1), (3, 7)):
            x, r = a[:lead[0], :lead[1]], res[:lead[0], :lead[1]]
            with torch.no_grad():
                m(x, r)
                f = m.folded(dtype)
                assert f.gemm1_weight is not None and f.w_down._base is f.gemm1_weight
                plain = fold(m.adapter_weights(), m.fusion_weights(), dtype)
                for name in ("w_down", "b_down", "w_query", "b_query"):
                    assert torch.equal(getattr(f, name), getattr(plain, name)), name
                with torch.profiler.profile() as prof:
                    out = m(x, r)
                want_op, _ = fusion_torch(x.reshape(-1, 24), None, r.reshape(-1, 24), plain.w_down, plain.b_down,
                                          plain.w_query, plain.b_query, plain.w_out, plain.segments, plain.activations)
                want = _reference_of(m)(x, r)
            linears = [e.name for e in prof.events() if e.name == "aten::linear"]
            assert len(linears) == 1, linears  # GEMM1 as one linear; GEMM2 is an addmm
            torch.testing.assert_close(out.reshape(-1, 24), want_op, rtol=tol, atol=tol)
            torch.testing.assert_close(out, want, rtol=tol * 10, atol=tol * 10)


def test_fast_fold_check_sees_a_parameter_replaced_by_another_view_of_its_storage():
    """The fast check compares slots in one list comparison: a weight replaced by a Parameter over the
    same storage and data pointer but another layout (its transpose) is a new tensor, so the fold is
    rebuilt and the output is the reference's."""
    m = _site("torch")
    a, res = _inputs(m)
    with torch.no_grad():
        m(a, res)
        m(a, res)  # the fast entry is built and hit
        q = m.query.weight
        m.query.weight = torch.nn.Parameter(q.detach().t())  # same data_ptr, other values per index
        assert m.query.weight.data_ptr() == q.data_ptr()
        out = m(a, res)
        want = _reference_of(m)(a, res)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_fast_fold_check_compares_one_element_parameters_by_identity():
    """A learned scaling (a one-element Parameter, whose ``==`` compares values) replaced by an equal-valued
    Parameter that requires grad: a training call must not reuse the eval fold, so the new parameter
    gets its gradient."""
    m = make_site(24, [5, 7, 4], ["relu"] * 3).float().eval()
    for ad in m.adapters.values():
        ad.scaling = torch.nn.Parameter(torch.full((1,), 1.5))
    m.backend = "torch"
    m.requires_grad_(False)
    a, res = _inputs(m)
    m(a, res)
    m(a, res)  # grad mode on, nothing trainable: the cached eval fold and the fast entry
    first = next(iter(m.adapters.values()))
    new = torch.nn.Parameter(torch.full((1,), 1.5))
    first.scaling = new
    m(a, res).sum().backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
