"""Several AdapterHub fusions over one adapter pool (issue 16): files both ways, and accelerate.

* main environment (transformers 5.x, no ``adapters``): tests/fixtures/adapterhub_bert_multi, two
  fusions AdapterHub saved, load with ``load_adapterhub([dir, dir])`` and a routed mixed batch
  matches AdapterHub's per-fusion outputs (docs/algorithm.md §4 oracle); ``save_adapterhub`` of
  a multi-fusion model reloads identically; bad input raises.
* AdapterHub environment (adapters 1.3.0): the fixture is current; files AdapterHub saves load
  and route, files fusedadapter saves load into AdapterHub, each ``Fuse`` matching; an accelerated
  AdapterHub model with two ``Fuse`` setups serves a mixed batch (``MultiTask`` + ``task_ids`` or
  ``fusion_route``) whose rows match AdapterHub run once per setup, with masks, and training
  gradients reach only the setups rows used.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys

import pytest
import torch

import fusedadapter as fa
from conftest import requires_adapterhub
from fusedadapter.multitask import MultiFusion
from fusedadapter.patching import fusion_sites
from fusedadapter.testing import FLOORS, assert_oracle, perturb_, rel_err
from threads_helper import run_together
from tiny_models import last_hidden, one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))

F32, F64 = torch.float32, torch.float64
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "adapterhub_bert_multi")
FUSES = ("a,b,c", "pair")  # Fuse("a", "b", "c") dynamic and Fuse("c", "a", name="pair") static
ROUTES = [[1, 0, 1], ["pair", "pair", "pair"], [0, 0, 1]]  # interleaved, one fusion without rows, grouped


def _rows(route, k):
    return torch.tensor([i for i, r in enumerate(route) if r in (k, FUSES[k])], dtype=torch.long)


def _fixture_dirs(root=FIXTURE):
    return [os.path.join(root, f) for f in FUSES]


def _backend_or_skip(backend):
    if backend == "triton":  # the Triton interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1)
        fusion = pytest.importorskip("fusedadapter.kernels.fusion", reason="needs the `triton` package")
        if fusion.unsupported_reason("cpu") is not None:
            pytest.skip(fusion.unsupported_reason("cpu"))


def _assert_rows(y, route, ref, truth, what):
    """Every row of ``y`` against its fusion's own output (``ref[name]`` float32, ``truth[name]`` float64)."""
    for k, name in enumerate(FUSES):
        idx = _rows(route, k)
        if len(idx):
            assert_oracle(y[idx], ref[name][idx], truth[name][idx], F32, what=f"{what}: rows of {name} {route}")


