"""fusedadapter.patch / unpatch on every supported architecture (tiny random models).

The patched model is checked against a hand-written reference placement: each block's forward
(or, for the BERT family, each sub-layer output module's forward) re-written here from the
transformers 5.x source with AdapterHub's site inserted explicitly, calling the same site
modules with ``backend="reference"``. Then the fused backend against that reference with the
docs/algorithm.md §4 oracle, and ``unpatch`` against the untouched model, bit for bit.
"""

from __future__ import annotations

import copy
import inspect
import types
from functools import partial

import pytest
import torch
import transformers

import fusedadapter as fa
from fusedadapter.patching import (SUPPORTED_ARCHITECTURES, UnsupportedArchitecture, collect_fusion_probs,
                                   fusion_sites, set_backend)
from fusedadapter.testing import assert_oracle, perturb_
from tiny_models import ARCHS, last_hidden, one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
needs_5 = pytest.mark.skipif(not TRANSFORMERS_5, reason="the hand-written references follow transformers 5.x blocks")

ADAPTERS = {  # mixed widths, activations, scalings, one with its own LayerNorm
    "a": fa.AdapterConfig(bottleneck_size=8, non_linearity=None),
    "b": fa.AdapterConfig(bottleneck_size=5, non_linearity="gelu", ln_before=True, scaling="learned"),
    "c": fa.AdapterConfig(bottleneck_size=3, non_linearity="tanh", scaling="channel"),
}


# ------------------------------------------------------------------------------------------
# hand-written reference placement (AdapterHub's Adapter.pre_forward, then the block's own code)
# ------------------------------------------------------------------------------------------
def site_ref(sites, loc, h, x, ln, placement, query_before_ln):
    site = sites.get(loc)
    if site is None:
        return h
    if placement == "seq_bn":  # original_ln_before=True, residual_before_ln=True
        s = h + x
        a = ln(s) if ln is not None else s
    else:  # double_seq_bn: original_ln_before=False
        a = h
    return site(a, h, h if query_before_ln else None)


def _bound(layer, args, kwargs):
    b = inspect.signature(type(layer).forward).bind(layer, *args, **kwargs)
    b.apply_defaults()
    d = dict(b.arguments)
    d.pop("self")
    extra = d.pop("kwargs", {})
    return d, extra


def _bert_output(mod, hidden_states, input_tensor, *, sites, loc, placement, qbl):
    h = mod.dropout(mod.dense(hidden_states))
    h = site_ref(sites, loc, h, input_tensor, mod.LayerNorm, placement, qbl)
    return mod.LayerNorm(h + input_tensor)


def _distilbert_block(layer, *args, sites, placement, qbl, **kwargs):
    d, extra = _bound(layer, args, kwargs)
    x = d.pop("hidden_states")
    attn, _ = layer.attention(x, attention_mask=d["attention_mask"], **extra)
    attn = site_ref(sites, "mh_adapter", attn, x, layer.sa_layer_norm, placement, qbl)
    a1 = layer.sa_layer_norm(attn + x)
    f = site_ref(sites, "output_adapter", layer.ffn(a1), a1, layer.output_layer_norm, placement, qbl)
    return layer.output_layer_norm(f + a1)


def _vit_block(layer, *args, sites, placement, qbl, **kwargs):
    d, extra = _bound(layer, args, kwargs)
    x = d.pop("hidden_states")
    h, _ = layer.attention(layer.layernorm_before(x), d["attention_mask"], **extra)
    h = layer.dropout(h)
    hs = site_ref(sites, "mh_adapter", h, x, None, placement, qbl) + x
    h2 = layer.dropout(layer.mlp(layer.layernorm_after(hs)))
    return site_ref(sites, "output_adapter", h2, hs, None, placement, qbl) + hs


def _gpt2_block(layer, *args, sites, placement, qbl, **kwargs):
    d, extra = _bound(layer, args, kwargs)
    x = d.pop("hidden_states")
    assert d["encoder_hidden_states"] is None
    h, _ = layer.attn(layer.ln_1(x), cache=d["cache"], attention_mask=d["attention_mask"], use_cache=d["use_cache"],
                      **extra)
    hs = site_ref(sites, "mh_adapter", h, x, None, placement, qbl) + x
    h2 = layer.mlp(layer.ln_2(hs))
    return hs + site_ref(sites, "output_adapter", h2, hs, None, placement, qbl)


