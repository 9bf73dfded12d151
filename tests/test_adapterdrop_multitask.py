"""AdapterDrop's pruning on a model patched with several fusions over one pool (issue 16): each
fusion loses the pruned adapters; a routed mixed batch equals each row run through a model built
with only the kept adapters in each fusion (same weights), in eval and training; save_adapterhub
writes the pruned fusions; a fusion left without adapters refuses, the model unchanged."""
import copy

import pytest
import torch

import fusedadapter as fa
from fusedadapter.patching import fusion_sites
from test_multitask import PATCH_FUSIONS, PATCH_POOL, _backend_or_skip, _rows, perturb_
from tiny_models import last_hidden, tiny_inputs, tiny_model

ROUTE = ["mnli", "sst", "sst", "mnli"]


def _kept_copy(bare, multi, name, kept, backend):
    cfg, names = PATCH_FUSIONS[name]
    names = [n for n in names if n in kept]
    single = fa.patch(copy.deepcopy(bare), {n: PATCH_POOL[n] for n in names}, fusion=cfg, backend=backend)
    for (_, _, s1), (_, _, sm) in zip(fusion_sites(single), fusion_sites(multi)):
        f = sm.adapter_fusion_layer[name]
        assert f.adapter_names == names
        s1.load_state_dict({**{f"adapters.{k}": v for k, v in f.adapters.state_dict().items()}, **f.state_dict()})
    return single


def _pruned_multi(backend):
    bare = tiny_model("bert", dropout=False)
    multi = fa.patch(copy.deepcopy(bare), PATCH_POOL, fusions=PATCH_FUSIONS, backend=backend)
    g = torch.Generator().manual_seed(3)
    for _, _, site in fusion_sites(multi):
        perturb_(site, g)
    inputs = tiny_inputs("bert", batch=4, seq=6)
    with fa.fusion_route(ROUTE):
        report = fa.adapter_drop(multi, [inputs], keep=2)
    assert len(report.kept) == 2
    return bare, multi, inputs, report.kept


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("train", [False, True])
def test_pruned_multi_fusion_rows_equal_kept_only_models(backend, train):
    _backend_or_skip(backend)
    bare, multi, inputs, kept = _pruned_multi(backend)
    for _, _, site in fusion_sites(multi):
        assert site.adapter_names == kept
    multi.train(train)
    w = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(6))
    with fa.fusion_route(ROUTE):
        out = last_hidden(multi(**inputs))
    (out * w).sum().backward()
    got = {n: p.grad for n, p in multi.named_parameters() if "adapter_fusion_layer" in n and p.grad is not None}
    want = {}
    for name in PATCH_FUSIONS:
        single = _kept_copy(bare, multi, name, kept, backend).train(train)
        idx = torch.tensor(_rows(ROUTE, name))
        y = last_hidden(single(**{k: v[idx] for k, v in inputs.items()}))
        torch.testing.assert_close(out[idx], y, rtol=1e-5, atol=1e-5)
        (y * w[idx]).sum().backward()
        for n, p in single.named_parameters():
            if "fusedadapter_" in n and ".adapters." not in n and p.grad is not None:
                want[n.replace("fusedadapter_output.", f"fusedadapter_output.adapter_fusion_layer.{name}.")] = p.grad
    assert set(want) <= set(got) and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5, msg=n)


def test_pruned_multi_fusion_save_adapterhub_round_trips(tmp_path):
    _, multi, inputs, kept = _pruned_multi("torch")
    multi.eval()
    fa.save_adapterhub(multi, str(tmp_path))
    loaded = fa.load_adapterhub(tiny_model("bert", dropout=False), [str(tmp_path / f) for f in PATCH_FUSIONS],
                                backend="torch").eval()
    for _, _, site in fusion_sites(loaded):
        for name, f in site.fusions_by_name.items():
            assert f.adapter_names == [n for n in PATCH_FUSIONS[name][1] if n in kept]
    with fa.fusion_route(ROUTE), torch.no_grad():
        torch.testing.assert_close(last_hidden(loaded(**inputs)), last_hidden(multi(**inputs)), rtol=1e-5, atol=1e-6)


def test_fusion_left_without_adapters_refuses_and_leaves_the_model():
    fusions = {"x": ("dynamic", ["a"]), "y": ("dynamic", ["b"]), "z": ("dynamic", ["c"])}
    model = fa.patch(tiny_model("bert"), PATCH_POOL, fusions=fusions, backend="torch").eval()
    inputs = tiny_inputs("bert", batch=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with fa.fusion_route(["x", "y", "z"]), torch.no_grad():
        before = last_hidden(model(**inputs))
        with pytest.raises(ValueError, match="fusion '[xyz]' .* all pruned"):
            fa.adapter_drop(model, [inputs], keep=1)
        assert torch.equal(last_hidden(model(**inputs)), before)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
