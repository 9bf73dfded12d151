"""Bad input gets a clear error naming what was expected; odd-but-valid input gets the right answer."""

import re

import pytest
import torch

import fusedadapter as fa
from fusedadapter.ops import fusion_torch


def site(hidden=16, backend="torch"):
    return fa.FusedAdapterFusion(hidden, [fa.AdapterConfig(bottleneck_size=4), fa.AdapterConfig(bottleneck_size=3)],
                                 backend=backend).eval()


X = torch.randn(2, 3, 16)

MODULE_CASES = [
    ("hidden size mismatch", lambda m: m(torch.randn(2, 3, 15), torch.randn(2, 3, 15)), ValueError, r"\(\.\.\., 16\)"),
    ("residual shape", lambda m: m(X, torch.randn(2, 4, 16)), ValueError, r"shape of adapter_input"),
    ("query shape", lambda m: m(X, X, torch.randn(3, 16)), ValueError, r"shape of adapter_input"),
    ("input dtype vs params", lambda m: m(X.double(), X.double()), TypeError, r"expected inputs of dtype torch.float32"),
    ("residual dtype", lambda m: m(X, X.double()), TypeError, r"expected torch.float32"),
    ("non-floating input", lambda m: m(X.long(), X), TypeError, r"floating-point"),
    ("not a tensor", lambda m: m([1.0] * 16, X), TypeError, r"torch.Tensor"),
    ("dropout mask shape", lambda m: m.train()(X, X, dropout_mask=torch.ones(2, 3, 5, dtype=torch.bool)), ValueError,
     r"dropout_mask must be a bool tensor of shape \(2, 3, 2\)"),
    ("dropout mask dtype", lambda m: m.train()(X, X, dropout_mask=torch.ones(2, 3, 2)), ValueError, r"bool tensor"),
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("what,call,exc,pattern", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_rejects(backend, what, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(site(backend=backend))


@pytest.mark.parametrize("make,exc,pattern", [
    (lambda: fa.AdapterConfig(non_linearity="swishy"), ValueError, r"unknown activation 'swishy'; expected one of"),
    (lambda: fa.AdapterConfig(reduction_factor=0), ValueError, r"positive number"),
    (lambda: fa.AdapterConfig(bottleneck_size=0), ValueError, r"positive int"),
    (lambda: fa.AdapterConfig(scaling="huge"), ValueError, r"'learned' or 'channel'"),
    (lambda: fa.FusionConfig.load("dynamc"), ValueError, r"unknown fusion preset 'dynamc'; expected one of \['dynamic', 'static'\]"),
    (lambda: fa.FusionConfig.load("static", qurey=False), ValueError, r"unknown FusionConfig fields \['qurey'\]"),
    (lambda: fa.FusionConfig(dropout_prob=1.5), ValueError, r"\[0, 1\)"),
    (lambda: fa.FusedAdapterFusion(16, []), ValueError, r"at least one AdapterConfig"),
    (lambda: fa.FusedAdapterFusion(16, ["relu"]), TypeError, r"expected an AdapterConfig"),
    (lambda: fa.FusedAdapterFusion(16, {"a.b": fa.AdapterConfig()}), ValueError, r"without '\.'"),
    (lambda: fa.FusedAdapterFusion(0, [fa.AdapterConfig()]), ValueError, r"positive int"),
    (lambda: fa.FusedAdapterFusion(16, [fa.AdapterConfig()], backend="tpu"), ValueError,
     r"unknown backend 'tpu'; expected 'auto' or one of"),
])
def test_constructors_reject(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_wrong_adapter_count_and_names_in_state_dict():
    a = site()
    b = fa.FusedAdapterFusion(16, [fa.AdapterConfig(bottleneck_size=4)] * 3)
    with pytest.raises(RuntimeError, match=r"adapters\.2"):
        b.load_state_dict(a.state_dict())
    named = fa.FusedAdapterFusion(16, {"sst": fa.AdapterConfig(bottleneck_size=4), "mnli": fa.AdapterConfig(bottleneck_size=3)})
    with pytest.raises(RuntimeError, match=r"adapters\.sst"):
        named.load_state_dict(a.state_dict())


def test_functional_rejects_mismatched_lists():
    w = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"equally long"):
        fa.adapter_fusion(X, X, down_weights=[w], down_biases=[], up_weights=[w.t()], up_biases=[None])
    with pytest.raises(ValueError, match=r"expected down weight \(4, 16\) and up weight \(16, 4\)"):
        fa.adapter_fusion(X, X, down_weights=[w], down_biases=[None], up_weights=[w], up_biases=[None])
    with pytest.raises(ValueError, match=r"unknown activation"):
        fa.adapter_fusion(X, X, down_weights=[w], down_biases=[None], up_weights=[w.t()], up_biases=[None],
                          activations="nope")


def test_op_rejects_with_names():
    m, h = 3, 8
    ok = dict(xd=torch.randn(m, h), xq=None, residual=torch.randn(m, h), w_down=torch.randn(4, h), b_down=torch.randn(4),
              w_query=torch.randn(6, h), b_query=torch.randn(6), w_out=torch.randn(h, 6), segments=[0, 1, 4],
              activations=[1, 2])
    fusion_torch(**ok)
    cases = [
        (dict(w_query=torch.randn(5, h)), r"w_query must have shape \(6, 8\)"),
        (dict(segments=[0, 4, 1]), r"strictly increase"),
        (dict(activations=[1, 99]), r"unknown activation code 99"),
        (dict(w_out=torch.randn(h, 6, dtype=torch.float64)), r"w_out has dtype torch.float64, expected torch.float32"),
        (dict(xd=torch.randn(m, h).to(torch.bfloat16), residual=torch.randn(m, h).to(torch.bfloat16),
              w_down=torch.randn(4, h).to(torch.bfloat16)), r"w_down has dtype torch.bfloat16, expected torch.float32"),
        (dict(residual=torch.randn(m + 1, h)), r"residual must have shape \(3, 8\)"),
        (dict(xd=torch.randn(m, h, dtype=torch.float64)), r"expected torch.float64"),
        (dict(w_out=torch.randn(h, 6, device="meta")), r"fusion op: w_out is on meta, expected cpu \(the device of xd\)"),
        (dict(adapter_mask=torch.ones(m, 2, dtype=torch.bool, device="meta")),
         r"fusion op: adapter_mask is on meta, expected cpu \(the device of xd\)"),
    ]
    for change, pattern in cases:
        with pytest.raises((ValueError, TypeError), match=pattern):
            fusion_torch(**{**ok, **change})


def test_unavailable_backend_raises_and_auto_falls_back(monkeypatch):
    from fusedadapter import dispatch

    m = site(backend="triton")
    # Simulate a machine without Triton: the explicit request raises, naming the backend.
    monkeypatch.setitem(dispatch._LOADERS, "triton", lambda device: (_ for _ in ()).throw(
        dispatch.BackendUnavailable("backend 'triton' needs the `triton` package: simulated")))
    with pytest.raises(fa.BackendUnavailable, match=r"backend 'triton'"):
        m(X, X)
    # auto picks what the table says; a table entry that cannot run falls back with ONE warning.
    monkeypatch.setattr(dispatch, "_TABLE", {"table": {"cpu": {"float32": {"0-16": "triton"}}}})
    monkeypatch.setattr(dispatch, "_warned", set())
    m.backend = "auto"
    with pytest.warns(RuntimeWarning, match=r"using 'torch' instead"):
        out = m(X, X)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(X, X)  # no second warning
    m.backend = "torch"
    torch.testing.assert_close(out, m(X, X))


def test_auto_uses_torch_where_the_table_has_no_entry(monkeypatch):
    from fusedadapter import dispatch

    monkeypatch.setattr(dispatch, "_TABLE", {"table": {}})
    name, _ = dispatch.resolve_backend("auto", torch.device("cpu"), torch.float32, 100)
    assert name == "torch"
    assert dispatch.token_bucket(0) == "0-16" and dispatch.token_bucket(17) == "17-256"
    assert dispatch.token_bucket(4097) == ">4096"


def test_nan_propagates_not_zeroed():
    m = site()
    x = X.clone()
    x[0, 1, 3] = float("nan")
    out = m(x, X)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[1]).all()
    m.backend = "reference"
    assert torch.isnan(m(x, X)[0, 1]).all()


def test_error_messages_name_expected_values():
    with pytest.raises(ValueError) as info:
        site()(torch.randn(4, 7), torch.randn(4, 7))
    assert re.search(r"16", str(info.value))


FLAG_FIELDS = ["query", "key", "value", "query_before_ln", "residual_before", "temperature", "value_before_softmax",
               "value_initialized", "regularization"]


@pytest.mark.parametrize("field", FLAG_FIELDS)
@pytest.mark.parametrize("bad", ["no", "False", None, 2, 0.0, [True]], ids=repr)
def test_fusion_config_flags_must_be_bools(field, bad):
    """Any truthy value used to switch a flag on (``query="no"`` built a query): now a TypeError
    naming the field and the type, through every way a config is made."""
    pattern = rf"FusionConfig\.{field} must be a bool \(True or False\), got {re.escape(repr(bad))}"
    for make in (lambda: fa.FusionConfig(**{field: bad}), lambda: fa.FusionConfig.load("static", **{field: bad}),
                 lambda: fa.FusionConfig.load({field: bad}),
                 lambda: fa.FusedAdapterFusion(16, [fa.AdapterConfig()], fusion={field: bad})):
        with pytest.raises(TypeError, match=pattern):
            make()


def test_config_flags_accept_bools_and_the_ints_0_and_1():
    np = pytest.importorskip("numpy")
    assert fa.FusionConfig(query=False, key=0, value=1, temperature=np.bool_(True)) == fa.FusionConfig(
        query=False, key=False, value=True, temperature=True)
    assert fa.FusionConfig(key=0).key is False and fa.FusionConfig(value=1).value is True
    assert fa.AdapterConfig(ln_before=1).ln_before is True
    with pytest.raises(TypeError, match=r"AdapterConfig\.ln_before must be a bool .*got 'yes'"):
        fa.AdapterConfig(ln_before="yes")
    site = fa.FusedAdapterFusion(16, [fa.AdapterConfig()], fusion={"query": 0})
    assert site.query is None


BAD_NAMES = ["a,b", "a.b", "", 3, None]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_adapter_name_rule_is_one_rule(name):
    """FusedAdapterFusion and fusedadapter.patch apply the same rule (``"a,b"`` used to be accepted
    by the module and rejected by patch)."""
    import transformers

    pattern = r"adapter names must be non-empty strings without '\.' or ','"
    with pytest.raises(ValueError, match=pattern):
        fa.FusedAdapterFusion(16, {name: fa.AdapterConfig()})
    config = transformers.BertConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    model = transformers.BertModel(config)
    with pytest.raises(ValueError, match="fusedadapter.patch: " + pattern):
        fa.patch(model, {name: fa.AdapterConfig()})
    from fusedadapter.config import check_adapter_name

    with pytest.raises(ValueError, match=pattern):
        check_adapter_name(name)
    assert check_adapter_name("sst-2_v1") == "sst-2_v1"