def _llama_block(layer, *args, sites, placement, qbl, **kwargs):  # Llama, Mistral, Qwen2
    d, extra = _bound(layer, args, kwargs)
    x = d.pop("hidden_states")
    h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **d, **extra)
    hs = x + site_ref(sites, "mh_adapter", h, x, None, placement, qbl)
    h2 = layer.mlp(layer.post_attention_layernorm(hs))
    return hs + site_ref(sites, "output_adapter", h2, hs, None, placement, qbl)


_BLOCK_REFS = {"distilbert": _distilbert_block, "vit": _vit_block, "gpt2": _gpt2_block, "llama": _llama_block,
               "mistral": _llama_block, "qwen2": _llama_block}


def install_reference(model, arch, sites_by_layer, placement, qbl):
    """Re-write the blocks of ``model`` (an unpatched copy) with the sites inserted by hand."""
    base = model.base_model
    layers = base.layers if arch == "vit" and hasattr(base, "layers") else (
        base.transformer.layer if arch == "distilbert" else (base.h if arch == "gpt2" else (
            base.layers if arch in ("llama", "mistral", "qwen2") else base.encoder.layer)))
    for i, layer in enumerate(layers):
        sites = sites_by_layer.get(i, {})
        if arch in _BLOCK_REFS:
            layer.forward = types.MethodType(partial(_BLOCK_REFS[arch], sites=sites, placement=placement, qbl=qbl),
                                             layer)
        else:  # BERT family: the two output modules see both h and x
            for loc, mod in (("mh_adapter", layer.attention.output), ("output_adapter", layer.output)):
                mod.forward = partial(_bert_output, mod, sites=sites, loc=loc, placement=placement, qbl=qbl)


def _run(model, inputs):
    with torch.no_grad():
        return last_hidden(model(**inputs))


def _perturbed_patch(model, placement, fusion="dynamic", backend="reference", seed=3):
    fa.patch(model, ADAPTERS, fusion=fusion, placement=placement, backend=backend)
    g = torch.Generator().manual_seed(seed)
    for _, _, site in fusion_sites(model):
        perturb_(site, g)
    return model


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


# ------------------------------------------------------------------------------------------
@needs_5
@pytest.mark.parametrize("placement", ["seq_bn", "double_seq_bn"])
@pytest.mark.parametrize("arch", ARCHS)
def test_patch_matches_hand_written_placement_and_unpatch_restores(arch, placement):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    reference_model = copy.deepcopy(model)
    y0 = _run(model, inputs)
    state0, hooks0 = _state(model), _hook_counts(model)

    _perturbed_patch(model, placement)
    sites = fusion_sites(model)
    assert len(sites) == 2 * (2 if placement == "double_seq_bn" else 1)
    with collect_fusion_probs(model) as probs:
        y_patch = _run(model, inputs)

    by_layer = {}
    for i, loc, site in sites:
        by_layer.setdefault(i, {})[loc] = site
    install_reference(reference_model, arch, by_layer, placement, qbl=False)
    y_ref = _run(reference_model, inputs)
    assert torch.equal(y_patch, y_ref), (y_patch - y_ref).abs().max()
    assert not torch.equal(y_patch, y0)

    # fusion probabilities: one (B, T, N) tensor per site, rows sum to one
    got = probs["a,b,c"]
    assert sorted((i, loc) for i, locs in got.items() for loc in locs) == sorted((i, loc) for i, loc, _ in sites)
    for locs in got.values():
        for p in locs.values():
            assert p.shape == (*y0.shape[:2], 3)
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))

    # the fused backend against the reference placement (docs/algorithm.md §4 oracle, truth in float64)
    set_backend(model, "torch")
    y_torch = _run(model, inputs)
    truth_model = copy.deepcopy(reference_model).double()
    by_layer64 = {i: {loc: copy.deepcopy(s).double() for loc, s in locs.items()} for i, locs in by_layer.items()}
    install_reference(truth_model, arch, by_layer64, placement, qbl=False)
    truth = _run(truth_model, tiny_inputs(arch, dtype=torch.float64))
    assert_oracle(y_torch, y_ref, truth, torch.float32, what=f"{arch} {placement} patched torch backend")

    fa.unpatch(model)
    assert torch.equal(_run(model, inputs), y0)
    state1 = model.state_dict()
    assert list(state1) == list(state0) and all(torch.equal(state1[k], state0[k]) for k in state0)
    assert _hook_counts(model) == hooks0


