"""fusedadapter against AdapterHub itself (adapters 1.3.0, transformers 4.57): runs in .venv-ah.

Every supported architecture, tiny and random, with three fused adapters of mixed widths,
activations, scalings and one with its own LayerNorm, both placements and both presets:

* ``accelerate`` matches AdapterHub's eager model (last hidden state and every fusion
  probability) with the docs/algorithm.md §4 oracle in eval, and fusion-training gradients (fusion
  parameters and the input) with dropout disabled through the model config;
* AdapterHub's ``save_adapter`` / ``save_adapter_fusion`` files, loaded with
  ``load_adapterhub`` into a plain model, reproduce AdapterHub's outputs (and the reverse:
  ``save_adapterhub`` files load into AdapterHub);
* ``patch`` with the same weights reproduces AdapterHub's model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fusedadapter as fa
from cases import HAS_AVX512
from conftest import requires_adapterhub
from fusedadapter.patching import collect_fusion_probs, fusion_sites
from fusedadapter.testing import FLOORS, assert_oracle, oracle_check, perturb_, rel_err
from tiny_models import ARCHS, embeds_inputs, last_hidden, one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

pytestmark = [requires_adapterhub, pytest.mark.adapterhub]

F32, F64 = torch.float32, torch.float64
FUSE = "a,b,c"


def _ah():
    import adapters

    return adapters


def _bn_cls(placement):
    ah = _ah()
    return ah.SeqBnConfig if placement == "seq_bn" else ah.DoubleSeqBnConfig


def ah_adapter_configs(placement):
    Cfg = _bn_cls(placement)
    return {
        "a": Cfg(reduction_factor=4),  # width 8, the placement's activation
        "b": Cfg(reduction_factor=6, non_linearity="gelu", ln_before=True, scaling="learned"),  # width 5
        "c": Cfg(reduction_factor=11, non_linearity="tanh", scaling="channel"),  # width 2
    }


def our_adapter_configs():
    return {
        "a": fa.AdapterConfig(bottleneck_size=8, non_linearity=None),
        "b": fa.AdapterConfig(bottleneck_size=5, non_linearity="gelu", ln_before=True, scaling="learned"),
        "c": fa.AdapterConfig(bottleneck_size=2, non_linearity="tanh", scaling="channel"),
    }


def bottleneck_layers(model):
    from adapters.methods.bottleneck import BottleneckLayer

    return {(m.layer_idx, m.location_key): m for m in model.modules()
            if isinstance(m, BottleneckLayer) and len(m.adapters) > 0}


def perturb_adapterhub(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    for _, layer in sorted(bottleneck_layers(model).items()):
        perturb_(layer.adapters, g)
        perturb_(layer.adapter_fusion_layer, g)


def make_ah(arch, placement, preset="dynamic", *, dropout=True, seed=0, fusion_overrides=None, model=None):
    """(AdapterHub model with Fuse(a, b, c) active and perturbed, a plain copy of its base weights)."""
    ah = _ah()
    model = tiny_model(arch, seed=seed, dropout=dropout) if model is None else model
    plain = copy.deepcopy(model)
    ah.init(model)
    for name, cfg in ah_adapter_configs(placement).items():
        model.add_adapter(name, config=cfg)
    fuse = ah.Fuse("a", "b", "c")
    config = ah.AdapterFusionConfig.load(preset, **(fusion_overrides or {}))
    model.add_adapter_fusion(fuse, config=config)
    model.set_active_adapters(fuse)
    perturb_adapterhub(model)
    return model.eval(), plain


def run_ah(model, inputs):
    with torch.no_grad():
        out = model(**inputs, output_adapter_fusion_attentions=True)
    probs = {(i, loc): torch.from_numpy(p) for i, locs in out.adapter_fusion_attentions[FUSE].items()
             for loc, p in locs.items()}
    return last_hidden(out), probs


def run_patched(model, inputs):
    with torch.no_grad(), collect_fusion_probs(model) as probs:
        y = last_hidden(model(**inputs))
    (name,) = probs.keys()
    return y, {(i, loc): p for i, locs in probs[name].items() for loc, p in locs.items()}


def assert_fp64_close(got, truth, arch, what):
    """float64 against AdapterHub's float64 truth (the reference's own error is 0: the floor)."""
    err = rel_err(got, truth)
    assert err <= FLOORS[F64], f"{what}: float64 err {err:.3e} > {FLOORS[F64]:.0e}"


def check_outputs(arch, got, ref, truth, what):
    """got/ref (float32) and truth (float64): (hidden, {site: probs}) each."""
    assert_oracle(got[0], ref[0], truth[0], F32, what=f"{what} last hidden state")
    assert set(got[1]) == set(truth[1]) and len(truth[1]) > 0
    for site in truth[1]:
        assert_oracle(got[1][site], ref[1][site], truth[1][site], F32, what=f"{what} fusion probs {site}")


# ------------------------------------------------------------------------------------------
# accelerate: eval
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["dynamic", "static"])
@pytest.mark.parametrize("placement", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("arch", ARCHS)
def test_accelerate_matches_adapterhub_in_eval(arch, placement, preset):
    model, _ = make_ah(arch, placement, preset)
    inputs, inputs64 = tiny_inputs(arch), tiny_inputs(arch, dtype=F64)
    model64 = copy.deepcopy(model).double()
    truth = run_ah(model64, inputs64)
    ref = run_ah(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fusable setup warns about nothing
        fa.accelerate(model)
        fa.accelerate(model64)
    got = run_ah(model, inputs)
    check_outputs(arch, got, ref, truth, f"{arch} {placement} {preset} accelerate")
    got64 = run_ah(model64, inputs64)
    assert_fp64_close(got64[0], truth[0], arch, f"{arch} {placement} {preset} accelerate float64")
    # unpatch gives AdapterHub's eager path back, bit for bit
    fa.unpatch(model)
    y, _ = run_ah(model, inputs)
    assert torch.equal(y, ref[0])


# ------------------------------------------------------------------------------------------
# accelerate: fusion training gradients (dropout off through the model config)
# ------------------------------------------------------------------------------------------
def _fusion_grads(model, arch, dtype, accelerated):
    m = copy.deepcopy(model).to(dtype)
    if accelerated:
        fa.accelerate(m, backend="torch")  # the xfail record below measures the torch backend
    inputs = embeds_inputs(m, arch, tiny_inputs(arch, dtype=dtype))
    y = last_hidden(m(**inputs))
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(11), dtype=F64).to(dtype)
    loss = (y * w).sum()
    reg = m.get_fusion_regularization_loss()  # None for the static preset (no value matrix)
    if reg is not None:
        loss = loss + reg
    loss.backward()
    grads = {n: (None if p.grad is None else p.grad.detach()) for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all(".adapter_fusion_layer." in n for n in grads)
    leaf = inputs.get("inputs_embeds", inputs.get("pixel_values"))
    grads["input"] = leaf.grad.detach()
    return grads


def _training_model(arch, placement):
    preset = "static" if arch in ("roberta", "gpt2", "mistral") else "dynamic"
    model, _ = make_ah(arch, placement, preset, dropout=False)
    model.train_adapter_fusion(_ah().Fuse("a", "b", "c"))
    return model


# Model-level float32 gradients against the docs/algorithm.md §4 oracle. Until issue 11 one tensor exceeded the
# bound at this seed, the query-bias gradient of block 1 in Mistral seq_bn/static (err 4.9e-6, bound
# 3.8e-6); the stage-2 per-token form (few tokens per call: fusion weights applied per token, not
# folded) holds it. Checked strictly: an entry here must fail the oracle.
_FP32_GRAD_EXCEEDS = set()
# Known open defect (closing note of issue 11's stop 18): on a CPU without AVX-512 (ATen's AVX2 GEMMs round
# differently) these exceed the bound at this seed (distilbert double_seq_bn: query.bias 2.65e-6 vs 2.22e-6,
# key.weight 2.14e-6 vs 1.99e-6; mistral double_seq_bn likewise); they held on the AVX-512 machine of the last
# landed CI run. Reported as xfail on AVX2 (the message prints the numbers), the oracle unchanged.
_FP32_GRAD_EXCEEDS_WITHOUT_AVX512 = {("distilbert", "double_seq_bn"), ("mistral", "double_seq_bn")}


@pytest.mark.parametrize("placement", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("arch", ARCHS)
def test_accelerate_fusion_training_gradients(arch, placement):
    """Fusion-parameter and input gradients: float64 equal to AdapterHub's up to rounding (floor
    1e-12), float32 within the oracle."""
    model = _training_model(arch, placement)
    truth = _fusion_grads(model, arch, F64, accelerated=False)
    got64 = _fusion_grads(model, arch, F64, accelerated=True)
    ref = _fusion_grads(model, arch, F32, accelerated=False)
    got = _fusion_grads(model, arch, F32, accelerated=True)
    assert set(got) == set(truth) == set(got64)
    scale = max(t.abs().max().item() for t in truth.values())
    beyond = []
    for name in truth:
        if name.endswith("key.bias"):
            # The key bias cancels in the softmax without logit dropout: the fused path returns its exact
            # gradient, a zero tensor (so DDP's defaults work); AdapterHub's is rounding noise.
            assert got[name] is not None and got64[name] is not None, name
            assert not got[name].any() and not got64[name].any(), name
            assert truth[name].abs().max().item() <= 1e-9 * scale, name
            continue
        assert_fp64_close(got64[name], truth[name], arch, f"{arch} {placement} float64 grad {name}")
        ok, err, bound = oracle_check(got[name], ref[name], truth[name], F32)
        if not ok:
            beyond.append(f"{name}: err {err:.2e} > bound {bound:.2e}")
    if beyond and (arch, placement) in _FP32_GRAD_EXCEEDS_WITHOUT_AVX512 and not HAS_AVX512:
        pytest.xfail("fp32 gradient at the oracle edge on this AVX2-only CPU: " + "; ".join(beyond))
    if (arch, placement) in _FP32_GRAD_EXCEEDS:
        assert beyond, "passes now: remove it from _FP32_GRAD_EXCEEDS"
        pytest.xfail("known model-level float32 gradient beyond the oracle: " + "; ".join(beyond))
    assert not beyond, beyond


def _reg_and_grads(model):
    for p in model.parameters():
        p.grad = None
    reg = model.get_fusion_regularization_loss()
    (reg * 1.7).backward()
    return reg, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_accelerated_regularization_loss_is_adapterhubs_bit_for_bit():
    """accelerate gives the model a faster get_fusion_regularization_loss (one autograd node per value
    matrix, issue 11): AdapterHub's value and gradients bit for bit; unpatch takes it away again."""
    model = _training_model("bert", "double_seq_bn")
    with torch.no_grad():  # value matrices away from the identity (AdapterHub starts them near it)
        for layer in bottleneck_layers(model).values():
            for fusion in layer.adapter_fusion_layer.values():
                fusion.value.weight.add_(0.01 * torch.randn_like(fusion.value.weight))
    reg_ah, grads_ah = _reg_and_grads(model)
    fa.accelerate(model, backend="torch")
    reg, grads = _reg_and_grads(model)
    nodes, todo = set(), [reg.grad_fn]
    while todo:
        fn = todo.pop()
        nodes.add(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions if f is not None]
    assert "_IdentityDistanceBackward" in nodes and "PowBackward0" not in nodes, nodes
    assert torch.equal(reg, reg_ah) and len(grads_ah) == 2 * 2 and set(grads) == set(grads_ah)  # 2 blocks x 2 sites
    assert all(torch.equal(grads[n], grads_ah[n]) for n in grads)
    fa.unpatch(model)
    assert "get_fusion_regularization_loss" not in model.__dict__
    assert torch.equal(model.get_fusion_regularization_loss(), reg_ah)


