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
