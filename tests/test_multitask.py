"""Multi-task serving (issue 16): several fusions over one shared adapter pool, routed per batch row.

Exactness: every row of a routed batch equals (docs/algorithm.md §4 oracle) that row run alone through its
own fusion, with truth the float64 reference of that fusion on the same rounded weights and
inputs, and the reference backend at the test dtype as the bound's yardstick; gradients (inputs
and every parameter) equal those of the separate per-fusion forwards, and parameters no routed
row reaches get exact zeros. Backends: torch, cpu (native extension), reference and triton (its
interpreter without a GPU), fp32, eval and training (logit dropout replayed through
``dropout_mask``), with and without adapter masks. Plus routing errors, threads, sharing.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fusedadapter as fa
from fusedadapter.multitask import MultiFusion, MultiHead, fusion_route
from fusedadapter.testing import assert_oracle, perturb_
from threads_helper import run_together
from tiny_models import one_thread  # noqa: F401 (autouse: one intra-op thread)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

H = 16
POOL = {
    "a": fa.AdapterConfig(bottleneck_size=3),
    "b": fa.AdapterConfig(bottleneck_size=5, non_linearity="gelu", ln_before=True),
    "c": fa.AdapterConfig(bottleneck_size=4, non_linearity="tanh", scaling="learned"),
    "d": fa.AdapterConfig(bottleneck_size=2, non_linearity="swish", scaling=0.7),
}
FUSIONS = {
    "sst": ("dynamic", ["a", "b", "c"]),
    "mnli": ("static", ["c", "a"]),
    "qqp": ({"residual_before": True}, ["d", "b", "a", "c"]),
}
ROUTE = ["mnli", "sst", "qqp", "sst", "mnli"]      # interleaved rows (gather / scatter path)
LEAD = (5, 3)


def make_multi(seed=0, fusions=FUSIONS):
    m = MultiFusion(H, POOL, fusions, backend="reference").double()
    perturb_(m, torch.Generator().manual_seed(seed))
    return m


def make_inputs(seed=1, lead=LEAD):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    res = torch.randn(*lead, H, generator=g, dtype=torch.float64)
    keep = torch.rand(*lead, len(POOL), generator=g) > 0.3
    return a, res, keep


def masks(lead=LEAD, seed=3):
    g = torch.Generator().manual_seed(seed)
    batch = torch.rand(lead[0], len(POOL), generator=g) > 0.4
    batch[1] = False          # an sst row with every adapter masked (the bare sub-layer)
    token = torch.rand(*lead, len(POOL), generator=g) > 0.4
    return {"none": None, "batch": batch, "token": token}


def _cpu_available():
    try:
        from fusedadapter import extension

        extension.load_native_op("cpu", "cpu")
        return True
    except Exception:
        return False


def _backend_or_skip(backend):
    if backend == "triton":
        fusion = pytest.importorskip("fusedadapter.kernels.fusion", reason="needs the `triton` package")
        if fusion.unsupported_reason("cpu") is not None:
            pytest.skip(fusion.unsupported_reason("cpu"))
    if backend == "cpu" and not _cpu_available():
        pytest.fail("the cpu extension must build here")


def _ids(route):
    names = list(FUSIONS)
    return [names.index(r) for r in route]


def _rows(route, name):
    return [i for i, r in enumerate(route) if r == name]


def _separate(multi, backend, dtype, inputs, route, train, adapter_mask, grads, w_out, w_p):
    """Each fusion on its own rows through its own FusedAdapterFusion (no routing code), one row at
    a time for the outputs; the per-fusion sub-batch forwards summed into one loss for gradients."""
    m = copy.deepcopy(multi).to(dtype)
    m.backend = backend
    m.train(train)
    pool = m.adapter_names
    a, res, keep = inputs[:3]
    q = inputs[3] if len(inputs) > 3 else None  # a separate query input (query_before_ln's)
    a, res = a.to(dtype).requires_grad_(grads), res.to(dtype).requires_grad_(grads)
    q = None if q is None else q.to(dtype).requires_grad_(grads)
    out = torch.zeros(a.shape, dtype=torch.float64)
    probs = torch.zeros(*a.shape[:-1], len(pool), dtype=torch.float64)
    loss = 0
    for name, site in m.adapter_fusion_layer.items():
        rows = _rows(route, name)
        if not rows:
            continue
        cols = [pool.index(n) for n in site.adapters]
        idx = torch.tensor(rows)
        sub_mask = None if adapter_mask is None else adapter_mask[idx][..., cols]
        o, p = site(a[idx], res[idx], None if q is None else q[idx], return_probs=True,
                    dropout_mask=keep[idx][..., cols] if train else None, adapter_mask=sub_mask)
        loss = loss + (o * w_out[idx].to(dtype)).sum() + (p * w_p[idx][..., cols].to(dtype)).sum()
        for j, i in enumerate(rows):  # the row alone
            oi, pi = site(a[i:i + 1], res[i:i + 1], None if q is None else q[i:i + 1], return_probs=True,
                          dropout_mask=keep[i:i + 1][..., cols] if train else None,
                          adapter_mask=None if sub_mask is None else sub_mask[j:j + 1])
            out[i] = oi[0].detach().double()
            probs[i][..., cols] = pi[0].detach().double()
    result = {"out": out, "probs": probs}
    if grads:
        _grads(result, loss, a, res, m, q)
    return result


def _routed(multi, backend, dtype, inputs, route, train, adapter_mask, grads, w_out, w_p):
    m = copy.deepcopy(multi).to(dtype)
    m.backend = backend
    m.train(train)
    a, res, keep = inputs[:3]
    q = inputs[3] if len(inputs) > 3 else None
    a, res = a.to(dtype).requires_grad_(grads), res.to(dtype).requires_grad_(grads)
    q = None if q is None else q.to(dtype).requires_grad_(grads)
    with torch.set_grad_enabled(grads):  # without grads: a serving call (the out-paths, the grouped triton op)
        out, probs = m(a, res, q, route=route, return_probs=True, dropout_mask=keep if train else None,
                       adapter_mask=adapter_mask)
    result = {"out": out.detach().double(), "probs": probs.detach().double()}
    if grads:
        _grads(result, (out * w_out.to(dtype)).sum() + (probs * w_p.to(dtype)).sum(), a, res, m, q)
    return result


def _grads(result, loss, a, res, m, q=None):
    names = [n for n, _ in m.named_parameters()]
    leaves, leaf_names = [a, res] + ([] if q is None else [q]), ["d_adapter_input", "d_residual", "d_query"]
    got = torch.autograd.grad(loss, leaves + list(m.parameters()), allow_unused=True)
    for name, t in zip(leaf_names[:len(leaves)] + [f"d_{n}" for n in names], got):
        result[name] = None if t is None else t.detach().double()


def check_routed(backend, *, train, mask="none", route=ROUTE, grads=True, dtype=torch.float32, seed=0, query=False):
    multi = make_multi(seed)
    inputs = make_inputs(seed + 1)
    # truth on the values the dtype run sees (docs/algorithm.md §4: weights and inputs rounded to dtype)
    rounded = copy.deepcopy(multi).to(dtype).double()
    inputs = (inputs[0].to(dtype).double(), inputs[1].to(dtype).double(), inputs[2])
    if query:  # a separate query input, gathered per fusion as the other inputs
        q = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(seed + 11), dtype=torch.float64)
        inputs = inputs + (q.to(dtype).double(),)
    adapter_mask = masks()[mask]
    g = torch.Generator().manual_seed(7)
    w_out = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64)
    w_p = torch.randn(*inputs[0].shape[:-1], len(POOL), generator=g, dtype=torch.float64)
    args = (inputs, route, train, adapter_mask, grads, w_out, w_p)
    truth = _separate(rounded, "reference", torch.float64, *args)
    ref = _separate(multi, "reference", dtype, *args)
    got = _routed(multi, backend, dtype, *args)
    assert set(got) == set(truth)
    used = {n for r in route for n in FUSIONS[r][1]}
    scale = max(t.abs().max().item() for t in truth.values() if t is not None and t.numel())
    for key in truth:
        if key.startswith("d_adapters."):
            # adapters are frozen in AdapterFusion stage 2; their fp32 gradients are not within the
            # oracle on every site even for one fusion (tests/parity.py): checked at float64 only
            name = key.split(".")[1]
            if name not in used:
                assert got[key] is not None and not got[key].any(), f"{key}: adapter no row uses must get exact 0"
            continue
        fusion = key.split(".")[1] if key.startswith("d_adapter_fusion_layer.") else None
        if fusion is not None and fusion not in route:
            assert truth[key] is None
            assert got[key] is not None and not got[key].any(), f"{key}: a fusion without rows must get exact zeros"
            continue
        exact_zero = got[key] is not None and key.endswith("key.bias") and not got[key].any()
        if got[key] is None or truth[key] is None or exact_zero:
            other = truth[key] if (got[key] is None or exact_zero) else got[key]
            if other is not None and other.numel():
                assert other.abs().max().item() <= 1e-9 * scale, f"{key}: unused by one side but not ~0"
            continue
        assert_oracle(got[key], ref[key], truth[key], dtype, what=f"{backend} {key}")
    return got


@pytest.fixture
def ran(monkeypatch):
    """What the routed run really executed: the backends the runner resolved (forward), and for
    ``triton`` which of its op's functions ran (``fusion_triton`` forward, ``fusion_triton_backward``),
    so a silent fallback to another backend would fail the test."""
    import sys

    import fusedadapter.runner as runner

    seen = {"resolved": [], "triton": []}
    resolve = runner.resolve_backend

    def spy_resolve(*args, **kwargs):
        out = resolve(*args, **kwargs)
        seen["resolved"].append(out[0])
        return out

    monkeypatch.setattr(runner, "resolve_backend", spy_resolve)
    try:
        from fusedadapter.kernels import fusion
    except ImportError:
        return seen
    check = fusion._check_device

    def spy_check(*args, **kwargs):
        seen["triton"].append(sys._getframe(1).f_code.co_name)
        return check(*args, **kwargs)

    monkeypatch.setattr(fusion, "_check_device", spy_check)
    return seen


def _assert_ran(ran, backend, route, grads=True):
    assert backend in ran["resolved"], f"the routed run resolved {set(ran['resolved'])}, not {backend}"
    if backend == "triton":
        # under autograd, fusions with rows: one op call each (forward and backward) when alone, else
        # one grouped op call for all (multitask_rows.train_groups_triton)
        groups = len(set(route))
        one = groups if groups == 1 else 0
        assert ran["triton"].count("fusion_triton") == one, ran["triton"]
        assert ran["triton"].count("fusion_triton_backward") == (one if grads else 0), ran["triton"]
        assert ran["triton"].count("fusion_triton_grouped") == (groups > 1), ran["triton"]
        assert ran["triton"].count("fusion_triton_grouped_backward") == (groups > 1 and grads), ran["triton"]


@pytest.mark.parametrize("backend", ["torch", "cpu", "reference", "triton"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_routed_rows_equal_their_fusion_alone(backend, train, ran):
    _backend_or_skip(backend)
    check_routed(backend, train=train)
    _assert_ran(ran, backend, ROUTE)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mask", ["batch", "token"])
def test_routed_with_masks(backend, mask, train, ran):
    _backend_or_skip(backend)
    check_routed(backend, train=train, mask=mask)
    _assert_ran(ran, backend, ROUTE)


@pytest.mark.parametrize("route", [ROUTE, ["sst", "sst", "mnli", "qqp", "qqp"], ["mnli", "sst", "sst", "mnli", "mnli"]],
                         ids=["interleaved", "sorted", "two-fusions"])
@pytest.mark.parametrize("query", [False, True], ids=["shared", "query"])
@pytest.mark.parametrize("mask", ["none", "batch", "token"])
def test_triton_serving_runs_the_groups_in_one_grouped_call(route, query, mask, ran, monkeypatch):
    """Serving (no grad) on triton: the fusions whose calls fit (sst, mnli; qqp's residual_before
    does not) run in one ``fusion_triton_grouped`` call, each row within the oracle of its fusion
    alone (masks too: a row with every adapter masked is the bare sub-layer), and bitwise what the
    per-group path gives (the same tiles)."""
    _backend_or_skip("triton")
    from fusedadapter import multitask_rows

    got = check_routed("triton", train=False, grads=False, route=route, query=query, mask=mask)
    assert ran["triton"].count("fusion_triton_grouped") == 1, ran["triton"]
    assert ran["triton"].count("fusion_triton") == ("qqp" in route), ran["triton"]
    monkeypatch.setattr(multitask_rows, "run_groups_triton", lambda *a, **k: None)
    ran["triton"].clear()
    per_group = check_routed("triton", train=False, grads=False, route=route, query=query, mask=mask)
    assert "fusion_triton_grouped" not in ran["triton"]
    for key in ("out", "probs"):
        assert torch.equal(got[key], per_group[key]), key


def test_triton_serving_with_empty_sequences():
    # (batch, 0, H): no tokens, an empty output as on every other path (the grouped op is not launched)
    _backend_or_skip("triton")
    m = make_multi(0).float()
    m.backend = "triton"
    m.eval()
    with torch.no_grad():
        out, probs = m(torch.randn(5, 0, H), torch.randn(5, 0, H), route=ROUTE, return_probs=True)
    assert out.shape == (5, 0, H) and probs.shape == (5, 0, len(POOL))


def test_triton_grouped_pack_follows_the_folds():
    """The packed weights are the folds last packed: a weight edit refolds, and the next serving call
    packs again (no stale rows)."""
    _backend_or_skip("triton")
    m = make_multi(0).float()
    m.backend = "triton"
    m.eval()
    a, res, _ = make_inputs(1)
    a, res = a.float(), res.float()
    route = ["sst", "mnli", "sst", "mnli", "mnli"]
    with torch.no_grad():
        m(a, res, route=route)
        first = m._grouped_pack
        again = m(a, res, route=route)
        assert m._grouped_pack is first
        m.adapter_fusion_layer["mnli"].query.weight.mul_(1.5)
        edited = m(a, res, route=route)
    assert m._grouped_pack is not first
    ref = copy.deepcopy(m)
    ref.backend = "reference"
    with torch.no_grad():
        want = ref.double()(a.double(), res.double(), route=route)
    rows = [i for i, r in enumerate(route) if r == "mnli"]
    assert not torch.equal(edited[rows], again[rows])
    torch.testing.assert_close(edited.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mask", ["none", "token"])
def test_routed_with_a_separate_query(backend, train, mask, ran):
    """A separate query input (what a query_before_ln site gets): each fusion's rows of it are
    gathered with the others, and its gradient (d_query) equals the separate forwards'."""
    _backend_or_skip(backend)
    got = check_routed(backend, train=train, mask=mask, query=True)
    assert got["d_query"] is not None and got["d_query"].any()
    _assert_ran(ran, backend, ROUTE)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mask", ["none", "batch"])
