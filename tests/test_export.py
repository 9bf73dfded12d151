"""Export: torch.onnx.export(..., dynamo=True) run by ONNX Runtime, and torch.export (docs/export.md).

Each exported file is checked at several batch x sequence sizes (dynamic axes) against the
docs/algorithm.md §4 oracle: ``got`` is ONNX Runtime's CPU output, ``ref`` the eager reference in the same
dtype, ``truth`` the eager reference in float64, all on the same weights. Every graph must pass
``onnx.checker`` and hold only standard-domain ONNX nodes, whatever the backend; the folded
weights must be float32 constants (no float64 anywhere in the graph).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch

import fusedadapter as fa
from conftest import adapters_available
from fusedadapter.export import ExportError, WithFusionProbs, custom_domain_ops, onnx_export
from fusedadapter.patching import collect_fusion_probs, fusion_sites
from fusedadapter.testing import assert_oracle, perturb_
from tiny_models import last_hidden, one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

F16, F32, F64 = torch.float16, torch.float32, torch.float64
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "adapterhub_bert")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def export_onnx(model, args, path, *, kwargs=None, dynamic_shapes=None, **kw):
    """The standard call, quietly (torch.onnx prints its progress)."""
    torch.onnx.export(model, args, path, kwargs=kwargs, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False,
                      **kw)
    return path


def check_graph(path):
    """onnx.checker, standard domains only, no float64 anywhere (the fold is float32 constants)."""
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert custom_domain_ops(model) == []
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    double = onnx.TensorProto.DOUBLE
    assert [i.name for i in model.graph.initializer if i.data_type == double] == []
    casts = [n for n in model.graph.node if n.op_type == "Cast" and any(a.i == double for a in n.attribute)]
    assert casts == [], "a cast to float64 in the exported graph"
    return model


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def run_ort(sess, feeds):
    names = [i.name for i in sess.get_inputs()]
    outs = sess.run(None, {n: feeds[n].numpy() for n in names})
    return [torch.from_numpy(o) for o in outs]


class SiteCall(torch.nn.Module):
    """A fusion site called as a model: (adapter input, residual[, adapter mask]) -> (out, probs)."""

    def __init__(self, site):
        super().__init__()
        self.site = site

    def forward(self, a, res, adapter_mask=None):
        return self.site(a, res, return_probs=True, adapter_mask=adapter_mask)


class Hidden(torch.nn.Module):
    """A Hugging Face model returning its last hidden state (one output tensor)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return last_hidden(self.model(input_ids=input_ids, attention_mask=attention_mask))


def make_site(backend="torch"):
    site = fa.FusedAdapterFusion(32, {
        "a": fa.AdapterConfig(bottleneck_size=8),
        "b": fa.AdapterConfig(bottleneck_size=4, non_linearity="gelu", ln_before=True, scaling="learned"),
        "c": fa.AdapterConfig(bottleneck_size=2, non_linearity="tanh", scaling="channel"),
    }, backend=backend)
    return perturb_(site, torch.Generator().manual_seed(3)).eval()


def site_dims():
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq")
    return {0: b, 1: s}


def references(module, dtype, *args, **kwargs):
    """(ref in ``dtype``, truth in float64): the eager reference backend on the same weights."""
    outs = []
    for dt in (dtype, F64):
        m = copy.deepcopy(module).to(dt)
        for site in (m.modules()):
            if isinstance(site, fa.FusedAdapterFusion):
                site.backend = "reference"
        cast = [x.to(dt) if x.is_floating_point() else x for x in args]
        ckw = {k: (v.to(dt) if v.is_floating_point() else v) for k, v in kwargs.items()}
        with torch.no_grad():
            outs.append(m(*cast, **ckw))
    return outs


# ------------------------------------------------------------------------------------------
# (a) the module
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site_onnx(tmp_path_factory):
    site = make_site()
    a, res = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    path = str(tmp_path_factory.mktemp("onnx") / "site.onnx")
    d = site_dims()
    export_onnx(SiteCall(site).eval(), (a, res), path, dynamic_shapes=(d, d))
    return site, path