# ------------------------------------------------------------------------------------------
# main environment: AdapterHub's files with two fusions on this transformers version
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "cpu", "reference", "triton"])
def test_adapterhub_files_with_two_fusions_load_and_route(backend):
    _backend_or_skip(backend)
    from make_adapterhub_fixture import base_model
    from safetensors.torch import load_file

    expected = load_file(os.path.join(FIXTURE, "expected.safetensors"))
    x = {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"]}
    ref = {n: expected[f"last_hidden_state.{n}.f32"] for n in FUSES}
    truth = {n: expected[f"last_hidden_state.{n}.f64"] for n in FUSES}
    model = fa.load_adapterhub(base_model(), _fixture_dirs(), backend=backend)
    sites = fusion_sites(model)
    assert len(sites) == 2 and all(isinstance(s, MultiFusion) and s.fusion_names == list(FUSES)
                                   and s.adapter_names == ["a", "b", "c"] for _, _, s in sites)
    assert list(sites[0][2].fusions_by_name["pair"].adapters) == ["c", "a"]
    for route in ROUTES:
        with torch.no_grad(), fa.fusion_route(route):
            y = last_hidden(model(**x))
        _assert_rows(y, route, ref, truth, f"load_adapterhub (two fusions, {backend})")
    m64 = fa.load_adapterhub(base_model().double(), _fixture_dirs(), backend="reference")
    with torch.no_grad(), fa.fusion_route(ROUTES[0]):
        y64 = last_hidden(m64(**x))
    for k, name in enumerate(FUSES):
        idx = _rows(ROUTES[0], k)
        assert rel_err(y64[idx], truth[name][idx]) <= FLOORS[F64], name


def test_multi_fusion_save_reload_round_trip(tmp_path):
    """save_adapterhub of a multi-fusion model writes the pool once and a directory per fusion; the
    files reload (bit for bit) and a patch(fusions=...) model's files reload the same way."""
    from make_adapterhub_fixture import base_model

    model = fa.load_adapterhub(base_model(), _fixture_dirs(), backend="torch")
    fa.save_adapterhub(model, str(tmp_path / "saved"), use_safetensors=True)
    assert sorted(os.listdir(tmp_path / "saved")) == sorted(["a", "b", "c", *FUSES])
    for name, names in zip(FUSES, (["a", "b", "c"], ["c", "a"])):
        meta = json.load(open(tmp_path / "saved" / name / "adapter_fusion_config.json"))
        assert meta["name"] == name and meta["adapter_names"] == names
    back = fa.load_adapterhub(base_model(), [str(tmp_path / "saved" / f) for f in FUSES], backend="torch")
    assert {k: v for k, v in model.state_dict().items()}.keys() == back.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    x = tiny_inputs("bert", batch=3, seq=5)
    with torch.no_grad(), fa.fusion_route(["pair", "a,b,c", "pair"]):
        assert torch.equal(last_hidden(model(**x)), last_hidden(back(**x)))

    # patch(fusions=...) -> files -> load_adapterhub: the same model
    pool = {"a": fa.AdapterConfig(bottleneck_size=8), "b": fa.AdapterConfig(bottleneck_size=4, non_linearity="gelu"),
            "c": fa.AdapterConfig(bottleneck_size=2, ln_before=True)}
    patched = fa.patch(tiny_model("bert"), pool, fusions={"sst": ("dynamic", ["a", "b"]),
                                                          "mnli": ("static", ["c", "b", "a"])}, backend="torch")
    g = torch.Generator().manual_seed(4)
    for _, _, site in fusion_sites(patched):
        perturb_(site, g)
    fa.save_adapterhub(patched, str(tmp_path / "patched"))
    again = fa.load_adapterhub(tiny_model("bert"), [str(tmp_path / "patched" / f) for f in ("sst", "mnli")],
                               backend="torch")
    with torch.no_grad(), fa.fusion_route(["mnli", "sst", "mnli"]):
        assert torch.equal(last_hidden(patched(**x)), last_hidden(again(**x)))


def test_multi_fusion_load_errors(tmp_path):
    from make_adapterhub_fixture import base_model

    with pytest.raises(TypeError, match="a mapping name -> directory"):
        fa.load_adapterhub(base_model(), _fixture_dirs(), adapter_dirs=[os.path.join(FIXTURE, n) for n in "abc"])
    with pytest.raises(ValueError, match="no directory for \\['b'\\]"):
        fa.load_adapterhub(base_model(), _fixture_dirs(), adapter_dirs={n: os.path.join(FIXTURE, n) for n in "ac"})
    with pytest.raises(ValueError, match="same fusion name"):
        fa.load_adapterhub(base_model(), [_fixture_dirs()[0]] * 2)
    with pytest.raises(TypeError, match="non-empty list of fusion directories"):
        fa.load_adapterhub(base_model(), [])
    root = tmp_path / "fx"
    shutil.copytree(FIXTURE, root)
    path = root / "pair" / "adapter_fusion_config.json"
    meta = json.load(open(path))
    meta["config"]["query_before_ln"] = True
    json.dump(meta, open(path, "w"))
    with pytest.raises(fa.checkpoint.AdapterHubFormatError, match="query_before_ln"):
        fa.load_adapterhub(base_model(), _fixture_dirs(str(root)))
    model = fa.load_adapterhub(base_model(), _fixture_dirs())
    with pytest.raises(ValueError, match="no route"):
        model(**tiny_inputs("bert"))
    # fusions that do not share their sites: "pair" fuses only c, which leaves out block 1
    from safetensors.torch import load_file, save_file

    root = tmp_path / "fx2"
    shutil.copytree(FIXTURE, root)
    for rel, edit in (("c/adapter_config.json", lambda m: m["config"].update(leave_out=[1])),
                      ("pair/adapter_fusion_config.json", lambda m: m.update(adapter_names=["c"]))):
        meta = json.load(open(root / rel))
        edit(meta)
        json.dump(meta, open(root / rel, "w"))
    sd = load_file(root / "c" / "adapter.safetensors")
    save_file({k: v for k, v in sd.items() if ".layer.1." not in k}, root / "c" / "adapter.safetensors")
    with pytest.raises(fa.checkpoint.AdapterHubFormatError, match="block 1 output_adapter: fusions \\['a,b,c'\\] "
                                                                   "have a site there but \\['pair'\\] do not"):
        fa.load_adapterhub(unchanged := base_model(), _fixture_dirs(str(root)))
    assert not fa.patching.is_patched(unchanged)  # checked before the model changes


# ------------------------------------------------------------------------------------------
# AdapterHub environment
# ------------------------------------------------------------------------------------------
def _ah_model(seed=3, *, preset2="static"):
    """A tiny AdapterHub BERT with adapters a, b, c and the setups Fuse(a, b, c) and
    Fuse(c, a, name="pair"), every weight perturbed; returns (model, the two Fuse objects)."""
    import adapters

    model = tiny_model("bert", dropout=False, seed=seed)
    adapters.init(model)
    model.add_adapter("a", config=adapters.SeqBnConfig(reduction_factor=4))
    model.add_adapter("b", config=adapters.SeqBnConfig(reduction_factor=8, non_linearity="gelu", scaling="learned"))
    model.add_adapter("c", config=adapters.SeqBnConfig(reduction_factor=16, non_linearity="tanh", ln_before=True))
    fuses = (adapters.Fuse("a", "b", "c"), adapters.Fuse("c", "a", name="pair"))
    model.add_adapter_fusion(fuses[0], config="dynamic")
    model.add_adapter_fusion(fuses[1], config=preset2)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if type(m).__name__ == "BottleneckLayer" and len(m.adapters) > 0:
            perturb_(m.adapters, g)
            perturb_(m.adapter_fusion_layer, g)
    return model.eval(), fuses


def _per_setup(model, fuses, x, x64=None, **kw):
    """AdapterHub run once per setup: ({name: float32 out}, {name: float64 out}, {name: probs})."""
    ref, truth, probs = {}, {}, {}
    m64 = copy.deepcopy(model).double()
    for f in fuses:
        model.active_adapters = f
        m64.active_adapters = f
        with torch.no_grad():
            out = model(**x, output_adapter_fusion_attentions=True, **kw)
            ref[f.name] = last_hidden(out)
            truth[f.name] = last_hidden(m64(**(x64 or x), **kw))
        probs[f.name] = out.adapter_fusion_attentions[f.name]
    return ref, truth, probs


@requires_adapterhub
@pytest.mark.adapterhub
@pytest.mark.parametrize("backend", ["torch", "cpu", "reference", "triton"])
def test_accelerated_adapterhub_model_with_two_fuse_setups_serves_a_mixed_batch(backend):
    """The issue's Must-show: rows of one routed forward equal AdapterHub run once per setup."""
    _backend_or_skip(backend)
    from adapters.composition import MultiTask

    model, fuses = _ah_model()
    x = tiny_inputs("bert", batch=3, seq=6)
    ref, truth, probs = _per_setup(model, fuses, x)
    model.active_adapters = MultiTask(*fuses)
    fa.accelerate(model, backend=backend)
    for route in ROUTES:
        ids = [r if isinstance(r, int) else FUSES.index(r) for r in route]
        with torch.no_grad():
            out = model(**x, task_ids=torch.tensor(ids), output_adapter_fusion_attentions=True)
            with fa.fusion_route(route):
                by_names = last_hidden(model(**x))
        y = last_hidden(out)
        assert torch.equal(y, by_names)
        _assert_rows(y, route, ref, truth, f"accelerate MultiTask ({backend})")
        for k, name in enumerate(FUSES):  # each setup's attentions hold its own rows
            idx = _rows(route, k)
            if not len(idx):
                assert name not in out.adapter_fusion_attentions
                continue
            for layer, locs in probs[name].items():
                for loc, p in locs.items():
                    got = torch.from_numpy(out.adapter_fusion_attentions[name][layer][loc])
                    torch.testing.assert_close(got, torch.from_numpy(p)[idx], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no route"):
        model(**x)
    with pytest.raises(ValueError, match="unknown fusion 'nope'; its Fuse setups are \\['a,b,c', 'pair'\\]"):
        with fa.fusion_route(["nope"] * 3):
            model(**x)
    # ids out of range and a route of another batch: AdapterHub passes task_ids through; the sites refuse
    with pytest.raises(ValueError, match="MultiTask\\(a,b,c, pair\\): route ids must be in \\[0, 2\\)"):
        model(**x, task_ids=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="route ids must be in \\[0, 2\\)"):
        model(**x, task_ids=torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="the route has 2 rows but the batch here has 3"):
        model(**x, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="the route has 2 rows but the batch here has 3"), fa.fusion_route(["pair"] * 2):
        model(**x)
    fa.unpatch(model)  # undone: AdapterHub's own compose_multi_task again (which cannot run Fuse children)
    with pytest.raises(ValueError, match="Cannot nest Fuse inside BatchSplit"):
        model(**x, task_ids=torch.tensor([0, 1, 0]))


@requires_adapterhub
@pytest.mark.adapterhub
@pytest.mark.parametrize("named", [False, True])
def test_accelerated_mixed_batch_with_adapter_mask(named):
    """A mask block reaches each setup's rows: every row equals its setup run alone under the same
    mask (the accelerated single-Fuse path, float64 reference backend as the truth)."""
    from adapters.composition import MultiTask

    model, fuses = _ah_model(seed=4)
    x = tiny_inputs("bert", batch=4, seq=6)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(4, 3, generator=g) > 0.4
    mask[:, 0] = True  # a keeps every row non-empty ("pool" columns a, b, c)
    cols = ["c", "b", "a"] if named else None
    m = mask[:, [2, 1, 0]] if named else mask
    route = [1, 0, 0, 1]
    ref, truth = {}, {}
    for f in fuses:
        for dtype, backend, store in ((F32, "reference", ref), (F64, "reference", truth)):
            single = copy.deepcopy(model).to(dtype)
            single.active_adapters = f
            fa.accelerate(single, backend=backend)
            with torch.no_grad(), fa.adapter_mask(mask, adapter_names=["a", "b", "c"]):
                store[f.name] = last_hidden(single(**x))
    model.active_adapters = MultiTask(*fuses)
    fa.accelerate(model, backend="torch")
    with torch.no_grad(), fa.adapter_mask(m, adapter_names=cols):
        y = last_hidden(model(**x, task_ids=torch.tensor(route)))
    _assert_rows(y, route, ref, truth, f"masked MultiTask (named={named})")
    with torch.no_grad():
        assert not torch.equal(y, last_hidden(model(**x, task_ids=torch.tensor(route))))  # the mask acted
    with pytest.raises(ValueError, match="pool is \\['a', 'b', 'c'\\]"), fa.adapter_mask(mask[:, :2]):
        model(**x, task_ids=torch.tensor(route))


@requires_adapterhub
@pytest.mark.adapterhub
def test_accelerated_mixed_batch_training_gradients():
    """Fusion training through a routed batch: the gradients equal the sum of AdapterHub's per-setup
    runs on their rows (float64 truth, §4 oracle); a setup without rows gets exact zero gradients."""
    from adapters.composition import MultiTask

    model, fuses = _ah_model(seed=5, preset2="dynamic")
    x = tiny_inputs("bert", batch=4, seq=6)
    route = [0, 1, 1, 0]
    w = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(3), dtype=F64)

    def fusion_grads(m, loss_of):
        m.train_adapter_fusion(MultiTask(*fuses))  # AdapterHub: fusion layers trainable, the rest frozen
        m.zero_grad(set_to_none=True)
        loss_of(m).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad and p.grad is not None}

    def per_setup(m):
        dtype = next(m.parameters()).dtype
        total = 0
        for k, f in enumerate(fuses):
            idx = _rows(route, k)
            m.active_adapters = f
            out = last_hidden(m(**{n: v[idx] for n, v in x.items()}))
            total = total + (out * w[idx].to(dtype)).sum()
        return total

    ref = fusion_grads(copy.deepcopy(model), per_setup)
    truth = fusion_grads(copy.deepcopy(model).double(), per_setup)
    model.active_adapters = MultiTask(*fuses)
    fa.accelerate(model, backend="torch")

    def routed(m):
        m.active_adapters = MultiTask(*fuses)
        return (last_hidden(m(**x, task_ids=torch.tensor(route))) * w.float()).sum()

    got = fusion_grads(model, routed)
    assert set(got) == set(truth) and any("adapter_fusion_layer.pair." in n for n in got)
    for n in truth:
        assert_oracle(got[n], ref[n], truth[n], F32, what=f"grad {n}")
    # a batch routed to one setup: the other setup's fusion parameters get exact zero gradients
    model.zero_grad(set_to_none=True)
    model.active_adapters = MultiTask(*fuses)
    last_hidden(model(**x, task_ids=torch.zeros(4, dtype=torch.long))).pow(2).sum().backward()
    for n, p in model.named_parameters():
        if ".adapter_fusion_layer.pair." in n:
            assert p.grad is not None and not p.grad.any(), n
        elif ".adapter_fusion_layer.a,b,c." in n and n.endswith("weight"):
            assert p.grad is not None and p.grad.any(), n