def test_fusion_without_rows_gets_zero_grads(backend, train, mask, ran):
    # only sst has rows: mnli and qqp get exact zero grads, and so does adapter "d" (fused by qqp only)
    _backend_or_skip(backend)
    check_routed(backend, train=train, mask=mask, route=["sst"] * 5)
    _assert_ran(ran, backend, ["sst"])
    # mnli has no rows (interleaved sst / qqp rows: the gather / scatter path)
    check_routed(backend, train=train, mask=mask, route=["sst", "qqp", "qqp", "sst", "sst"])


def test_float64_adapter_grads_and_contiguous_rows():
    """float64 (every gradient, the shared adapters' too: each adapter's gradient sums over the
    fusions that fuse it) with sorted rows (the slice path, no gather); the yardstick of the bound
    is the K separate forwards on the same backend."""
    multi = make_multi(4)
    for p in multi.adapters.parameters():
        assert p.requires_grad
    route = ["sst", "sst", "mnli", "qqp", "qqp"]
    inputs = make_inputs(5)
    g = torch.Generator().manual_seed(7)
    w_out = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64)
    w_p = torch.randn(*inputs[0].shape[:-1], len(POOL), generator=g, dtype=torch.float64)
    args = (inputs, route, True, masks()["batch"], True, w_out, w_p)
    truth = _separate(multi, "reference", torch.float64, *args)
    separate = _separate(multi, "torch", torch.float64, *args)   # the K separate forwards, same backend
    got = _routed(multi, "torch", torch.float64, *args)
    for key in truth:
        if truth[key] is None:
            assert got[key] is None or not got[key].any(), key
            continue
        assert_oracle(got[key], separate[key], truth[key], torch.float64, what=key)


