"""AdapterDrop's pruning on a model patched with several fusions over one pool (issue 16): each
fusion loses the pruned adapters; a routed mixed batch equals each row run through a model built
with only the kept adapters in each fusion (same weights; docs/algorithm.md §4 oracle, float64
truth), in eval and training, outputs and fusion gradients; save_adapterhub
writes the pruned fusions; a fusion left without adapters refuses, the model unchanged."""
import copy

import pytest
import torch

import fusedadapter as fa
from fusedadapter.patching import fusion_sites
from fusedadapter.testing import assert_oracle
from test_multitask import PATCH_FUSIONS, PATCH_POOL, _backend_or_skip, _rows, assert_fp32_grads_oracle, perturb_
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


def _pruned_multi(backend, dtype=torch.float32):
    bare = tiny_model("bert", dropout=False).to(dtype)
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
    """docs/algorithm.md §4 oracle: the pruned model at fp32 on ``backend`` against the kept-only
    models with the fp32 eager reference, truth the kept-only models in float64 on the fp32-rounded
    weights; outputs and every fusion gradient."""
    from fusedadapter.patching import set_backend

    _backend_or_skip(backend)
    bare, multi, inputs, kept = _pruned_multi("reference", dtype=torch.float64)
    for _, _, site in fusion_sites(multi):
        assert site.adapter_names == kept
    w = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rounded = copy.deepcopy(multi).float().double()

    def grads_of(model, loss, rename=lambda n: n):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {rename(n): p.grad.double() for n, p in model.named_parameters()
                if "adapter_fusion_layer" in rename(n) and p.grad is not None}

    def kept_only(source, dtype):
        out, grads = torch.zeros(4, 6, 32, dtype=torch.float64), {}
        for name in PATCH_FUSIONS:
            single = _kept_copy(bare, source, name, kept, "reference").to(dtype).train(train)
            idx = torch.tensor(_rows(ROUTE, name))
            y = last_hidden(single(**{k: v[idx] for k, v in inputs.items()}))
            out[idx] = y.detach().double()
            rename = (lambda n, name=name: n.replace("fusedadapter_output.",
                                                     f"fusedadapter_output.adapter_fusion_layer.{name}.")
                      if ".adapters." not in n else n)
            grads.update(grads_of(single, (y * w[idx].to(dtype)).sum(), rename))
        return out, grads

    truth_out, truth = kept_only(rounded, torch.float64)
    ref_out, ref = kept_only(copy.deepcopy(multi).float(), torch.float32)
    model = copy.deepcopy(multi).float()
    set_backend(model, backend)
    model.train(train)
    with fa.fusion_route(ROUTE):
        out = last_hidden(model(**inputs))
    got = grads_of(model, (out * w.float()).sum())
    assert_oracle(out.detach().double(), ref_out, truth_out, torch.float32, what=f"{backend} pruned rows")
    assert truth and set(truth) <= set(got)
    assert_fp32_grads_oracle(got, ref, truth, list(truth), backend)


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
