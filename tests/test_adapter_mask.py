"""Per-sample adapter masks (``adapter_mask``): every backend against the reference, the semantics
(masked adapters get probability 0; a row with every adapter masked is the residual path alone),
the broadcast rule, bad masks, the op-level contract (opcheck) and the ``fusedadapter.adapter_mask``
hook that patched models read.

Parity uses the docs/algorithm.md §4 oracle of tests/parity.py unchanged: the mask goes to truth, reference
and backend alike. Triton runs in its interpreter without a GPU (fp32 / fp16 / fp64).
"""

import copy
import threading

import pytest
import torch

import fusedadapter as fa
from fusedadapter import extension
from fusedadapter.masking import current_adapter_mask
from fusedadapter.ops import fusion_torch, hash_keep_mask
from parity import check_parity, make_inputs, make_site
from tiny_models import one_thread  # noqa: F401 (autouse: one intra-op thread, steady on a busy machine)

# The Triton interpreter turns runtime loop bounds into Python ints through a deprecated numpy path.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
LEAD = (3, 7)
N = 4


def masks(lead=LEAD, n=N, seed=0):
    """A (batch, N) and a per-token mask. Batch rows: 0 masks every adapter, 1 keeps one adapter,
    2 drops one; per token: random, with an all-masked and a single-adapter token."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.rand(lead[0], n, generator=g) > 0.5
    batch[0] = False
    batch[1] = False
    batch[1, n - 1] = True
    batch[2] = True
    batch[2, 0] = False
    token = torch.rand(*lead, n, generator=g) > 0.5
    token[0, 0] = False
    token[1, 1] = False
    token[1, 1, 2] = True
    return {"batch": batch, "token": token}


def site4(seed=0, **flags):
    return make_site(24, [3, 5, 4, 6], ["relu", "gelu", "swish", "tanh"], ln_before=(1,), seed=seed, **flags)


def _triton():
    fusion = pytest.importorskip("fusedadapter.kernels.fusion", reason="needs the `triton` package")
    if fusion.unsupported_reason("cpu") is not None:
        pytest.skip(fusion.unsupported_reason("cpu"))
    return fusion


# ---------------------------------------------------------------------------------------------
# Parity with the reference (docs/algorithm.md §4 oracle)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["batch", "token"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_parity(kind, train):
    site = site4()
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        check_parity("torch", site, dtype, train=train, adapter_mask=masks()[kind])


@pytest.mark.parametrize("flags", [{"residual_before": True}, {"query_before_ln": True}, {"preset": "static"}],
                         ids=["residual_before", "query_before_ln", "static"])
def test_torch_parity_flags(flags):
    flags = dict(flags)
    preset = flags.pop("preset", "dynamic")
    site = make_site(24, [3, 5, 4, 6], ["relu", "gelu", "swish", "tanh"], preset, **flags)
    for train in (False, True):
        check_parity("torch", site, torch.float64, train=train, separate_query=flags.get("query_before_ln", False),
                     adapter_mask=masks()["batch"])


def test_torch_plain_form_for_wide_adapters():
    from fusedadapter.functional import use_plain_form

    m = masks(n=3)
    for flags in ({}, {"residual_before": True}):
        site = make_site(16, [24, 24, 24], ["relu", "gelu", "swish"], **flags)
        assert use_plain_form(16, site.bottleneck)
        for train in (False, True):
            check_parity("torch", site, torch.float64, train=train, adapter_mask=m["token"])
            check_parity("torch", site, torch.float32, train=train, adapter_mask=m["batch"])


@pytest.mark.parametrize("kind", ["batch", "token"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_cpu_parity(cpu_op, kind, train):
    site = site4(seed=1)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        check_parity("cpu", site, dtype, train=train, adapter_mask=masks(seed=1)[kind])


@pytest.mark.parametrize("path", ["generic", "small", "packed", "bf16"])
def test_cpu_kernel_paths(cpu_op, path):
    # isa cap, small_m_max, bf16_min_m, f32_blas (see tests/test_native.py PATHS)
    cfg = {"generic": (0, 16, 16, 1), "small": (2, 10**6, 10**6, 0), "packed": (2, 0, 10**6, 0),
           "bf16": (2, 0, 0, 0)}[path]
    before = list(torch.ops.fusedadapter._cpu_config())
    if before[0] < {"generic": 0, "small": 1, "packed": 1, "bf16": 2}[path]:
        pytest.skip(f"this CPU has no {path} kernels")
    torch.ops.fusedadapter._cpu_config(*cfg)
    try:
        dtype = torch.bfloat16 if path == "bf16" else torch.float32
        check_parity("cpu", site4(seed=2), dtype, train=True, adapter_mask=masks(seed=2)["token"])
    finally:
        torch.ops.fusedadapter._cpu_config(-1, before[2], before[3], before[5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_triton_parity(dtype, train):
    _triton()
    site = make_site(40, [3, 8, 5], ["relu", "gelu", "swish"], seed=4)
    check_parity("triton", site, dtype, train=train, seed=5, adapter_mask=masks(n=3, seed=3)["batch"])


def test_triton_parity_token_mask_and_float64():
    _triton()
    site = make_site(24, [2, 3, 4], ["relu", "tanh", "quick_gelu"], seed=3)
    m = masks(n=3, seed=4)["token"]
    check_parity("triton", site, torch.float64, train=True, adapter_mask=m)
    check_parity("triton", site, torch.float32, train=False, adapter_mask=m)


# ---------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------
BACKENDS = ["reference", "torch", "cpu", "triton"]


def _available(backend):
    if backend == "triton":
        _triton()
    if backend == "cpu":
        extension.load_native_op("cpu", "cpu")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual_before", [False, True])
def test_all_masked_rows_return_the_residual_alone(backend, residual_before):
    _available(backend)
    site = site4(residual_before=residual_before).float()
    site.backend = backend
    a, res, _, keep = make_inputs(site)
    a, res = a.float().requires_grad_(True), res.float().requires_grad_(True)
    m = masks()["batch"]
    for train in (False, True):
        site.train(train)
        out, p = site(a, res, return_probs=True, adapter_mask=m, dropout_mask=keep if train else None)
        assert torch.equal(out[0].detach(), res[0].detach()), "row 0 masks every adapter: out == residual exactly"
        assert torch.equal(p[0].detach(), torch.zeros_like(p[0]))
        assert torch.isfinite(out).all() and torch.isfinite(p).all()
        g_out = torch.randn_like(out)
        da, dres = torch.autograd.grad((out * g_out).sum() + p.sum(), (a, res))
        assert torch.equal(da[0], torch.zeros_like(da[0])), "no gradient reaches a fully masked row's adapters"
        assert torch.equal(dres[0], g_out[0]), "the residual path carries the gradient alone"
        assert torch.isfinite(da).all() and torch.isfinite(dres).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_adapters_get_no_probability_even_under_dropout(backend):
    _available(backend)
    site = site4().float().train()
    site.backend = backend
    a, res, _, _ = make_inputs(site)
    a, res = a.float(), res.float()
    m = masks()["token"]
    keep = ~m  # every adapter a row keeps is dropped (logit 0); the masked ones are "kept"
    out, p = site(a, res, return_probs=True, adapter_mask=m, dropout_mask=keep)
    assert torch.equal(p[~m], torch.zeros_like(p[~m]))
    any_kept = m.any(-1)
    torch.testing.assert_close(p.sum(-1)[any_kept], torch.ones_like(p.sum(-1)[any_kept]))
    # dropped (logit 0) adapters share the row's probability equally
    row = p[any_kept]
    kept = m[any_kept]
    want = kept.float() / kept.sum(-1, keepdim=True)
    torch.testing.assert_close(row, want)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_a_masked_row_fuses_only_its_adapters(backend):
    # Exactly a site built from the kept adapters alone (same fusion weights), row by row.
    _available(backend)
    site = site4(seed=5).eval()
    site.backend = backend
    a, res, _, _ = make_inputs(site)
    m = masks(seed=5)["batch"]
    out, p = site(a, res, return_probs=True, adapter_mask=m)
    names = site.adapter_names
    for b in (1, 2):
        sub = copy.deepcopy(site)
        for i, name in enumerate(names):
            if not m[b, i]:
                del sub.adapters[name]
        sub.backend = "reference"
        want, want_p = sub(a[b], res[b], return_probs=True)
        torch.testing.assert_close(out[b], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(p[b][:, m[b]], want_p, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_all_true_mask_equals_no_mask_exactly(backend):
    _available(backend)
    site = site4().float()
    site.backend = backend
    a, res, _, keep = make_inputs(site)
    a, res = a.float(), res.float()
    for train in (False, True):
        site.train(train)
        kw = dict(return_probs=True, dropout_mask=keep if train else None)
        out0, p0 = site(a, res, **kw)
        out1, p1 = site(a, res, adapter_mask=torch.ones(LEAD[0], N, dtype=torch.bool), **kw)
        assert torch.equal(out0, out1) and torch.equal(p0, p1)


def test_batch_mask_broadcasts_over_the_sequence():
    site = site4().eval()
    site.backend = "torch"
    a, res, _, _ = make_inputs(site)
    m = masks()["batch"]
    out_b, p_b = site(a, res, return_probs=True, adapter_mask=m)
    out_t, p_t = site(a, res, return_probs=True, adapter_mask=m[:, None, :].expand(*LEAD, N))
    assert torch.equal(out_b, out_t) and torch.equal(p_b, p_t)
    # 3-D inputs (batch, seq, chunk, H): a (batch, N) mask still applies per batch element
    a4, r4 = a.reshape(3, 7, 1, 24), res.reshape(3, 7, 1, 24)
    assert torch.equal(site(a4, r4, adapter_mask=m).reshape(out_b.shape), out_b)


def test_functional_form_takes_the_mask():
    site = site4().eval()
    a, res, _, _ = make_inputs(site)
    m = masks()["token"]
    ws = [ad.weights() for ad in site.adapters.values()]
    out, p = fa.adapter_fusion(
        a, res, down_weights=[w.down_weight for w in ws], down_biases=[w.down_bias for w in ws],
        up_weights=[w.up_weight for w in ws], up_biases=[w.up_bias for w in ws],
        activations=[ad.activation_name for ad in site.adapters.values()], scalings=[w.scaling for w in ws],
        ln_weights=[w.ln_weight for w in ws], ln_biases=[w.ln_bias for w in ws],
        query_weight=site.query.weight, query_bias=site.query.bias, key_weight=site.key.weight,
        key_bias=site.key.bias, value_weight=site.value.weight, backend="torch", return_probs=True,
        adapter_mask=m)
    site.backend = "reference"
    want, want_p = site(a, res, return_probs=True, adapter_mask=m)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p, want_p, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Bad masks
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bad_masks_name_the_expected_shape(backend):
    site = site4()
    site.backend = backend
    a, res, _, _ = make_inputs(site)
    want = r"\(3, 7, 4\).*\(3, 4\)"
    with pytest.raises(ValueError, match=want):
        site(a, res, adapter_mask=torch.ones(3, 5, dtype=torch.bool))          # wrong N
    with pytest.raises(ValueError, match=want):
        site(a, res, adapter_mask=torch.ones(21, 4, dtype=torch.bool))         # flattened tokens
    with pytest.raises(ValueError, match=want):
        site(a, res, adapter_mask=torch.ones(7, 4, dtype=torch.bool))          # (seq, N)
    with pytest.raises(TypeError, match=r"bool tensor .*\(3, 7, 4\).*float32"):
        site(a, res, adapter_mask=torch.ones(3, 4))
    with pytest.raises(TypeError, match=r"bool tensor .*int64"):
        site(a, res, adapter_mask=torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="bool tensor"):
        site(a, res, adapter_mask=[[True] * 4] * 3)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_op_rejects_bad_masks(backend):
    _available(backend)
    op = getattr(torch.ops.fusedadapter, f"fusion_{backend}")
    a = _args(6, [3, 2])
    for bad in (torch.ones(6, 3, dtype=torch.bool), torch.ones(5, 2, dtype=torch.bool), torch.ones(6, 2)):
        with pytest.raises(ValueError, match=r"adapter_mask must be a bool tensor of shape \(6, 2\)"):
            op(*a, bad)


# ---------------------------------------------------------------------------------------------
# The op: opcheck, gradcheck, backward-op parity
# ---------------------------------------------------------------------------------------------
def _args(m, widths, h=7, kd=8, dtype=torch.float32, seed=0, dropout_p=0.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = len(widths)
    segs = [0]
    for w in widths:
        segs.append(segs[-1] + w)
    r = segs[-1]

    def rnd(*shape, dt=acc, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)
        return t.requires_grad_(requires_grad)

    shift = rnd(m) if dropout_p > 0 else None
    return [rnd(m, kd, dt=dtype), rnd(m, kd, dt=dtype), rnd(m, h, dt=dtype), rnd(r, kd, scale=kd ** -0.5),
            rnd(r, scale=0.1), rnd(r + n, kd, scale=kd ** -0.5), rnd(r + n, scale=0.1),
            rnd(h, r + n, scale=(r + n) ** -0.5), segs, [1 + i % 8 for i in range(n)], 1.3, dropout_p, 5, None, shift]


def _op_mask(m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, n, generator=g) > 0.4
    mask[0] = False
    mask[1] = False
    mask[1, n - 1] = True
    return mask


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dropout", [False, True], ids=["eval", "dropout"])
def test_opcheck_with_mask(backend, dropout):
    _available(backend)
    name = f"fusion_{backend}"
    op = getattr(torch.ops.fusedadapter, name)
    args = _args(6, [3, 2], dropout_p=0.25 if dropout else 0.0, requires_grad=True)
    torch.library.opcheck(op.default, tuple(args) + (_op_mask(6, 2),))
    # the backward op: once with the mask, once with it left off (the dispatcher drops a trailing None)
    a = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    out, probs = op(*a, _op_mask(6, 2))
    bwd = getattr(torch.ops.fusedadapter, name + "_backward").default
    bargs = (torch.randn_like(out), torch.randn_like(probs), probs, a[0], a[1], *a[3:8], *a[8:15],
             [True, True, False] + [True] * 5 + [dropout])
    torch.library.opcheck(bwd, bargs + (_op_mask(6, 2),))
    torch.library.opcheck(bwd, bargs)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_with_mask_fp64(backend):
    _available(backend)
    op = getattr(torch.ops.fusedadapter, f"fusion_{backend}")
    args = _args(5, [2, 3, 2], dtype=torch.float64, dropout_p=0.3, requires_grad=True)
    mask = _op_mask(5, 3, seed=1)
    idx = [0, 1, 2, 3, 4, 5, 6, 7, 14]
    keep = hash_keep_mask(5, 5, 3, 0.3)

    def f(*ts):
        full = list(args)
        for i, t in zip(idx, ts):
            full[i] = t
        full[13] = keep
        return op(*full, mask)

    assert torch.autograd.gradcheck(f, tuple(args[i] for i in idx), eps=1e-6, atol=1e-7)
    if backend == "torch":  # plain aten ops: double backward too
        assert torch.autograd.gradgradcheck(f, tuple(args[i] for i in idx), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backward_op_matches_the_torch_oracle(backend):
    _available(backend)
    from fusedadapter.ops import fusion_torch_backward

    a = _args(9, [3, 4, 2], dtype=torch.float64, dropout_p=0.3)
    mask = _op_mask(9, 3, seed=2)
    out, probs = fusion_torch(*a, mask)
    go, gp = torch.randn_like(out), torch.randn_like(probs)
    rest = (go, gp, probs, a[0], a[1], *a[3:8], *a[8:15], [True, True, False] + [True] * 6)
    want = fusion_torch_backward(*rest, mask)
    got = getattr(torch.ops.fusedadapter, f"fusion_{backend}_backward")(*rest, mask)
    for i, (g, w) in enumerate(zip(got, want)):
        if w.numel():
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=f"gradient {i}")


# ---------------------------------------------------------------------------------------------
# The hook: fusedadapter.adapter_mask(...)
# ---------------------------------------------------------------------------------------------
def test_context_manager_reaches_the_module_and_nests():
    site = site4().eval()
    site.backend = "torch"
    a, res, _, _ = make_inputs(site)
    m = masks()
    plain = site(a, res)
    want_b = site(a, res, adapter_mask=m["batch"])
    want_t = site(a, res, adapter_mask=m["token"])
    assert current_adapter_mask() is None
    with fa.adapter_mask(m["batch"]):
        assert torch.equal(site(a, res), want_b)
        assert torch.equal(site(a, res, adapter_mask=m["token"]), want_t), "an explicit argument wins"
        with fa.adapter_mask(m["token"]):
            assert torch.equal(site(a, res), want_t)
            with fa.adapter_mask(None):
                assert torch.equal(site(a, res), plain)
        assert torch.equal(site(a, res), want_b)
    assert current_adapter_mask() is None
    assert torch.equal(site(a, res), plain)
    with pytest.raises(RuntimeError), fa.adapter_mask(m["batch"]):  # restored after an exception too
        raise RuntimeError("boom")
    assert current_adapter_mask() is None


def test_context_manager_picks_columns_by_name():
    site = fa.FusedAdapterFusion(16, {"x": fa.AdapterConfig(bottleneck_size=3), "y": fa.AdapterConfig(bottleneck_size=2),
                                      "z": fa.AdapterConfig(bottleneck_size=4)}, backend="torch").eval()
    a, res = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    pool = torch.tensor([[True, False, True, False], [False, True, True, True]])  # columns w, z, x, y
    want = site(a, res, adapter_mask=pool[:, [2, 3, 1]])
    with fa.adapter_mask(pool, adapter_names=["w", "z", "x", "y"]):
        assert torch.equal(site(a, res), want)
    with fa.adapter_mask(pool[:, :2], adapter_names=["w", "z"]):
        with pytest.raises(ValueError, match=r"missing \['x', 'y'\]"):
            site(a, res)
    with pytest.raises(ValueError, match="4 columns but 3 adapter names"):
        with fa.adapter_mask(pool, adapter_names=["w", "z", "x"]):
            pass


def test_context_manager_is_per_thread():
    site = site4().eval()
    site.backend = "torch"
    a, res, _, _ = make_inputs(site)
    plain = site(a, res)
    seen = {}
    started, release = threading.Event(), threading.Event()

    def other():
        started.wait()
        seen["out"] = site(a, res)
        release.set()

    t = threading.Thread(target=other)
    t.start()
    with fa.adapter_mask(masks()["batch"]):
        started.set()
        release.wait(30)
    t.join()
    assert torch.equal(seen["out"], plain)


def test_context_manager_under_torch_compile_without_graph_breaks():
    site = site4().float().eval()
    site.backend = "torch"
    a, res = torch.randn(*LEAD, 24), torch.randn(*LEAD, 24)
    m = masks()
    compiled = torch.compile(site, backend="eager", fullgraph=True)
    with fa.adapter_mask(m["batch"]):
        explanation = torch._dynamo.explain(site)(a, res)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch.testing.assert_close(compiled(a, res), site(a, res, adapter_mask=m["batch"]))
    flipped = ~m["batch"]
    with fa.adapter_mask(flipped):  # new values: the result follows the mask
        torch.testing.assert_close(compiled(a, res), site(a, res, adapter_mask=flipped))
    torch.testing.assert_close(compiled(a, res), site(a, res))


def test_patched_model_gets_the_mask_per_call():
    from tiny_models import tiny_inputs, tiny_model

    bare = tiny_model("bert", dropout=False)
    model = copy.deepcopy(bare)
    adapters = {"a": fa.AdapterConfig(bottleneck_size=4), "b": fa.AdapterConfig(bottleneck_size=3),
                "c": fa.AdapterConfig(bottleneck_size=5, non_linearity="gelu")}
    fa.patch(model, adapters, backend="torch")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fusion" in name or "adapters" in name:  # move every fusion weight away from its init
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    inputs = tiny_inputs("bert", batch=3)
    mask = torch.tensor([[False, False, False], [True, False, True], [True, True, True]])
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with fa.adapter_mask(mask):
            masked = model(**inputs).last_hidden_state
        want_bare = bare(**inputs).last_hidden_state
    torch.testing.assert_close(masked[0], want_bare[0], rtol=1e-5, atol=1e-5)  # no adapter: the bare model
    torch.testing.assert_close(masked[2], plain[2], rtol=1e-6, atol=1e-6)      # every adapter: unchanged
    assert not torch.allclose(masked[1], plain[1], atol=1e-4)
    assert not torch.allclose(plain[0], want_bare[0], atol=1e-4)


# ------------------------------------------------------------------------------------------
# generate(num_beams=k): a (B, N) block mask follows the expansion of the batch to B*k rows
# ------------------------------------------------------------------------------------------
def _patched_lm(arch):
    import transformers
    from fusedadapter.patching import fusion_sites
    from fusedadapter.testing import perturb_
    from tiny_models import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, dropout=False)).eval()
    fa.patch(model, {"a": fa.AdapterConfig(bottleneck_size=4), "b": fa.AdapterConfig(bottleneck_size=3),
                     "c": fa.AdapterConfig(bottleneck_size=5, non_linearity="gelu")}, backend="torch")
    g = torch.Generator().manual_seed(1)
    for _, _, site in fusion_sites(model):
        perturb_(site, g)
    return model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_block_mask_follows_beam_search(arch):
    model = _patched_lm(arch)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 97, (2, 5), generator=g)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    k, ret = 3, 2
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, num_beams=k, num_return_sequences=ret,
              do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0)
    with torch.no_grad():
        with fa.adapter_mask(mask):
            got = model.generate(ids, **kw)
        with fa.adapter_mask(mask.repeat_interleave(k, dim=0)):  # each beam row's mask, given explicitly
            want = model.generate(ids, **kw)
        plain = model.generate(ids, **kw)
        alone = []
        for b in range(2):  # each prompt alone, its mask row for all of its beams
            with fa.adapter_mask(mask[b:b + 1].expand(k, -1)):
                alone.append(model.generate(ids[b:b + 1], **{**kw, "attention_mask": torch.ones_like(ids[b:b + 1])}))
    assert torch.equal(got.sequences, want.sequences)
    assert torch.equal(got.sequences_scores, want.sequences_scores)
    for b in range(2):
        assert torch.equal(alone[b].sequences, got.sequences[b * ret:(b + 1) * ret])
        torch.testing.assert_close(alone[b].sequences_scores, got.sequences_scores[b * ret:(b + 1) * ret],
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain.scores[0], got.scores[0], atol=1e-4)  # the mask matters
    # k = 1 (greedy): nothing to expand; each prompt as it runs alone under its mask row
    greedy_kw = {**kw, "num_beams": 1, "num_return_sequences": 1}
    with torch.no_grad():
        with fa.adapter_mask(mask):
            greedy = model.generate(ids, **greedy_kw)
        for b in range(2):
            with fa.adapter_mask(mask[b:b + 1]):
                one = model.generate(ids[b:b + 1], **{**greedy_kw, "attention_mask": torch.ones_like(ids[b:b + 1])})
            assert torch.equal(one.sequences[0], greedy.sequences[b])


def test_beam_expansion_errors_say_why():
    from tiny_models import tiny_inputs

    model = _patched_lm("gpt2")
    inputs = tiny_inputs("gpt2", batch=4)
    with torch.no_grad(), fa.adapter_mask(torch.ones(3, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"batch 3 .* 4 rows, which is not a multiple of 3.*num_beams"):
            model(**inputs)
    # an explicit per-call mask is never expanded: it must match the site's batch
    site = site4().eval()
    site.backend = "torch"
    a, res = torch.randn(6, 5, 24, dtype=site.anchor_param.dtype), torch.randn(6, 5, 24, dtype=site.anchor_param.dtype)
    with pytest.raises(ValueError, match=r"batch 3 against 6 rows; an explicit adapter_mask= must match"):
        site(a, res, adapter_mask=torch.ones(3, N, dtype=torch.bool))