def test_parameters_held_once_with_adapterhub_names():
    m = make_multi()
    names = [n for n, _ in m.named_parameters()]
    assert len(names) == len(set(names)) == len(list(m.parameters()))
    # the state dict: each parameter once (b's LayerNorm under its two AdapterHub names, as one adapter
    # has it), nothing under the fusions' aliases of the shared adapters; it loads back (strict)
    sd = m.state_dict()
    assert not [k for k in sd if ".adapters." in k]
    assert list(sd) == [n for n, _ in m.named_parameters(remove_duplicate=False) if ".adapters." not in n]
    assert set(names) <= set(sd) and len(sd) == len(names) + 2  # + adapter_down.0 (b's LN alias)
    other = make_multi(seed=9)
    other.load_state_dict(sd)
    for n, p in other.named_parameters():
        assert torch.equal(p, dict(m.named_parameters())[n]), n
    assert other.adapter_fusion_layer["sst"].adapters["b"].adapter_up.weight is other.adapters["b"].adapter_up.weight
    assert "adapters.b.adapter_down.1.weight" in names and "adapters.c.scaling" in names
    assert "adapter_fusion_layer.sst.query.weight" in names and "adapter_fusion_layer.sst.value.weight" in names
    assert "adapter_fusion_layer.mnli.value.weight" not in names  # static: no value matrix
    for site in m.adapter_fusion_layer.values():
        for n, adapter in site.adapters.items():
            assert adapter is m.adapters[n]
    assert m.adapter_fusion_layer["mnli"].adapter_names == ["c", "a"]
    # a copy keeps the sharing; an edit of a pool adapter reaches every fusion (fold caches too)
    c = copy.deepcopy(m)
    assert c.adapter_fusion_layer["sst"].adapters["a"] is c.adapters["a"]
    a, res, _ = make_inputs()
    c.eval()
    before = c(a, res, route="mnli").clone()
    with torch.no_grad():
        c.adapters["a"].adapter_up.weight.mul_(1.5)
    assert not torch.equal(c(a, res, route="mnli"), before)
    # default fusion names: the adapters joined with ',' (AdapterHub's Fuse name)
    d = MultiFusion(H, POOL, [["a", "b"], ("static", ["c", "a", "d"])])
    assert d.fusion_names == ["a,b", "c,a,d"]
    assert "adapter_fusion_layer.c,a,d.query.weight" in dict(d.named_parameters())