@needs_5
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_static_preset_and_query_before_ln(arch):
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    reference_model = copy.deepcopy(model)
    fusion = fa.FusionConfig.load("static", query_before_ln=True)
    _perturbed_patch(model, "seq_bn", fusion=fusion)
    sites = fusion_sites(model)
    assert all(s.value is None for _, _, s in sites)
    y = _run(model, inputs)
    install_reference(reference_model, arch, {i: {loc: s} for i, loc, s in sites}, "seq_bn", qbl=True)
    assert torch.equal(y, _run(reference_model, inputs))


def test_default_activation_follows_placement():
    for placement, act in (("seq_bn", "relu"), ("double_seq_bn", "swish")):
        model = tiny_model("bert")
        fa.patch(model, [fa.AdapterConfig(non_linearity=None), fa.AdapterConfig(non_linearity="tanh")],
                 placement=placement)
        for _, _, site in fusion_sites(model):
            assert [a.activation_name for a in site.adapters.values()] == [act, "tanh"]
            assert site.adapters["0"].bottleneck_size == 32 // 16
        fa.unpatch(model)


def test_patched_model_with_head_trains_and_keeps_names():
    model = tiny_model("roberta", head=True, dropout=False)
    fa.patch(model, {"x": fa.AdapterConfig(reduction_factor=4), "y": fa.AdapterConfig(bottleneck_size=3)})
    names = [n for n, _ in model.named_parameters() if "fusedadapter" in n]
    assert "roberta.encoder.layer.0.fusedadapter_output.adapters.x.adapter_down.0.weight" in names
    assert "roberta.encoder.layer.1.fusedadapter_output.value.weight" in names
    for n, p in model.named_parameters():
        p.requires_grad_("fusedadapter_output" in n and ".adapters." not in n)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    inputs = tiny_inputs("roberta")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**inputs, labels=torch.tensor([0, 2])).loss + fa.fusion_regularization_loss(model)
    loss.backward()
    opt.step()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any(n.endswith("query.weight") for n in changed) and any(n.endswith("value.weight") for n in changed)


def test_collect_probs_is_scoped_and_works_under_torch_compile():
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    _perturbed_patch(model, "double_seq_bn", backend="torch")
    y = _run(model, inputs)
    with collect_fusion_probs(model) as probs:
        _run(model, inputs)
    n_sites = len(fusion_sites(model))
    assert sum(len(v) for v in probs["a,b,c"].values()) == n_sites
    with collect_fusion_probs(model) as probs2:
        pass
    assert probs2 == {}
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(_run(compiled, inputs), y, rtol=0, atol=1e-6)
    torch._dynamo.reset()


def test_errors_and_double_patch():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="unknown placement 'parallel'"):
        fa.patch(model, [fa.AdapterConfig()], placement="parallel")
    with pytest.raises(ValueError, match="unknown backend"):
        fa.patch(model, [fa.AdapterConfig()], backend="fast")
    with pytest.raises(ValueError, match="unknown fusion preset"):
        fa.patch(model, [fa.AdapterConfig()], fusion="fancy")
    with pytest.raises(TypeError, match="expected an AdapterConfig"):
        fa.patch(model, ["seq_bn"])
    with pytest.raises(ValueError, match="at least one"):
        fa.patch(model, [])
    with pytest.raises(ValueError, match="without '.'"):
        fa.patch(model, {"a.b": fa.AdapterConfig()})
    with pytest.raises(ValueError, match="neither patched"):
        fa.unpatch(model)
    assert not any("fusedadapter" in n for n, _ in model.named_parameters())  # failed calls changed nothing
    fa.patch(model, [fa.AdapterConfig()])
    with pytest.raises(ValueError, match="already patched"):
        fa.patch(model, [fa.AdapterConfig()])
    fa.unpatch(model)


def test_unsupported_architecture_lists_the_supported_ones():
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    model = transformers.T5EncoderModel(config)
    with pytest.raises(UnsupportedArchitecture) as info:
        fa.patch(model, [fa.AdapterConfig()])
    msg = str(info.value)
    assert "'t5'" in msg
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in msg
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fa.patch(torch.nn.Linear(2, 2), [fa.AdapterConfig()])


