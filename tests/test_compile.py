"""torch.compile and torch.export see the fused site without graph breaks."""

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
