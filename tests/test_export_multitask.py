"""Export of multi-fusion models with the route as a graph input (docs/export.md, docs/multitask.md).

A :class:`fusedadapter.MultiFusion` site and a tiny BERT patched with ``fusions=`` export to ONNX
with a ``route`` input (int64 (batch,), each row's fusion id); ONNX Runtime runs the one file at
several batch sizes and routes (a fusion without rows included), and every row equals that row
run alone through its own fusion under the docs/algorithm.md §4 oracle (``ref``: the row alone
through its fusion on the eager reference backend in fp32; ``truth``: the same in float64).
The graph passes ``onnx.checker``, holds no custom-domain node and no float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fusedadapter as fa
from fusedadapter.export import onnx_export
from fusedadapter.multitask import MultiFusion, fusion_route
from fusedadapter.patching import fusion_sites
from fusedadapter.testing import assert_oracle, perturb_
from test_export import Hidden, check_graph, run_ort, session
from tiny_models import one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

F32, F64 = torch.float32, torch.float64
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning",
                                        "ignore::UserWarning")

H = 16
POOL = {
    "a": fa.AdapterConfig(bottleneck_size=3),
    "b": fa.AdapterConfig(bottleneck_size=5, non_linearity="gelu", ln_before=True),
    "c": fa.AdapterConfig(bottleneck_size=4, non_linearity="tanh", scaling="learned"),
}
FUSIONS = {"sst": ("dynamic", ["a", "b", "c"]), "mnli": ("static", ["c", "a"]), "qqp": ("dynamic", ["b", "c"])}


def _reference_copy(module, dtype):
    m = copy.deepcopy(module).to(dtype)
    for site in m.modules():
        if isinstance(site, MultiFusion):
            site.backend = "reference"
    return m


class SiteCall(torch.nn.Module):
    def __init__(self, site):
        super().__init__()
        self.site = site

    def forward(self, a, res, route, adapter_mask):
        return self.site(a, res, route=route, return_probs=True, adapter_mask=adapter_mask)


def test_multifusion_site_route_and_mask_inputs(tmp_path):
    site = perturb_(MultiFusion(H, POOL, FUSIONS, backend="auto"), torch.Generator().manual_seed(0)).eval()
    g = torch.Generator().manual_seed(1)
    a, res = torch.randn(3, 4, H, generator=g), torch.randn(3, 4, H, generator=g)
    route, mask = torch.tensor([2, 0, 1]), torch.ones(3, len(POOL), dtype=torch.bool)
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    path = str(tmp_path / "multi_site.onnx")
    torch.onnx.export(SiteCall(site), (a, res, route, mask), path, dynamo=True, verbose=False,
                      input_names=["a", "res", "route", "adapter_mask"],
                      dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}, {0: b}, {0: b}))
    check_graph(path)
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["a", "res", "route", "adapter_mask"]
    ref_site, truth_site = _reference_copy(site, F32), _reference_copy(site, F64)
    names = site.fusion_names
    for batch, seq, ids in [(1, 1, [1]), (4, 5, [0, 2, 0, 2]), (6, 3, [1, 0, 2, 2, 1, 0])]:  # (4, 5): mnli no rows
        a, res = torch.randn(batch, seq, H, generator=g), torch.randn(batch, seq, H, generator=g)
        mask = torch.rand(batch, len(POOL), generator=g) > 0.3
        mask[0] = False  # a row with every adapter masked: the bare sub-layer
        route = torch.tensor(ids)
        out, probs = run_ort(sess, {"a": a, "res": res, "route": route, "adapter_mask": mask})
        for i, k in enumerate(ids):  # row i alone through its own fusion
            fusion = names[k]
            cols = [site.adapter_names.index(n) for n in FUSIONS[fusion][1]]
            alone = []
            for m, dt in ((ref_site, F32), (truth_site, F64)):
                with torch.no_grad():
                    o, p = m.fusions_by_name[fusion](a[i:i + 1].to(dt), res[i:i + 1].to(dt), return_probs=True,
                                                     adapter_mask=mask[i:i + 1][:, cols])
                alone.append((o[0], p[0]))
            (ref_o, ref_p), (truth_o, truth_p) = alone
            assert_oracle(out[i], ref_o, truth_o, F32, what=f"site row {i} ({fusion}) of {batch}x{seq}")
            assert_oracle(probs[i][..., cols], ref_p, truth_p, F32, what=f"site probs row {i} ({fusion})")
            others = [j for j in range(len(POOL)) if j not in cols]
            assert torch.equal(probs[i][..., others], torch.zeros(seq, len(others)))
    # an id that names no fusion cannot raise inside the graph: that row comes out NaN, the others are kept
    out, _ = run_ort(sess, {"a": a[:2], "res": res[:2], "route": torch.tensor([0, 7]), "adapter_mask": mask[:2]})
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()


def test_patched_bert_with_fusions_exports_route_input(tmp_path):
    model = tiny_model("bert", dropout=False, seed=1)
    fa.patch(model, {"a": fa.AdapterConfig(reduction_factor=4), "b": fa.AdapterConfig(bottleneck_size=3),
                     "c": fa.AdapterConfig(bottleneck_size=5, non_linearity="gelu")},
             fusions={"sst": ("dynamic", ["a", "b"]), "nli": ("static", ["c", "a", "b"])})
    g = torch.Generator().manual_seed(7)
    for _, _, site in fusion_sites(model):
        perturb_(site, g)
    hidden = Hidden(model).eval()
    example = {**tiny_inputs("bert", batch=2, seq=6), "route": torch.tensor([1, 0])}
    path = str(tmp_path / "bert_multi.onnx")
    onnx_export(hidden, kwargs=example, f=path, fusion_route=True, verbose=False)
    check_graph(path)
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask", "route"]
    ref_m, truth_m = _reference_copy(hidden, F32), _reference_copy(hidden, F64)
    for batch, seq, route in [(1, 4, ["nli"]), (3, 7, ["sst", "nli", "sst"]), (4, 5, ["sst"] * 4)]:
        x = tiny_inputs("bert", batch=batch, seq=seq, seed=batch + seq)
        ids = torch.tensor([["sst", "nli"].index(r) for r in route])
        (got,) = run_ort(sess, {**x, "route": ids})
        with torch.no_grad(), fusion_route(route):  # the routed PyTorch model, same batch
            routed = hidden(**x)
        for i, name in enumerate(route):  # row i alone through its own fusion
            row = {k: v[i:i + 1] for k, v in x.items()}
            with torch.no_grad(), fusion_route(name):
                ref, truth = ref_m(**row)[0], truth_m(**row)[0]
            assert_oracle(got[i], ref, truth, F32, what=f"ONNX row {i} ({name}) of {batch}x{seq}")
            assert_oracle(routed[i], ref, truth, F32, what=f"PyTorch routed row {i} ({name})")


def test_onnx_export_fusion_route_needs_an_example():
    model = MultiFusion(H, POOL, FUSIONS).eval()
    with pytest.raises(ValueError, match=r"kwargs\['route'\]"):
        onnx_export(model, kwargs={"adapter_input": torch.randn(1, 2, H), "residual": torch.randn(1, 2, H)},
                    fusion_route=True)