def test_patch_inside_inference_mode_and_float64():
    model = tiny_model("gpt2").double()
    inputs = tiny_inputs("gpt2")
    with torch.inference_mode():
        fa.patch(model, [fa.AdapterConfig(bottleneck_size=4)] * 2, placement="double_seq_bn")
        y = last_hidden(model(**inputs))
    assert y.dtype == torch.float64
    assert all(p.dtype == torch.float64 and not p.is_inference() for _, _, s in fusion_sites(model)
               for p in s.parameters())
    fa.unpatch(model)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_gradient_checkpointing(arch):
    """Recomputation runs the hooks again, in order: same gradients as without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(arch, dropout=False)
        _perturbed_patch(model, "double_seq_bn", backend="torch")
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        y = last_hidden(model(**tiny_inputs(arch)))
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "fusedadapter" in n and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_patch_record_has_one_patched_site_per_site_and_the_split_modules_stay_small():
    """The record holds a PatchedSite dataclass per site (no dicts read by string key); the table and
    the hooks live in their own modules, re-exported from patching; none of the three over ~450 lines."""
    import dataclasses
    from pathlib import Path

    from fusedadapter import architectures, hooks, patching

    model = tiny_model("distilbert")
    fa.patch(model, {"a": fa.AdapterConfig(bottleneck_size=4), "b": fa.AdapterConfig(bottleneck_size=3)},
             placement="double_seq_bn")
    record = patching.patch_record(model)
    n_layers = len(architectures.find_layers(model, architectures.arch_spec(model)))
    assert len(record.sites) == 2 * n_layers
    assert [f.name for f in dataclasses.fields(patching.PatchedSite)] == [
        "layer_idx", "location", "layer_name", "child", "runtime", "ah_path", "module"]
    names = dict(model.named_modules())
    for site in record.sites:
        assert isinstance(site, patching.PatchedSite)
        assert isinstance(site.runtime, hooks._SiteRuntime) and site.runtime.fusion is site.module
        assert (site.runtime.layer_idx, site.runtime.location) == (site.layer_idx, site.location)
        assert names[f"{site.layer_name}.{site.child}"] is site.module
        assert site.ah_path == {"mh_adapter": "attention_adapters", "output_adapter": "output_adapters"}[site.location]
    assert [(i, loc, m) for i, loc, m in fusion_sites(model)] == [(s.layer_idx, s.location, s.module)
                                                                  for s in record.sites]
    fa.unpatch(model)
    assert not any("fusedadapter" in n for n, _ in model.named_parameters())
    for name in ("SUPPORTED_ARCHITECTURES", "PLACEMENTS", "SiteSpec", "ArchSpec", "UnsupportedArchitecture",
                 "get_module", "arch_spec", "find_layers", "resolve_site", "ah_prefix"):
        assert getattr(patching, name) is getattr(architectures, name), name
    for name in ("_SiteRuntime", "_capture_hook", "_output_hook"):
        assert getattr(patching, name) is getattr(hooks, name), name
    for mod in (patching, architectures, hooks):
        lines = len(Path(mod.__file__).read_text().splitlines())
        assert lines <= 450, f"{mod.__name__}: {lines} lines"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fusion_regularization_loss_is_adapterhubs_formula_bit_for_bit(dtype):
    """fa.fusion_regularization_loss runs one autograd node per value matrix (issue 11: the eager
    sub / pow / neg chain cost ~3x more per stage-2 step) with AdapterHub's value and gradients bit
    for bit: ``0.01 * (I - W_V).pow(2).sum()`` summed over the trained value matrices."""
    model = fa.patch(tiny_model("bert"), ADAPTERS, fusion="dynamic", placement="double_seq_bn").to(dtype)
    values = [site.value.weight for _, _, site in fusion_sites(model)]
    with torch.no_grad():
        for w in values:
            w.add_(0.01 * torch.randn_like(w))
    values[0].requires_grad_(False)  # only the trained ones count
    loss = fa.fusion_regularization_loss(model)
    (loss * 1.7).backward()
    got = [None if w.grad is None else w.grad.clone() for w in values]
    for w in values:
        w.grad = None
    want = None
    for w in values[1:]:
        eye = torch.zeros(w.shape, dtype=dtype).fill_diagonal_(1.0)
        term = 0.01 * (eye - w).pow(2).sum()
        want = term if want is None else want + term
    (want * 1.7).backward()
    assert torch.equal(loss, want) and got[0] is None
    assert all(torch.equal(g, w.grad) for g, w in zip(got[1:], values[1:]))
    assert "_IdentityDistanceBackward" in type(loss.grad_fn.next_functions[0][0]).__name__ + str(
        [type(f).__name__ for f, _ in loss.grad_fn.next_functions])
