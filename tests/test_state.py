"""State: the fold cache never serves stale weights; modes, threads and determinism."""

import copy
import threading

import pytest
import torch

import fusedadapter as fa
import fusedadapter.testing
from backends import skip_unless_runnable
from conftest import requires_adapterhub
from parity import make_inputs, make_site


def fresh(backend="torch"):
    m = make_site(24, [5, 7, 4], ["relu", "gelu", "swish"]).float()
    m.backend = backend
    return m.eval()


def expect(m, a, res):
    ref = copy.deepcopy(m)
    ref.backend = "reference"
    return ref(a, res)


def inputs(m):
    a, res, _, _ = make_inputs(m)
    return a.float(), res.float()


def warm(m, a, res):
    with torch.no_grad():
        m(a, res)
    assert m._fold_cache is not None


def test_cache_invalidated_by_optimizer_step():
    m = fresh()
    a, res = inputs(m)
    warm(m, a, res)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    m(a, res).pow(2).mean().backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(a, res), expect(m, a, res), rtol=1e-5, atol=1e-5)


def test_cache_invalidated_by_load_state_dict():
    m = fresh()
    a, res = inputs(m)
    warm(m, a, res)
    other = make_site(24, [5, 7, 4], ["relu", "gelu", "swish"], seed=9).float()
    m.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(a, res), expect(m, a, res), rtol=1e-5, atol=1e-5)


def test_cache_invalidated_by_to_and_half():
    m = fresh()
    a, res = inputs(m)
    warm(m, a, res)
    m.double()
    with torch.no_grad():
        out = m(a.double(), res.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expect(m, a.double(), res.double()), rtol=1e-12, atol=1e-12)
    m.to(torch.bfloat16)
    with torch.no_grad():
        out = m(a.bfloat16(), res.bfloat16())
    assert out.dtype == torch.bfloat16
    truth = expect(m.double(), a.double(), res.double())
    assert (out.double() - truth).abs().max() / truth.abs().max() < 5e-2


def test_cache_invalidated_by_in_place_edit_and_requires_grad():
    m = fresh()
    a, res = inputs(m)
    warm(m, a, res)
    with torch.no_grad():
        m.key.weight.mul_(1.7)
        m.adapters["1"].adapter_up.bias.add_(0.3)
        out = m(a, res)
    torch.testing.assert_close(out, expect(m, a, res), rtol=1e-5, atol=1e-5)
    # requires_grad_ changes: the next call under autograd must build a differentiable fold
    m.requires_grad_(False)
    warm(m, a, res)
    m.value.weight.requires_grad_(True)
    out = m(a, res)
    out.sum().backward()
    assert m.value.weight.grad is not None and m.value.weight.grad.abs().sum() > 0


def test_data_assignment_changes_storage_and_invalidates():
    m = fresh()
    a, res = inputs(m)
    warm(m, a, res)
    m.query.weight.data = torch.randn_like(m.query.weight)  # AdapterHub's own init style
    with torch.no_grad():
        torch.testing.assert_close(m(a, res), expect(m, a, res), rtol=1e-5, atol=1e-5)


def test_two_threads_inference_on_one_module():
    m = fresh()
    a, res = inputs(m)
    want = expect(m, a, res)
    a2, res2 = a * 0.5 + 1, res - 1
    want2 = expect(m, a2, res2)
    errors = []

    def worker(x, r, w):
        try:
            for _ in range(20):
                with torch.inference_mode():
                    torch.testing.assert_close(m(x, r), w, rtol=1e-5, atol=1e-5)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=args) for args in ((a, res, want), (a2, res2, want2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "enable_grad"])
def test_grad_modes(mode):
    m = fresh()
    a, res = inputs(m)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "enable_grad": torch.enable_grad}[mode]
    with ctx():
        out = m(a, res)
    assert out.requires_grad == (mode == "enable_grad")
    torch.testing.assert_close(out.detach(), expect(m, a, res).detach(), rtol=1e-5, atol=1e-5)


def test_eval_is_bitwise_deterministic():
    m = fresh()
    a, res = inputs(m)
    with torch.no_grad():
        outs = [m(a, res) for _ in range(3)]
    m.invalidate_fold_cache()
    with torch.no_grad():
        outs.append(m(a, res))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_regularization_loss_trains_value_towards_identity():
    m = fresh()
    opt = torch.optim.SGD([m.value.weight], lr=10.0)
    before = fa.fusion_regularization_loss(m).item()
    fa.fusion_regularization_loss(m).backward()
    opt.step()
    assert fa.fusion_regularization_loss(m).item() < before