@requires_adapterhub
@pytest.mark.adapterhub
def test_files_move_both_ways_with_adapterhub(tmp_path):
    """AdapterHub saves two fusions -> load_adapterhub routes them; save_adapterhub -> AdapterHub
    loads both fusions and each matches the routed rows."""
    model, fuses = _ah_model(seed=6)
    model.save_all_adapters(str(tmp_path / "ah"))
    model.save_all_adapter_fusions(str(tmp_path / "ah"))
    x = tiny_inputs("bert", batch=3, seq=6)
    ref, truth, _ = _per_setup(model, fuses, x)
    plain = tiny_model("bert", dropout=False, seed=6)
    fa.load_adapterhub(plain, [str(tmp_path / "ah" / f) for f in FUSES], backend="torch")
    route = ["pair", "a,b,c", "pair"]
    with torch.no_grad(), fa.fusion_route(route):
        y = last_hidden(plain(**x))
    _assert_rows(y, route, ref, truth, "AdapterHub files -> load_adapterhub")

    import adapters

    fa.save_adapterhub(plain, str(tmp_path / "fa"))
    back = tiny_model("bert", dropout=False, seed=6)
    adapters.init(back)
    for n in "abc":
        back.load_adapter(str(tmp_path / "fa" / n))
    for f in FUSES:
        back.load_adapter_fusion(str(tmp_path / "fa" / f))
    back.eval()
    for k, f in enumerate(fuses):
        back.active_adapters = f
        with torch.no_grad():
            want = last_hidden(back(**x))
        idx = _rows(route, k)
        torch.testing.assert_close(y[idx], want[idx], rtol=0, atol=1e-6)


