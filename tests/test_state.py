"""State: the fold cache never serves stale weights; modes, threads and determinism."""

import copy
import threading

import pytest
import torch

import fusedadapter as fa
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