@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (4, 17)])
def test_site_onnx_runtime_matches_reference(site_onnx, shape):
    site, path = site_onnx
    check_graph(path)
    sess = session(path)
    a, res = torch.randn(*shape, 32), torch.randn(*shape, 32)
    out, probs = run_ort(sess, {"a": a, "res": res})
    (ref_out, ref_p), (truth_out, truth_p) = references(SiteCall(site), F32, a, res)
    assert_oracle(out, ref_out, truth_out, F32, what=f"site ONNX output {shape}")
    assert_oracle(probs, ref_p, truth_p, F32, what=f"site ONNX probs {shape}")


def test_site_fold_enters_as_float32_constants(site_onnx):
    """The folded weights are initializers (computed once at export), not a fold run per inference:
    no MatMul between two initializers, and the raw query/key/value weights are not in the graph."""
    site, path = site_onnx
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    assert {i.data_type for i in inits.values()} & floats == {onnx.TensorProto.FLOAT}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            assert not all(x in inits for x in node.input[:2]), f"{node.name}: a product of two constants"
    h = site.hidden_size
    assert not [n for n, i in inits.items() if tuple(i.dims) == (h, h)], "an H x H fusion matrix in the graph"
    # The same before ONNX's optimizer (which folds constant subgraphs of small models, hiding a
    # traced fold): in the exported program no parameter is read and nothing is float64.
    a, res = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    ep = torch.export.export(SiteCall(site).eval(), (a, res))
    f64 = [n.name for n in ep.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
           and n.meta["val"].dtype == F64]
    assert f64 == [], f"float64 values in the exported graph: {f64}"
    params = {s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.PARAMETER}
    read = [n.name for n in ep.graph.nodes if n.op == "placeholder" and n.name in params and n.users]
    assert read == [], f"parameters read by the graph (a fold at every inference): {read}"


@pytest.mark.parametrize("backend", ["auto", "cpu", "triton", "torch", "reference", "cuda"])
def test_every_backend_exports_standard_ops(backend, tmp_path):
    """Whatever the backend (even one that cannot run here), the export is the composite torch form
    (or, for reference, the eager op sequence): aten ops only, and only standard ONNX nodes."""
    site = make_site(backend)
    a, res = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    ep = torch.export.export(SiteCall(site).eval(), (a, res))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "fusedadapter" in t], targets
    if backend == "reference":  # the other backends trace as the torch form, which site_onnx runs
        path = export_onnx(ep, (a, res), str(tmp_path / "site.onnx"))
        check_graph(path)
        (out, probs) = run_ort(session(path), {"a": a, "res": res})
        (ref_out, _), (truth_out, _) = references(SiteCall(site), F32, a, res)
        assert_oracle(out, ref_out, truth_out, F32, what=f"{backend} ONNX output")


def test_site_fp16_onnx_runtime(tmp_path):
    site = make_site().half()
    a, res = torch.randn(2, 5, 32).half(), torch.randn(2, 5, 32).half()
    d = site_dims()
    path = export_onnx(SiteCall(site).eval(), (a, res), str(tmp_path / "site16.onnx"), dynamic_shapes=(d, d))
    check_graph(path)
    sess = session(path)
    for shape in [(1, 3), (3, 9)]:
        a, res = torch.randn(*shape, 32).half(), torch.randn(*shape, 32).half()
        out, probs = run_ort(sess, {"a": a, "res": res})
        assert out.dtype == F16
        (ref_out, ref_p), (truth_out, truth_p) = references(SiteCall(site), F16, a, res)
        assert_oracle(out, ref_out, truth_out, F16, what=f"fp16 site ONNX output {shape}")
        assert_oracle(probs, ref_p, truth_p, F16, what=f"fp16 site ONNX probs {shape}")