@requires_adapterhub
@pytest.mark.adapterhub
def test_adapterhub_multi_fixture_is_current():
    import tempfile

    import make_adapterhub_multi_fixture as fixture

    with tempfile.TemporaryDirectory() as tmp:
        fixture.build(tmp)
        problems = fixture.compare(tmp, fixture.FIXTURE) + fixture.compare(fixture.FIXTURE, tmp)
    assert problems == [], ("tests/fixtures/adapterhub_bert_multi is stale; regenerate it with "
                            "`.venv-ah/bin/python tests/fixtures/make_adapterhub_multi_fixture.py`: "
                            + "; ".join(problems))


@requires_adapterhub
@pytest.mark.adapterhub
def test_accelerated_setups_that_do_not_share_their_sites_raise():
    """A routed setup without an adapter at a site where another setup runs would pass its rows
    through that site: refused, naming the layer and the setups."""
    import adapters
    from adapters.composition import Fuse, MultiTask

    model = tiny_model("bert", dropout=False)
    adapters.init(model)
    for n in "ab":
        model.add_adapter(n, config=adapters.SeqBnConfig(reduction_factor=4))
    model.add_adapter("c", config=adapters.SeqBnConfig(reduction_factor=4, leave_out=[1]))
    fuses = (Fuse("a", "b"), Fuse("c", "a", name="late"), Fuse("b", "c", name="early"))
    for f in fuses:
        model.add_adapter_fusion(f)
    model.eval()
    model.active_adapters = MultiTask(fuses[0], fuses[2])
    fa.accelerate(model, backend="torch")
    with pytest.raises(ValueError, match="at layer 1 output_adapter the setups \\['early'\\] have no last adapter"):
        model(**tiny_inputs("bert"), task_ids=torch.tensor([0, 1]))
    model.active_adapters = MultiTask(fuses[0], fuses[1])  # 'late' ends with a: at every site
    with torch.no_grad():
        model(**tiny_inputs("bert"), task_ids=torch.tensor([0, 1]))