def test_accelerated_training_steps_save_and_reload_in_adapterhub(tmp_path):
    """Optimizer steps, the regularization loss and save_adapter_fusion keep working."""
    ah = _ah()
    model, plain = make_ah("bert", "seq_bn", dropout=False)
    eager = copy.deepcopy(model)
    fuse = ah.Fuse("a", "b", "c")
    fa.accelerate(model)
    inputs = tiny_inputs("bert")
    for m in (model, eager):
        m.train_adapter_fusion(fuse)
    opts = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model, eager)]
    w = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        for m, opt in zip((model, eager), opts):
            opt.zero_grad()
            loss = (last_hidden(m(**inputs)) * w).sum() + m.get_fusion_regularization_loss()
            loss.backward()
            opt.step()
    for (n, p), (n2, p2) in zip(model.named_parameters(), eager.named_parameters()):
        assert n == n2
        if n.endswith("key.bias"):
            # exact gradient zero (cancels in softmax): fused leaves it, Adam moves AdapterHub's on
            # rounding noise. It does not change any output.
            continue
        torch.testing.assert_close(p, p2, rtol=1e-4, atol=1e-5, msg=n)
    model.eval()
    model.save_adapter_fusion(str(tmp_path / FUSE), FUSE)
    for n in "abc":
        model.save_adapter(str(tmp_path / n), n)
    y, _ = run_ah(model, inputs)
    fresh = copy.deepcopy(plain)
    ah.init(fresh)
    for n in "abc":
        fresh.load_adapter(str(tmp_path / n))
    fresh.load_adapter_fusion(str(tmp_path / FUSE), set_active=True)
    fresh.eval()
    y2, _ = run_ah(fresh, inputs)
    torch.testing.assert_close(y2, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_accelerate_flags_temperature_residual_before_query_before_ln(arch):
    overrides = dict(temperature=True, residual_before=True, query_before_ln=True)
    model, _ = make_ah(arch, "double_seq_bn", fusion_overrides=overrides)
    model64 = copy.deepcopy(model).double()
    ref_model = copy.deepcopy(model)
    fa.accelerate(model)
    fa.accelerate(model64)
    inputs = tiny_inputs(arch)
    for step in range(3):  # the temperature steps down on every call, in both
        ref = run_ah(ref_model, inputs)
        truth = run_ah(copy.deepcopy(ref_model).double(), tiny_inputs(arch, dtype=F64))
        got = run_ah(model, inputs)
        check_outputs(arch, got, ref, truth, f"{arch} flags step {step}")
    temps = {round(f.T, 6) for layer in bottleneck_layers(model).values() for f in layer.adapter_fusion_layer.values()}
    assert temps == {round(50.0 - 3 * 0.05, 6)}


def test_unfusable_setups_stay_eager_with_one_warning():
    ah = _ah()
    model, _ = make_ah("bert", "seq_bn")
    # relu6: an activation the fused op does not implement
    model.add_adapter("d", config=ah.SeqBnConfig(reduction_factor=8, non_linearity="relu6"))
    other = ah.Fuse("a", "d", name="other")
    model.add_adapter_fusion(other)
    model.set_active_adapters(other)
    perturb_adapterhub(model, seed=8)
    model.eval()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        y0 = last_hidden(model(**inputs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fa.accelerate(model)
        with torch.no_grad():
            y1 = last_hidden(model(**inputs))
            model(**inputs)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "'other'" in msgs[0] and "relu6" in msgs[0], msgs
    assert torch.equal(y0, y1)
    # switching to a fusable Fuse uses the fused op
    model.set_active_adapters(ah.Fuse("a", "b", "c"))
    ref = copy.deepcopy(model)
    fa.unpatch(ref)
    torch.testing.assert_close(run_ah(model, inputs)[0], run_ah(ref, inputs)[0], rtol=0, atol=1e-5)


def test_accelerate_errors():
    with pytest.raises(ValueError, match="no AdapterHub bottleneck layers"):
        fa.accelerate(tiny_model("bert"))
    model, _ = make_ah("bert", "seq_bn")
    with pytest.raises(ValueError, match="unknown backend"):
        fa.accelerate(model, backend="fast")
    with pytest.raises(ValueError, match="use fusedadapter.accelerate"):
        fa.patch(model, [fa.AdapterConfig()])


# ------------------------------------------------------------------------------------------
# AdapterHub files <-> fusedadapter, and patch with AdapterHub's weights
# ------------------------------------------------------------------------------------------
def _save_ah(model, directory, skip=(), **kw):
    directory.mkdir(parents=True, exist_ok=True)
    for n in "abc":
        if n in skip:
            continue
        model.save_adapter(str(directory / n), n, **kw)
    model.save_adapter_fusion(str(directory / FUSE), FUSE, **kw)


@pytest.mark.parametrize("placement", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("arch", ARCHS)
def test_adapterhub_files_load_into_a_plain_model(arch, placement, tmp_path):
    preset = "static" if arch in ("electra", "vit", "llama") else "dynamic"
    model, plain = make_ah(arch, placement, preset)
    _save_ah(model, tmp_path)
    inputs = tiny_inputs(arch)
    ref = run_ah(model, inputs)
    truth = run_ah(copy.deepcopy(model).double(), tiny_inputs(arch, dtype=F64))
    plain64 = copy.deepcopy(plain).double()
    assert fa.load_adapterhub(plain, str(tmp_path / FUSE)) is plain
    fa.load_adapterhub(plain64, str(tmp_path / FUSE), backend="reference")
    check_outputs(arch, run_patched(plain, inputs), ref, truth, f"{arch} {placement} load_adapterhub")
    assert_fp64_close(run_patched(plain64, tiny_inputs(arch, dtype=F64))[0], truth[0], arch,
                      f"{arch} {placement} load_adapterhub float64")


def test_both_key_prefixes_and_safetensors(tmp_path):
    """A model with a head saves 'bert.'-prefixed keys, a base model unprefixed ones; both load
    into either kind of model; safetensors files too."""
    ah = _ah()
    config_model = tiny_model("bert")
    head_model = ah.BertAdapterModel(config_model.config)
    head_model.bert.load_state_dict(config_model.state_dict(), strict=False)
    model, _ = make_ah("bert", "seq_bn", model=head_model)
    _save_ah(model, tmp_path / "pt")
    _save_ah(model, tmp_path / "st", use_safetensors=True, skip="b")
    # AdapterHub itself cannot write an ln_before adapter as safetensors (its LayerNorm is
    # registered twice, shared memory): "b" as torch weights next to the others' safetensors
    model.save_adapter(str(tmp_path / "st" / "b"), "b")
    keys = torch.load(tmp_path / "pt" / "a" / "pytorch_adapter.bin", weights_only=True)
    assert all(k.startswith("bert.") for k in keys)
    assert (tmp_path / "st" / FUSE / "model_adapter_fusion.safetensors").exists()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        ref = model.bert(**inputs, output_adapter_fusion_attentions=True).last_hidden_state
    for sub in ("pt", "st"):
        plain = tiny_model("bert")  # same base weights (same seed), no prefix
        fa.load_adapterhub(plain, str(tmp_path / sub / FUSE), backend="reference")
        torch.testing.assert_close(run_patched(plain, inputs)[0], ref, rtol=0, atol=1e-6)
    # unprefixed keys into a model with a head
    base, _ = make_ah("bert", "seq_bn")
    _save_ah(base, tmp_path / "base")
    keys = torch.load(tmp_path / "base" / "a" / "pytorch_adapter.bin", weights_only=True)
    assert all(k.startswith("encoder.") for k in keys)
    with_head = tiny_model("bert", head=True)
    fa.load_adapterhub(with_head, str(tmp_path / "base" / FUSE), backend="reference")
    with torch.no_grad():
        y = with_head.bert(**inputs).last_hidden_state
    torch.testing.assert_close(y, run_ah(base, inputs)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("placement", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patch_with_the_same_weights_reproduces_adapterhub(arch, placement):
    preset = "static" if arch in ("bert", "distilbert", "qwen2") else "dynamic"
    model, plain = make_ah(arch, placement, preset)
    fa.patch(plain, our_adapter_configs(), fusion=preset, placement=placement, backend="reference")
    layers = bottleneck_layers(model)
    sites = fusion_sites(plain)
    assert sorted((i, loc) for i, loc, _ in sites) == sorted(layers)
    with torch.no_grad():
        for i, loc, site in sites:
            ah_layer = layers[(i, loc)]
            for n, adapter in site.adapters.items():
                adapter.load_state_dict(ah_layer.adapters[n].state_dict())
            ah_fusion = ah_layer.adapter_fusion_layer[FUSE]
            for lin in ("query", "key", "value"):
                if getattr(site, lin) is not None:
                    getattr(site, lin).load_state_dict(getattr(ah_fusion, lin).state_dict())
    inputs, inputs64 = tiny_inputs(arch), tiny_inputs(arch, dtype=F64)
    ref = run_ah(model, inputs)
    truth = run_ah(copy.deepcopy(model).double(), inputs64)
    # the eager site in float64: AdapterHub's op sequence (a deep copy of a patched model is patched)
    plain64 = copy.deepcopy(plain).double()
    with torch.no_grad():
        got64 = last_hidden(plain64(**inputs64))
    assert_fp64_close(got64, truth[0], arch, f"{arch} {placement} patch (reference backend, float64)")
    # and the fused backend at float32
    fa.patching.set_backend(plain, "torch")
    check_outputs(arch, run_patched(plain, inputs), ref, truth, f"{arch} {placement} patch (torch backend)")


@pytest.mark.parametrize("placement", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("arch", ["bert", "distilbert", "vit", "gpt2", "qwen2"])
def test_save_adapterhub_files_load_into_adapterhub(arch, placement, tmp_path):
    ah = _ah()
    plain = tiny_model(arch)
    base = copy.deepcopy(plain)
    fa.patch(plain, our_adapter_configs(), placement=placement, backend="reference")
    g = torch.Generator().manual_seed(9)
    for _, _, site in fusion_sites(plain):
        perturb_(site, g)
    fa.save_adapterhub(plain, str(tmp_path))
    ah.init(base)
    for n in "abc":
        base.load_adapter(str(tmp_path / n))
    base.load_adapter_fusion(str(tmp_path / FUSE), set_active=True)
    base.eval()
    inputs = tiny_inputs(arch)
    y_ah, probs_ah = run_ah(base, inputs)
    y, probs = run_patched(plain, inputs)
    torch.testing.assert_close(y, y_ah, rtol=0, atol=1e-6)
    assert set(probs) == set(probs_ah)
    for k in probs:
        torch.testing.assert_close(probs[k], probs_ah[k], rtol=0, atol=1e-6)


def test_leave_out_and_per_layer_widths_from_adapterhub_files(tmp_path):
    """AdapterHub features a patched model never writes: leave_out and a per-layer reduction factor."""
    ah = _ah()
    model = tiny_model("roberta")
    plain = copy.deepcopy(model)
    ah.init(model)
    model.add_adapter("x", config=ah.SeqBnConfig(reduction_factor={"1": 8, "default": 4}, ln_before=True))
    model.add_adapter("y", config=ah.SeqBnConfig(reduction_factor=16, leave_out=[1], non_linearity="gelu_new"))
    model.add_adapter("z", config=ah.SeqBnConfig(reduction_factor=2, scaling=0.5))
    fuse = ah.Fuse("y", "x", "z")
    model.add_adapter_fusion(fuse)
    model.set_active_adapters(fuse)
    perturb_adapterhub(model)
    model.eval()
    for n in "xyz":
        model.save_adapter(str(tmp_path / n), n)
    model.save_adapter_fusion(str(tmp_path / "y,x,z"), "y,x,z")
    fa.load_adapterhub(plain, str(tmp_path / "y,x,z"))
    sites = {(i, loc): s for i, loc, s in fusion_sites(plain)}
    assert [(n, a.bottleneck_size) for n, a in sites[(0, "output_adapter")].adapters.items()] == [
        ("y", 2), ("x", 8), ("z", 16)]
    assert [(n, a.bottleneck_size) for n, a in sites[(1, "output_adapter")].adapters.items()] == [("x", 4), ("z", 16)]
    inputs = tiny_inputs("roberta")
    with torch.no_grad():
        ref = model(**inputs, output_adapter_fusion_attentions=True)
    y, probs = run_patched(plain, inputs)
    torch.testing.assert_close(y, ref.last_hidden_state, rtol=0, atol=1e-5)
    p_ah = ref.adapter_fusion_attentions["y,x,z"]
    assert p_ah[1]["output_adapter"].shape[-1] == 2
    for (i, loc), p in probs.items():
        torch.testing.assert_close(p, torch.from_numpy(p_ah[i][loc]), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------
# accelerate: fa.adapter_mask (issue 13 item 2: it was ignored)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("arch,placement", [("bert", "double_seq_bn"), ("llama", "seq_bn")])
def test_accelerated_model_applies_the_adapter_mask(arch, placement, backend, tmp_path):
    """Same semantics and checks as the patched path: a row with every adapter masked is the bare
    model's, a row with every adapter kept is the unmasked one, a partial row matches the same
    weights loaded with load_adapterhub under the same mask; masked adapters get probability 0;
    a mask of the wrong shape or dtype raises; named columns are picked by name."""
    model, plain = make_ah(arch, placement, dropout=False)
    _save_ah(model, tmp_path)
    bare = copy.deepcopy(plain)
    loaded = fa.load_adapterhub(plain, str(tmp_path / FUSE), backend=backend)
    fa.accelerate(model, backend=backend)
    inputs = tiny_inputs(arch, batch=3, seq=7, seed=2)
    mask = torch.tensor([[False, False, False], [True, False, True], [True, True, True]])
    with torch.no_grad():
        y_bare = last_hidden(bare(**inputs))
        y_plain, _ = run_ah(model, inputs)
        with fa.adapter_mask(mask):
            y, probs = run_ah(model, inputs)
            y_loaded = last_hidden(loaded(**inputs))
        with fa.adapter_mask(mask[:, [2, 0, 1]], adapter_names=["c", "a", "b"]):
            y_named, _ = run_ah(model, inputs)
        with fa.adapter_mask(torch.zeros(3, 3, dtype=torch.bool)):
            y_none, _ = run_ah(model, inputs)
    assert not torch.allclose(y_plain[0], y_bare[0], atol=1e-3)        # the adapters matter here
    torch.testing.assert_close(y[0], y_bare[0], rtol=1e-5, atol=1e-5)  # no adapter: the bare sub-layers
    torch.testing.assert_close(y_none, y_bare, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[2], y_plain[2], rtol=0, atol=1e-6)    # every adapter: unchanged
    assert not torch.allclose(y[1], y_plain[1], atol=1e-4)
    torch.testing.assert_close(y, y_loaded, rtol=1e-5, atol=1e-5)      # the loaded (patched) path's semantics
    assert torch.equal(y_named, y)
    assert len(probs) == len(bottleneck_layers(model))
    for p in probs.values():
        assert not p[0].any() and not p[1][..., 1].any() and (p[1][..., 0] > 0).all()
        torch.testing.assert_close(p[1].sum(-1), torch.ones(p.shape[1]), rtol=0, atol=1e-5)
    with torch.no_grad():
        for bad, err, match in [(torch.ones(3, 4, dtype=torch.bool), ValueError, r"adapter_mask must have shape"),
                                (torch.ones(3, 7, 2, dtype=torch.bool), ValueError, r"adapter_mask must have shape"),
                                (torch.ones(2, 3, dtype=torch.bool), ValueError, r"batch 2 .* 3 rows"),
                                (torch.ones(3, 3), TypeError, r"bool tensor")]:
            with fa.adapter_mask(bad), pytest.raises(err, match=match):
                model(**inputs)


def test_adapter_mask_on_a_fuse_left_on_adapterhubs_eager_path_raises():
    """AdapterHub's eager Fuse cannot mask adapters: a mask there raises instead of being dropped."""
    ah = _ah()
    model, _ = make_ah("bert", "seq_bn")
    model.add_adapter("d", config=ah.SeqBnConfig(reduction_factor=8, non_linearity="relu6"))
    other = ah.Fuse("a", "d", name="other")
    model.add_adapter_fusion(other)
    model.set_active_adapters(other)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fa.accelerate(model)
        with torch.no_grad(), fa.adapter_mask(torch.ones(2, 2, dtype=torch.bool)):
            with pytest.raises(ValueError, match="eager path.*cannot apply an adapter mask"):
                model(**tiny_inputs("bert"))