def test_adapter_mask_as_graph_input(tmp_path):
    site = make_site()
    a, res = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    d = site_dims()
    path = export_onnx(SiteCall(site).eval(), (a, res, mask), str(tmp_path / "masked.onnx"),
                       dynamic_shapes=(d, d, {0: d[0]}))
    check_graph(path)
    sess = session(path)
    for b, s in [(3, 4), (1, 7)]:
        a, res = torch.randn(b, s, 32), torch.randn(b, s, 32)
        mask = torch.rand(b, 3) > 0.4
        mask[0] = False  # a row with every adapter masked: the residual alone
        out, probs = run_ort(sess, {"a": a, "res": res, "adapter_mask": mask})
        (ref_out, ref_p), (truth_out, truth_p) = references(SiteCall(site), F32, a, res, mask)
        assert_oracle(out, ref_out, truth_out, F32, what=f"masked site ONNX output {(b, s)}")
        assert_oracle(probs, ref_p, truth_p, F32, what=f"masked site ONNX probs {(b, s)}")
        assert torch.equal(probs[~mask[:, None, :].expand_as(probs)], torch.zeros(int((~mask).sum()) * s))


# ------------------------------------------------------------------------------------------
# what cannot export
# ------------------------------------------------------------------------------------------
def test_training_mode_dropout_raises():
    site = make_site().train()
    a, res = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with pytest.raises(Exception, match=r"training mode.*model\.eval\(\)") as info:
        torch.export.export(SiteCall(site), (a, res))
    assert "FusedAdapterFusion" in str(info.value) and "'a', 'b', 'c'" in str(info.value)
    model = fa.patch(tiny_model("bert"), {"x": fa.AdapterConfig(reduction_factor=4)}).train()
    with pytest.raises(ExportError, match=r"encoder\.layer\.0\.fusedadapter_output"):
        onnx_export(model, kwargs=tiny_inputs("bert"))


def test_temperature_exports_current_value_with_warning():
    site = fa.FusedAdapterFusion(32, [fa.AdapterConfig(reduction_factor=4)] * 3, fusion={"temperature": True},
                                 backend="torch")
    site = perturb_(site).eval()
    a, res = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    with torch.no_grad():
        for _ in range(7):
            site(a, res)
    t_now = site.T
    with pytest.warns(UserWarning, match=r"temperature=True.*T=%.4g" % t_now):
        d = site_dims()
        ep = torch.export.export(SiteCall(site).eval(), (a, res), dynamic_shapes=(d, d))
    assert site.T == t_now, "exporting must not lower the temperature"
    a2, res2 = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    out, probs = ep.module()(a2, res2)
    for _ in range(2):  # the graph is constant in T; the eager module lowers it on every call
        out_again, _ = ep.module()(a2, res2)
        assert torch.equal(out, out_again)
    (ref_out, ref_p), (truth_out, truth_p) = references(SiteCall(site), F32, a2, res2)  # copies at T = t_now
    assert_oracle(out, ref_out, truth_out, F32, what="temperature site output")
    assert_oracle(probs, ref_p, truth_p, F32, what="temperature site probs")
    late = copy.deepcopy(site)
    late.T = t_now - 0.1  # two steps later: the graph is not that
    with torch.no_grad():
        _, late_p = late(a2, res2, return_probs=True)
    assert (late_p - probs).abs().max() > 100 * (ref_p - truth_p).abs().max()


# ------------------------------------------------------------------------------------------
# (b) patched Hugging Face models, (torch.export too)
# ------------------------------------------------------------------------------------------
def patched(arch):
    model = tiny_model(arch, dropout=False, seed=1)
    fa.patch(model, {"sst": fa.AdapterConfig(reduction_factor=4),
                     "nli": fa.AdapterConfig(bottleneck_size=3, non_linearity="gelu")})
    g = torch.Generator().manual_seed(7)
    for _, _, site in fusion_sites(model):
        perturb_(site, g)
    return Hidden(model).eval()


def hf_dims():
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=40)
    return {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}