@requires_adapterhub
@pytest.mark.adapterhub
def test_adapter_drop_of_an_accelerated_multitask_model_refuses():
    """docs/multitask.md, Not done: fa.adapter_drop takes an accelerated model's one active Fuse; a
    MultiTask of Fuse setups is refused (skipping and pruning alike), the model unchanged."""
    from adapters.composition import MultiTask

    model, fuses = _ah_model(seed=7)
    model.active_adapters = MultiTask(*fuses)
    fa.accelerate(model, backend="torch")
    x = tiny_inputs("bert", batch=2, seq=5)
    with torch.no_grad():
        before = last_hidden(model(**x, task_ids=torch.tensor([1, 0])))
    for kwargs in ({"skip_layers": 1}, {"keep": 2}):
        with pytest.raises(ValueError, match="must be one Fuse of adapters"):
            fa.adapter_drop(model, [x], **kwargs)
    with torch.no_grad():
        assert torch.equal(last_hidden(model(**x, task_ids=torch.tensor([1, 0]))), before)


@requires_adapterhub
@pytest.mark.adapterhub
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_accelerated_multitask_threads_with_their_own_routes(backend):
    """Four threads on one accelerated MultiTask model, each with its own route (task_ids, or a
    fusion_route block, with and without an adapter_mask block): every call returns its own rows, bit
    for bit the single-threaded result."""

    from adapters.composition import MultiTask

    model, fuses = _ah_model(seed=8)
    model.active_adapters = MultiTask(*fuses)
    fa.accelerate(model, backend=backend)
    x = tiny_inputs("bert", batch=4, seq=6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    plans = [([0, 1, 1, 0], "task_ids", None), ([1, 1, 0, 0], "route", None), ([0, 0, 1, 1], "route", mask),
             (["pair", "a,b,c", "pair", "pair"], "task_ids", mask)]

    def call(route, how, m):
        with torch.no_grad(), fa.adapter_mask(m, adapter_names=["a", "b", "c"]):
            if how == "task_ids":
                ids = route if isinstance(route[0], int) else [FUSES.index(r) for r in route]
                return last_hidden(model(**x, task_ids=torch.tensor(ids)))
            with fa.fusion_route(route):
                return last_hidden(model(**x))

    want = [call(*p) for p in plans]
    assert len({tuple(w.flatten()[:8].tolist()) for w in want}) == len(plans)  # four different results
    got = run_together(len(plans), lambda t: [call(*plans[t]) for _ in range(10)])
    for t in range(len(plans)):
        assert len(got[t]) == 10 and all(torch.equal(o, want[t]) for o in got[t]), f"thread {t}"