def test_module_converted_under_inference_mode_never_serves_stale_folds():
    m = fresh()
    a, res = inputs(m)
    with torch.inference_mode():
        m.double()  # parameters become inference tensors: no version counter
        out = m(a.double(), res.double())
        m.key.weight.mul_(2.0)  # an edit the version counter cannot see
        edited = m(a.double(), res.double())
        ref = copy.deepcopy(m)
        ref.backend = "reference"
        want = ref(a.double(), res.double())
    assert not torch.equal(out, edited)
    torch.testing.assert_close(edited, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Every input of the fold is in the cache key, not only the parameters (issue 13, item 4)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_cache_sees_float_scaling_edits_and_keys_every_fold_input(backend):
    skip_unless_runnable(backend, "cpu")
    m = fresh(backend)
    a, res = inputs(m)
    warm(m, a, res)
    m.adapters["0"].scaling = 4.0  # a plain float attribute: no parameter changes
    with torch.no_grad():
        torch.testing.assert_close(m(a, res), expect(m, a, res), rtol=1e-5, atol=1e-5)
    # the other non-tensor inputs fold() reads are in the key too
    from fusedadapter.modules import fold_inputs_key

    ws = m.adapter_weights()
    key = fold_inputs_key(ws, m.fusion_weights())[0]
    ws[1].activation = 3
    assert fold_inputs_key(ws, m.fusion_weights())[0] != key
    ws[1].activation, ws[2].ln_before = m.adapter_weights()[1].activation, True
    assert fold_inputs_key(ws, m.fusion_weights())[0] != key


def test_cache_sees_scaling_edit_on_a_patched_model():
    from fusedadapter.patching import fusion_sites
    from tiny_models import tiny_inputs, tiny_model

    model = fa.patch(tiny_model("bert"), {"a": fa.AdapterConfig(bottleneck_size=4),
                                          "b": fa.AdapterConfig(bottleneck_size=3, scaling=0.5)}, backend="torch")
    for _, _, site in fusion_sites(model):
        fa.testing.perturb_(site, torch.Generator().manual_seed(3))
    batch = tiny_inputs("bert")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
        for _, _, site in fusion_sites(model):
            site.adapters["a"].scaling = 4.0
        after = model(**batch).last_hidden_state
        for _, _, site in fusion_sites(model):
            site.backend = "reference"
        want = model(**batch).last_hidden_state
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


@requires_adapterhub
def test_cache_sees_scaling_edit_on_an_accelerated_adapterhub_model():
    import adapters
    from tiny_models import tiny_inputs, tiny_model

    model = tiny_model("bert")
    adapters.init(model)
    model.add_adapter("a", config=adapters.SeqBnConfig(reduction_factor=4))
    model.add_adapter("b", config=adapters.SeqBnConfig(reduction_factor=8, scaling=0.5))
    model.add_adapter_fusion(adapters.Fuse("a", "b"))
    model.set_active_adapters(adapters.Fuse("a", "b"))
    from adapters.methods.bottleneck import BottleneckLayer

    layers = [mod for mod in model.modules() if isinstance(mod, BottleneckLayer) and len(mod.adapters)]
    assert layers
    g = torch.Generator().manual_seed(3)
    for mod in layers:
        fa.testing.perturb_(mod.adapters, g)
        fa.testing.perturb_(mod.adapter_fusion_layer, g)
    model.eval()
    batch = tiny_inputs("bert")
    fa.accelerate(model, backend="torch")
    ups = [mod.adapters["a"] for mod in layers]
    with torch.no_grad():
        before = model(**batch).last_hidden_state
        for ad in ups:
            ad.scaling = 4.0
        after = model(**batch).last_hidden_state
        fa.unpatch(model)  # AdapterHub's own eager path on the same, edited modules
        want = model(**batch).last_hidden_state
    assert (after - before).abs().max() > 1e-2
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# The fast fold-cache check (issue 12): a warm eval call does not rebuild the key, and still sees
# every change the full key sees
# ------------------------------------------------------------------------------------------
def test_warm_eval_call_skips_the_full_key(monkeypatch):
    import fusedadapter.site as site

    m = fresh()
    a, res = inputs(m)
    warm(m, a, res)
    calls = []
    real = site.fold_inputs_key
    monkeypatch.setattr(site, "fold_inputs_key", lambda *x: calls.append(1) or real(*x))
    with torch.no_grad():
        m(a, res)
        m(a, res)
    assert calls == []


def test_fast_check_sees_replaced_parameters_modules_and_round_trips():
    m = fresh()
    a, res = inputs(m)
    warm(m, a, res)
    m.key.weight = torch.nn.Parameter(torch.randn_like(m.key.weight) * 0.3)  # a replaced Parameter
    with torch.no_grad():
        torch.testing.assert_close(m(a, res), expect(m, a, res), rtol=1e-5, atol=1e-5)
    lin = torch.nn.Linear(7, 24)
    torch.nn.init.normal_(lin.weight, std=0.5)
    m.adapters["1"].adapter_up = lin  # a replaced layer
    with torch.no_grad():
        torch.testing.assert_close(m(a, res), expect(m, a, res), rtol=1e-5, atol=1e-5)
    for _ in range(2):  # new storages at possibly reused addresses; edits in between
        m.double()
        with torch.no_grad():
            m.adapters["2"].adapter_up.weight.mul_(1.3)
        m.float()
        with torch.no_grad():
            torch.testing.assert_close(m(a, res), expect(m, a, res), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        m.value.weight.data = m.value.weight.data * 0.5  # .data: new storage, same version counter
        torch.testing.assert_close(m(a, res), expect(m, a, res), rtol=1e-5, atol=1e-5)
    m.train()  # under autograd with trainable parameters: never the cached eval fold
    out = m(a, res, dropout_mask=torch.ones(*a.shape[:-1], 3, dtype=torch.bool))
    out.sum().backward()
    assert m.query.weight.grad is not None


def test_fast_check_sees_a_float_scaling_turned_tensor_then_edited():
    m = fresh()
    a, res = inputs(m)
    warm(m, a, res)
    ad = m.adapters["0"]
    ad.scaling = torch.tensor(float(ad.scaling))  # the same value, now a plain tensor attribute
    warm(m, a, res)
    with torch.no_grad():
        ad.scaling.mul_(3.0)  # an in-place edit only the tensor's version counter shows
        torch.testing.assert_close(m(a, res), expect(m, a, res), rtol=1e-5, atol=1e-5)