# The AdapterHub environment (transformers 4.57) runs BERT only: the sweep is ~35 s of CPU per
# environment, and tests/test_export_adapterhub.py adds the AdapterHub models there.
ARCHS = ["bert"] if adapters_available() else ["bert", "roberta", "distilbert", "gpt2", "llama"]


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_model_torch_export_save_load_onnx_runtime(arch, tmp_path):
    """torch.export with dynamic batch and sequence, a torch.export.save/load round trip (the same
    outputs), then that program to ONNX (what torch.onnx.export(model, ..., dynamo=True) does after
    its own torch.export), run by ONNX Runtime at several sizes through the one file."""
    model = patched(arch)
    ep = torch.export.export(model, (), kwargs=tiny_inputs(arch, batch=2, seq=6), dynamic_shapes=hf_dims())
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "fusedadapter" in t]
    pt2 = str(tmp_path / f"{arch}.pt2")
    torch.export.save(ep, pt2)
    loaded = torch.export.load(pt2)
    sizes = [(1, 3), (3, 11)]
    refs = {}
    for b, s in sizes:
        x = tiny_inputs(arch, batch=b, seq=s, seed=b + s)
        with torch.no_grad():
            before, after = ep.module()(**x), loaded.module()(**x)
        assert torch.equal(before, after)
        refs[(b, s)] = (x, *references(model, F32, **x))
        assert_oracle(after, *refs[(b, s)][1:], F32, what=f"{arch} torch.export last hidden state {(b, s)}")
    # optimize=False for all but BERT: onnxscript's optimizer is half the export time; BERT, the
    # site and the AdapterHub fixture go through the default (optimized) path
    path = export_onnx(loaded, (), str(tmp_path / f"{arch}.onnx"), kwargs=tiny_inputs(arch, batch=2, seq=6),
                       optimize=arch == "bert")
    check_graph(path)
    sess = session(path)
    for (b, s), (x, ref, truth) in refs.items():
        (got,) = run_ort(sess, x)
        assert_oracle(got, ref, truth, F32, what=f"{arch} ONNX last hidden state {(b, s)}")


# ------------------------------------------------------------------------------------------
# (c) AdapterHub files, trained and saved by AdapterHub (transformers 4.57), loaded on this version
# ------------------------------------------------------------------------------------------
def test_adapterhub_fixture_exports_and_matches_adapterhub(tmp_path):
    from make_adapterhub_fixture import FUSION, base_model
    from safetensors.torch import load_file

    expected = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    model = fa.load_adapterhub(base_model(), os.path.join(FIXTURE, FUSION))
    x = {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"]}
    with torch.no_grad(), collect_fusion_probs(model):
        eager = last_hidden(model(**x))
    ah32, ah64 = expected["last_hidden_state.f32"], expected["last_hidden_state.f64"]
    assert_oracle(eager, ah32, ah64, F32, what="load_adapterhub (PyTorch) vs AdapterHub")

    path = str(tmp_path / "adapterhub.onnx")
    prog_inputs = tiny_inputs("bert", batch=2, seq=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_export(model, kwargs=prog_inputs, f=path, fusion_probs=True, verbose=False)
    check_graph(path)
    sess = session(path)
    outs = run_ort(sess, x)
    names = [o.name for o in sess.get_outputs()]
    assert names == ["output"] + WithFusionProbs(model).prob_names
    assert_oracle(outs[0], ah32, ah64, F32, what="ONNX Runtime vs AdapterHub, last hidden state")
    for name, got in zip(names[1:], outs[1:]):
        assert_oracle(got, expected[name + ".f32"], expected[name + ".f64"], F32, what=f"ONNX Runtime {name}")
    assert len(outs) == 3  # one site per block (seq_bn), two blocks
    # other sizes through the same file: against the eager loaded model
    for b, s in [(1, 2), (4, 12)]:
        xi = tiny_inputs("bert", batch=b, seq=s, seed=s)
        got = run_ort(sess, xi)[0]
        ref, truth = references(Hidden(model), F32, **xi)
        assert_oracle(got, ref, truth, F32, what=f"ONNX Runtime, AdapterHub fusion {(b, s)}")
