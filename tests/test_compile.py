"""torch.compile and torch.export see the fused site without graph breaks."""

import copy

import pytest
import torch

import fusedadapter as fa
from parity import make_site


def site(train=False):
    m = make_site(32, [4, 6, 5], ["relu", "gelu", "swish"], ln_before=(2,)).float()
    m.backend = "torch"
    return m.train(train)


def test_no_graph_breaks_eval_and_train():
    for train in (False, True):
        m = site(train)
        x, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
        explanation = torch._dynamo.explain(m)(x, r)
        assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_matches_eager_with_dynamic_sequence_lengths():
    m = site().eval()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in [(2, 5), (3, 11), (1, 1)]:
        x, r = torch.randn(*shape, 32), torch.randn(*shape, 32)
        torch.testing.assert_close(compiled(x, r), m(x, r), rtol=1e-6, atol=1e-6)


def test_compiled_training_step_gives_gradients():
    m = site(train=True)
    m.dropout_p = 0.0
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    x, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    compiled(x, r).pow(2).sum().backward()
    got = m.query.weight.grad.clone()
    m.zero_grad()
    m(x, r).pow(2).sum().backward()
    torch.testing.assert_close(got, m.query.weight.grad, rtol=1e-5, atol=1e-6)


def test_export():
    m = site().eval()
    x, r = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    ep = torch.export.export(m, (x, r))
    torch.testing.assert_close(ep.module()(x, r), m(x, r), rtol=1e-6, atol=1e-6)


class GraphCounter:
    """A dynamo backend (aot_eager underneath) that counts the graphs it is handed."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _cpu_backend_loaded():
    return fa.available_backends("cpu").get("cpu") is None  # builds/loads the C++ op outside any trace


# (backend, widths): the torch backend's folded op and its plain form (R > 2H), the eager
# reference, and the C++ op (a custom op with a float temperature in its schema).
TEMPERATURE_CASES = [("torch", (4, 6, 5)), ("torch", (40, 30, 20)), ("reference", (4, 6, 5)), ("cpu", (4, 6, 5))]


@pytest.mark.parametrize("backend,widths", TEMPERATURE_CASES, ids=["torch", "torch-plain", "reference", "cpu"])
def test_compiled_temperature_follows_adapterhub_schedule(backend, widths):
    """temperature=True: T falls by 0.05 on every call, compiled as eager (it used to freeze under
    inductor and recompile on every call under aot_eager); T set by hand reaches the compiled graph.
    One graph for all of it: the step runs in the graph, nothing guards on T's value."""
    if backend == "cpu" and not _cpu_backend_loaded():
        pytest.skip(f"cpu backend unavailable: {fa.available_backends('cpu')['cpu']}")
    m = make_site(32, list(widths), ["relu", "gelu", "swish"], ln_before=(2,), temperature=True).float().eval()
    m.backend = backend
    eager = copy.deepcopy(m)
    counter = GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(11)

    def both():
        x, r = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
        with torch.no_grad():
            out_c, p_c = compiled(x, r, return_probs=True)
            out_e, p_e = eager(x, r, return_probs=True)
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p_c, p_e, rtol=1e-5, atol=1e-6)

    both()
    first = counter.graphs  # dynamo may restart its first analysis once (a float specialized)
    for _ in range(11):
        both()
    assert m.T == eager.T and m.T == pytest.approx(50.0 - 12 * 0.05)
    # by hand, as AdapterHub users do (adapterdrop's calibration does it too): the next call uses it
    m.T = eager.T = 2.0
    both()
    assert m.T == eager.T == pytest.approx(1.95)
    assert counter.graphs == first, f"recompiled: {counter.graphs - first} more graphs in 12 more calls"
    torch._dynamo.reset()


def test_compiled_training_with_temperature_matches_eager():
    m = make_site(32, [4, 6, 5], ["relu", "gelu", "swish"], temperature=True).train()  # float64: tight checks
    m.backend, m.dropout_p = "torch", 0.0
    m.adapters.requires_grad_(False)
    eager = copy.deepcopy(m)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for step in range(3):
        m.T = eager.T = 3.0 - step / 2  # a temperature that moves the probabilities
        x, r = torch.randn(2, 5, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
        compiled(x, r).pow(2).sum().backward()
        eager(x, r).pow(2).sum().backward()
        assert m.T == eager.T == pytest.approx(2.95 - step / 2)
        for (n, p), q in zip(m.named_parameters(), eager.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9)
    torch._dynamo.reset()


def test_temperature_is_a_float_property_not_saved_and_kept_in_float64():
    m = make_site(16, [3, 4], ["relu", "gelu"], temperature=True)
    assert isinstance(m.T, float) and m.T == 50.0
    assert not any("temperature" in k or k == "T" for k in m.state_dict())
    x, r = torch.randn(2, 16, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    t = 50.0  # AdapterHub's BertFusion: T = max(T - T0 / 1000, 1.0) in Python floats
    for _ in range(6):
        m(x, r)
        t = max(t - 50.0 / 1000.0, 1.0)
        assert m.T == t
    h = copy.deepcopy(m).half()  # the module's dtype moves; AdapterHub's float T does not round
    assert h.T == t and h._temperature.dtype == torch.float64
    for bad in (0.0, -1.0, float("nan"), float("inf"), "2", True, None):
        with pytest.raises(ValueError, match="T"):
            m.T = bad
    plain = make_site(16, [3, 4], ["relu", "gelu"])  # temperature=False: T stays 1
    plain(x, r)
    assert plain.T == 1.0