def test_route_forms_and_errors():
    m = make_multi()
    m.eval()
    a, res, _ = make_inputs()
    by_names = m(a, res, route=ROUTE)
    assert torch.equal(m(a, res, route=_ids(ROUTE)), by_names)
    assert torch.equal(m(a, res, route=torch.tensor(_ids(ROUTE))), by_names)
    with fusion_route(ROUTE):
        assert torch.equal(m(a, res), by_names)
        with fusion_route("sst"):  # nested: innermost wins; a name routes every row
            assert torch.equal(m(a, res), m.adapter_fusion_layer["sst"](a, res))
        with fusion_route(None):
            with pytest.raises(ValueError, match="no route"):
                m(a, res)
        assert torch.equal(m(a, res, route="qqp"), m.adapter_fusion_layer["qqp"](a, res))  # argument wins
    with pytest.raises(ValueError, match="no route"):
        m(a, res)
    with pytest.raises(ValueError, match="unknown fusion 'cola'.*'sst', 'mnli', 'qqp'"):
        m(a, res, route=["sst", "cola", "sst", "sst", "sst"])
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        m(a, res, route=[0, 1, 3, 0, 0])
    with pytest.raises(ValueError, match="3 rows but the batch here has 5"):
        m(a, res, route=["sst", "sst", "mnli"])
    with pytest.raises(ValueError, match="1-D"):
        m(a, res, route=torch.zeros(5, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        with fusion_route(torch.zeros(5)):
            pass
    with pytest.raises(TypeError, match="names or int ids"):
        m(a, res, route=["sst", 1, 0, 0, 0])
    with pytest.raises(ValueError, match="pool's 4 columns"):
        m(a, res, route=ROUTE, adapter_mask=torch.ones(5, 3, dtype=torch.bool))
    # a route of batch B follows generate()'s expansion to B*k rows
    a2, res2 = a.repeat_interleave(2, 0), res.repeat_interleave(2, 0)
    torch.testing.assert_close(m(a2, res2, route=ROUTE)[::2], m(a, res, route=ROUTE), rtol=1e-12, atol=1e-12)
    # one fusion: no route needed
    single = MultiFusion(H, POOL, {"only": ("dynamic", ["b", "a"])})
    single(a.float(), res.float())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_mask_blocks_compose(backend, ran):
    """fa.adapter_mask blocks: named columns (any order, a wider pool) are picked per fusion by
    name; unnamed ones have the pool's columns. Both equal the explicit pool-column mask (on triton
    in serving calls: the grouped op takes every form of mask)."""
    _backend_or_skip(backend)
    m = make_multi()
    m.backend = backend
    m.eval()
    a, res, _ = make_inputs()
    if backend == "triton":
        m = m.float()
        a, res = a.float(), res.float()
    mask = masks()["batch"]
    with torch.set_grad_enabled(backend != "triton"):
        want = m(a, res, route=ROUTE, adapter_mask=mask)
        assert not torch.equal(want, m(a, res, route=ROUTE))
        with fa.adapter_mask(mask):
            assert torch.equal(m(a, res, route=ROUTE), want)
        order = ["d", "x", "b", "a", "c"]
        pool = m.adapter_names
        named = torch.stack([mask[:, pool.index(n)] if n in pool else torch.ones(5, dtype=torch.bool) for n in order],
                            -1)
        with fa.adapter_mask(named, adapter_names=order):
            assert torch.equal(m(a, res, route=ROUTE), want)
    if backend == "triton":
        assert ran["triton"].count("fusion_triton_grouped") == 4, ran["triton"]


@pytest.mark.parametrize("backend", ["torch", "cpu"])  # (the Triton interpreter is not thread-safe)
@pytest.mark.parametrize("grad", ["autograd", "inference_mode"])
def test_threads_with_different_routes_and_masks(backend, grad):
    """Four threads on one model, each with its own fusion_route and adapter_mask blocks (and the cpu
    serving path under inference_mode): every call returns its own route's rows, bit for bit the
    single-threaded result."""
    _backend_or_skip(backend)
    m = make_multi().float()
    m.backend = backend
    m.eval()
    a, res, _ = make_inputs()
    a, res = a.float(), res.float()
    sorted_route = ["sst", "sst", "mnli", "qqp", "qqp"]   # grouped rows: the in-place serving path on cpu
    routes = [ROUTE, ["qqp", "qqp", "sst", "mnli", "mnli"], sorted_route, sorted_route]
    mask = masks()["batch"]
    thread_masks = [None, None, None, mask]
    ctx = torch.inference_mode if grad == "inference_mode" else torch.enable_grad
    with ctx():
        want = [m(a, res, route=r, adapter_mask=k) for r, k in zip(routes, thread_masks)]
    assert not torch.equal(want[2], want[3])  # the mask acts
    def body(t):
        with ctx(), fusion_route(routes[t]), fa.adapter_mask(thread_masks[t]):
            return [m(a, res) for _ in range(20)]

    got = run_together(len(routes), body)
    for t in range(len(routes)):
        assert len(got[t]) == 20 and all(torch.equal(o, want[t]) for o in got[t]), f"thread {t}"
    assert fa.multitask.current_fusion_route() is None  # the threads' blocks did not leak here


def test_multi_head():
    heads = MultiHead({"sst": torch.nn.Linear(H, 2), "mnli": torch.nn.Linear(H, 3), "qqp": torch.nn.Linear(H, 2)})
    x = torch.randn(5, H)
    rows = heads(x, route=ROUTE)
    assert isinstance(rows, list) and [r.shape[-1] for r in rows] == [3, 2, 2, 2, 3]
    for i, r in enumerate(ROUTE):
        assert torch.allclose(rows[i], heads.heads[r](x[i]), atol=1e-6)
    same = MultiHead({"sst": torch.nn.Linear(H, 2), "qqp": torch.nn.Linear(H, 2)})
    with fusion_route([1, 0, 1]):
        y = same(x[:3])
    assert y.shape == (3, 2) and torch.allclose(y[0], same.heads["qqp"](x[0]), atol=1e-6)
    assert torch.equal(same(x[:3], route=torch.tensor([1, 0, 1])), y)
    assert torch.equal(same(x[:3], route="qqp"), same.heads["qqp"](x[:3]))
    # bad routes raise as the sites do, naming what was expected
    with pytest.raises(ValueError, match="no route.*heads are \\['sst', 'mnli', 'qqp'\\]"):
        heads(x)
    with pytest.raises(ValueError, match="MultiHead: unknown fusion 'cola'; the heads are \\['sst', 'mnli', 'qqp'\\]"):
        heads(x, route=["sst", "cola", "sst", "sst", "sst"])
    with pytest.raises(ValueError, match="MultiHead: route ids must be in \\[0, 3\\)"):
        heads(x, route=[0, 1, 3, 0, 0])
    with pytest.raises(ValueError, match="MultiHead: route ids must be in \\[0, 3\\)"):
        heads(x, route=torch.tensor([0, 1, -1, 0, 0]))
    with pytest.raises(ValueError, match="MultiHead: the route has 3 rows but the batch here has 5"):
        heads(x, route=["sst", "sst", "mnli"])
    with pytest.raises(ValueError, match="MultiHead: the route has 2 rows but the batch here has 4"):
        heads(x[:4], route=["sst", "mnli"])  # no generate() expansion at the heads: one task per row
    with pytest.raises(TypeError, match="names or int ids"):
        heads(x, route=["sst", 1, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# fa.patch(model, adapters, fusions=...): a mixed batch through a patched model
# ---------------------------------------------------------------------------------------------
PATCH_POOL = {
    "a": fa.AdapterConfig(bottleneck_size=6),
    "b": fa.AdapterConfig(bottleneck_size=3, non_linearity="gelu", ln_before=True),
    "c": fa.AdapterConfig(bottleneck_size=4, non_linearity="tanh", scaling="learned"),
}
PATCH_FUSIONS = {"sst": ("dynamic", ["a", "b"]), "mnli": ("static", ["b", "c", "a"])}


def assert_fp32_grads_oracle(got, ref, truth, keys, what):
    """§4 oracle on the fp32 gradients ``keys`` (dicts of float64 copies); a key bias whose gradient is
    exactly zero passes where the truth is rounding noise (it cancels in the softmax: its exact gradient is 0)."""
    scale = max(t.abs().max().item() for t in truth.values())
    for k in keys:
        if k.endswith("key.bias") and not got[k].any():
            assert truth[k].abs().max().item() <= 1e-9 * scale, k
            continue
        assert_oracle(got[k], ref[k], truth[k], torch.float32, what=f"{what} {k}")


def _single_fusion_copy(bare, multi, name, placement):
    """``bare`` patched with fusion ``name`` alone, its weights those of ``multi``'s fusion ``name``."""
    from fusedadapter.patching import fusion_sites

    cfg, names = PATCH_FUSIONS[name]
    single = fa.patch(copy.deepcopy(bare), {n: PATCH_POOL[n] for n in names}, fusion=cfg, placement=placement,
                      backend="torch")
    for (_, _, s1), (_, _, sm) in zip(fusion_sites(single), fusion_sites(multi)):
        f = sm.adapter_fusion_layer[name]
        s1.load_state_dict({**{f"adapters.{k}": v for k, v in f.adapters.state_dict().items()}, **f.state_dict()})
    return single


@pytest.mark.parametrize("arch,placement", [("bert", "seq_bn"), ("llama", "double_seq_bn")])
def test_patched_mixed_batch_rows_equal_per_fusion_patched_runs(arch, placement):
    from fusedadapter.patching import fusion_sites
    from tiny_models import last_hidden, tiny_inputs, tiny_model

    bare = tiny_model(arch).double()
    multi = fa.patch(copy.deepcopy(bare), PATCH_POOL, fusions=PATCH_FUSIONS, placement=placement, backend="torch")
    g = torch.Generator().manual_seed(3)
    for _, _, site in fusion_sites(multi):
        assert isinstance(site, MultiFusion) and site.fusion_names == ["sst", "mnli"]
        perturb_(site, g)
    inputs = tiny_inputs(arch, batch=4, seq=6)
    route = ["mnli", "sst", "sst", "mnli"]
    with fa.fusion_route(route):
        out = last_hidden(multi(**inputs))
    assert not torch.equal(out, last_hidden(bare(**inputs)))
    from fusedadapter.patching import collect_fusion_probs

    with fa.fusion_route(route), collect_fusion_probs(multi) as store:
        multi(**inputs)
    probs = store[",".join(PATCH_POOL)][1]["output_adapter"]  # the pool's columns a, b, c
    assert probs.shape == (4, 6, 3) and not probs[1:3, :, 2].any() and probs[0, :, 2].all()
    for name in PATCH_FUSIONS:
        single = _single_fusion_copy(bare, multi, name, placement)
        idx = torch.tensor(_rows(route, name))
        want = last_hidden(single(**{k: v[idx] for k, v in inputs.items()}))
        torch.testing.assert_close(out[idx], want, rtol=0, atol=1e-12 * want.abs().max().item())
    # training: a batch routed to sst alone gives mnli's fusion weights (and adapter c) exact zero grads
    multi.train()
    with fa.fusion_route("sst"):
        last_hidden(multi(**inputs)).pow(2).sum().backward()
    for pname, p in multi.named_parameters():
        if ".fusedadapter_" not in pname:
            continue
        if ".adapter_fusion_layer.mnli." in pname or ".adapters.c." in pname:
            assert p.grad is not None and not p.grad.any(), pname
        elif "key.bias" not in pname:
            assert p.grad is not None and p.grad.any(), pname
    with pytest.raises(ValueError, match="no route"):
        multi(**inputs)


def test_patched_multi_head_recipe():
    """docs/multitask.md's recipe: one routed forward of a mixed batch, each row to its task's head."""
    from tiny_models import tiny_inputs, tiny_model

    model = fa.patch(tiny_model("bert"), PATCH_POOL, fusions=PATCH_FUSIONS, backend="torch")
    heads = MultiHead({"sst": torch.nn.Linear(32, 2), "mnli": torch.nn.Linear(32, 3)})
    inputs = tiny_inputs("bert", batch=3, seq=5)
    route = ["sst", "mnli", "sst"]
    with fa.fusion_route(route), torch.no_grad():
        logits = heads(model(**inputs).last_hidden_state[:, 0])
    assert [t.shape[-1] for t in logits] == [2, 3, 2]
    with torch.no_grad(), fa.fusion_route(["mnli"]):
        alone = heads.heads["mnli"](model(**{k: v[1:2] for k, v in inputs.items()}).last_hidden_state[:, 0])
    torch.testing.assert_close(logits[1], alone[0], rtol=1e-5, atol=1e-6)


def test_patched_adapter_drop_skip_layers_and_pruning():
    """AdapterDrop's layer skipping composes (skipped blocks are the bare model's); its pruning removes
    the pruned adapters from every fusion too, so a routed call still runs (row-level parity after
    pruning: tests/test_adapterdrop_multitask.py)."""
    from tiny_models import tiny_inputs, tiny_model

    bare = tiny_model("bert")
    model = fa.patch(copy.deepcopy(bare), PATCH_POOL, fusions=PATCH_FUSIONS, backend="torch")
    inputs = tiny_inputs("bert", batch=2)
    with fa.fusion_route(["sst", "mnli"]), torch.no_grad():
        routed = model(**inputs).last_hidden_state
        report = fa.adapter_drop(model, [inputs], skip_layers=2)
        assert report.skipped_layers == [0, 1]
        assert torch.equal(model(**inputs).last_hidden_state, bare(**inputs).last_hidden_state)
        fa.adapter_drop(model, [inputs], skip_layers=0)
        assert torch.equal(model(**inputs).last_hidden_state, routed)
        fa.adapter_drop(model, [inputs], keep=2)
        out = model(**inputs).last_hidden_state
        assert out.shape == routed.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_patched_adapter_drop_training_rows_and_grads(backend, ran):
    """AdapterDrop's layer skipping and routing in training, on every fast backend: a mixed batch
    through a tiny BERT whose block 0 is skipped; each row's output and the fusion gradients equal
    the per-fusion patched runs (skipped the same way) on their rows, summed (docs/algorithm.md §4
    oracle: fp32 backend vs the fp32 reference, truth float64); the skipped block is frozen."""
    from fusedadapter.patching import fusion_sites, set_backend
    from tiny_models import last_hidden, tiny_inputs, tiny_model

    _backend_or_skip(backend)
    bare = tiny_model("bert", dropout=False).double()
    multi = fa.patch(copy.deepcopy(bare), PATCH_POOL, fusions=PATCH_FUSIONS, backend="reference")
    g = torch.Generator().manual_seed(5)
    for _, _, site in fusion_sites(multi):
        perturb_(site, g)
    inputs = tiny_inputs("bert", batch=4, seq=6)
    route = ["mnli", "sst", "sst", "mnli"]
    w = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    rounded = copy.deepcopy(multi).float().double()  # §4: truth on the fp32-rounded weights

    def grads_of(model, loss, rename):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {rename(n): p.grad.double() for n, p in model.named_parameters()
                if "adapter" in n and p.grad is not None}

    def per_fusion(source, dtype):
        out, grads = torch.zeros(4, 6, 32, dtype=torch.float64), {}
        for name in PATCH_FUSIONS:
            single = _single_fusion_copy(bare, source, name, "seq_bn").to(dtype)
            set_backend(single, "reference")
            fa.adapter_drop(single, skip_layers=1)
            single.train()
            idx = torch.tensor(_rows(route, name))
            y = last_hidden(single(**{k: v[idx] for k, v in inputs.items()}))
            out[idx] = y.detach().double()
            rename = (lambda n, name=name: n.replace("fusedadapter_output.", f"fusedadapter_output.adapter_fusion_layer.{name}.")
                      if ".adapters." not in n else n)
            for k, v in grads_of(single, (y * w[idx].to(dtype)).sum(), rename).items():
                grads[k] = grads[k] + v if k in grads else v
        return out, grads

    truth_out, truth = per_fusion(rounded, torch.float64)
    ref_out, ref = per_fusion(multi, torch.float32)
    model = copy.deepcopy(multi).float()
    set_backend(model, backend)
    assert fa.adapter_drop(model, skip_layers=1).skipped_layers == [0]
    model.train()
    with fa.fusion_route(route):
        out = last_hidden(model(**inputs))
    got = grads_of(model, (out * w.float()).sum(), lambda n: n)
    assert_oracle(out.detach().double(), ref_out, truth_out, torch.float32, what=f"{backend} rows")
    for n, p in model.named_parameters():  # block 0 is skipped: frozen; block 1 trains
        if ".fusedadapter_" in n:
            assert p.requires_grad == (".layer.1." in n), n
    fusion_keys = [k for k in truth if ".adapter_fusion_layer." in k]
    assert fusion_keys and all(".layer.1." in k for k in fusion_keys)
    assert set(got) == set(truth) | {k for k in got if k.endswith("key.bias")}
    assert_fp32_grads_oracle(got, ref, truth, fusion_keys, backend)
    if backend != "reference":
        assert backend in ran["resolved"]


def test_bench_multitask_cli_smoke(tmp_path):
    """`python -m benchmarks multitask` at a tiny shape: runs, checks its rows, writes its JSON."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.cli import main

    out = tmp_path / "mt.json"
    assert main(["multitask", "--k", "2", "--batch", "4", "--seq", "4", "--hidden", "32", "--repeats", "1",
                 "--warmup", "1", "--threads", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"]["K=2"]
    assert res["max_rel_err_vs_separate"] == 0.0
    assert {"separate", "routed", "routed-interleaved"} <= set(res)


def test_bench_multitask_times_the_grouped_op_against_per_group_on_triton(tmp_path, ran):
    """On triton the bench adds ``routed-per-group`` (the grouped op off) beside ``routed`` (on): both
    checked against the separate forwards, and each really takes its path."""
    import json
    import sys
    from pathlib import Path

    _backend_or_skip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.cli import main

    out = tmp_path / "mt.json"
    assert main(["multitask", "--k", "2", "--batch", "4", "--seq", "2", "--hidden", "32", "--repeats", "1",
                 "--warmup", "0", "--backend", "triton", "--rows", "contiguous", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    res = data["results"]["K=2"]
    assert {"separate", "routed", "routed-per-group"} <= set(res) and data["meta"]["resolved"] == "triton"
    assert res["max_rel_err_vs_separate"] == 0.0
    assert ran["triton"].count("fusion_triton_grouped") >= 2 and ran["triton"].count("fusion_triton") >= 4
    from fusedadapter import multitask_rows

    assert multitask_rows.GROUPED_TRITON  # switched back on after the per-group calls


@pytest.mark.parametrize("form", ["folded", "per_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_training_grouped_equals_per_group(dtype, form, ran, monkeypatch):
    """Training on triton (train mode: the fusions' hash-drawn logit dropout with the key-bias shift,
    a stepped temperature, residual_before, LayerNorm'd adapters, a separate query; the folded and
    the per-token training forms): the grouped op
    (one call for all fusions, forward and backward) draws what each fusion draws alone from the same
    torch seed, so the outputs are the per-group path's bit for bit (the interpreter runs the same
    tiles) and every gradient matches it to rounding; the temperatures step alike."""
    from fusedadapter import fold, multitask_rows

    _backend_or_skip("triton")
    monkeypatch.setattr(fold, "TRAIN_FORM", form)  # the training fold's two forms (fold.training_fold_form)
    fusions = dict(FUSIONS, sst=({"temperature": True}, ["a", "b", "c"]))
    a, res, _ = make_inputs(5)
    q = torch.randn(a.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    route = ["mnli", "sst", "qqp", "sst", "mnli"]
    runs = {}
    for grouped in (True, False):
        monkeypatch.setattr(multitask_rows, "GROUPED_TRITON", grouped)
        m = make_multi(3, fusions).to(dtype)
        m.backend = "triton"
        m.train(True)
        leaves = [t.to(dtype).requires_grad_(True) for t in (a, res, q)]
        torch.manual_seed(123)
        ran["triton"].clear()
        outs = [m(*leaves, route=route, return_probs=True) for _ in range(2)]  # two steps: T steps twice
        loss = sum((o * (i + 1)).sum() + (p ** 2).sum() for i, (o, p) in enumerate(outs))
        grads = torch.autograd.grad(loss, leaves + list(m.parameters()), allow_unused=True)
        runs[grouped] = (outs, grads, [n for n, _ in m.named_parameters()], list(ran["triton"]),
                         m.adapter_fusion_layer["sst"].T)
    (go, gg, names, calls, t_grouped), (po, pg, _, pcalls, t_per) = runs[True], runs[False]
    assert calls.count("fusion_triton_grouped") == 2 and calls.count("fusion_triton_grouped_backward") == 2, calls
    assert "fusion_triton" not in calls and pcalls.count("fusion_triton") == 6, (calls, pcalls)
    assert t_grouped == t_per != 1.0
    for (o1, p1), (o2, p2) in zip(go, po):
        assert torch.equal(o1, o2) and torch.equal(p1, p2)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    for name, x, y in zip(["d_input", "d_residual", "d_query"] + names, gg, pg):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, **tol, msg=name)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_bench_multitask_train_steps(tmp_path, backend, ran):
    """`python -m benchmarks multitask --train`: training steps (forward + backward) of the routed
    site vs the separate ones; on triton the routed step is the grouped op, forward and backward."""
    import json
    import sys
    from pathlib import Path

    if backend == "triton":
        _backend_or_skip("triton")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.cli import main

    out = tmp_path / "mt.json"
    assert main(["multitask", "--train", "--k", "2", "--batch", "4", "--seq", "2", "--hidden", "32", "--repeats", "1",
                 "--warmup", "0", "--backend", backend, "--rows", "contiguous", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    res = data["results"]["K=2"]
    assert data["meta"]["mode"] == "train" and res["max_rel_err_vs_separate"] == 0.0
    assert {"separate", "routed"} <= set(res)
    if backend == "triton":
        assert "routed-per-group" in res
        assert ran["triton"].count("fusion_triton_grouped_backward") >= 2, ran["triton"]


def _deferred_calls(m, a, res, route):
    """The op calls a routed triton training forward defers, one per fusion with rows (their args)."""
    from fusedadapter import multitask_rows

    calls = []

    def keep(sites, counts, call_group, adapter_input):
        from fusedadapter.dispatch import fusion_op
        from fusedadapter.runner import DeferredCall, deferring

        with deferring(fusion_op("triton", adapter_input.device, adapter_input.dtype)):
            for k, n in enumerate(counts):
                if n:
                    try:
                        call_group(k)
                    except DeferredCall as d:
                        calls.append(d.args)
        raise RuntimeError("captured")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multitask_rows, "train_groups_triton", keep)
        with pytest.raises(RuntimeError, match="captured"):
            m(a, res, route=route)
    return calls


def test_grouped_call_with_masks_on_some_calls_only():
    """Deferred calls where only one has an adapter mask (and dropout draws by hash): each call's rows
    of the grouped call equal that call alone (a call without a mask keeps every adapter)."""
    from fusedadapter import multitask_rows
    from fusedadapter.runner import _call_op

    _backend_or_skip("triton")
    m = make_multi(4, {k: FUSIONS[k] for k in ("sst", "mnli")}).float()
    m.backend = "triton"
    m.train(True)
    for site in m.adapter_fusion_layer.values():
        site.dropout_p = 0.6  # (draws that drop adapters in both calls' few rows)
    a, res, _ = make_inputs(8)
    calls = _deferred_calls(m, a.float().requires_grad_(True), res.float(), ["sst", "mnli", "sst", "sst", "mnli"])
    assert len(calls) == 2 and all(c[11] > 0 for c in calls)  # train mode: logit dropout
    mask = torch.rand(calls[0][0].shape[0], len(calls[0][9]), generator=torch.Generator().manual_seed(2)) > 0.4
    calls[0] = calls[0][:15] + (mask,)
    op = torch.ops.fusedadapter.fusion_triton
    for (o, p), c in zip(multitask_rows._grouped_call(calls), calls):
        want_o, want_p = _call_op(op, *c)
        assert torch.equal(o, want_o) and torch.equal(p, want_p)


def test_grouped_training_frees_the_step_without_gc(ran):
    """The deferred calls' exceptions (whose tracebacks hold the forward's frames) are not kept: with
    the cycle collector off, a grouped training step's inputs are freed once nothing holds them."""
    import gc
    import weakref

    _backend_or_skip("triton")
    m = make_multi(1).float()
    m.backend = "triton"
    m.train(True)
    x, res, _ = make_inputs(2)
    gc.collect()
    gc.disable()
    try:
        a = x.float().requires_grad_(True)
        ref = weakref.ref(a)
        out = m(a, res.float(), route=ROUTE)
        out.sum().backward()
        assert ran["triton"].count("fusion_triton_grouped_backward") == 1
        del out, a
        assert ref() is None, "the step's input is still alive (a reference cycle)"
    finally:
        gc.enable()
