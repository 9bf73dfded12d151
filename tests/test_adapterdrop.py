"""fusedadapter.adapter_drop: pruning against the reference with the adapters removed, skipping
against the bare model, the calibration's means, and the same call on an accelerated AdapterHub model.

Pruned models run the fused ``torch`` backend in float32; the truth is the eager reference
(``backend="reference"``) in float64 on a model built independently with only the kept adapters
(a fresh ``patch`` with their configs, their weights and the fusion's loaded by name), judged
with the docs/algorithm.md §4 oracle. Skipped blocks are compared with the bare model bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fusedadapter as fa
from conftest import requires_adapterhub
from fusedadapter.adapterdrop import skipped_layers
from fusedadapter.patching import collect_fusion_probs, fusion_sites, set_backend
from fusedadapter.testing import assert_oracle, perturb_
from tiny_models import LAYERS, last_hidden, one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

F32, F64 = torch.float32, torch.float64
NAMES = ["a", "b", "c", "d", "e"]


def adapter_configs():
    widths = [6, 3, 5, 4, 2]
    acts = [None, "gelu", "tanh", None, "swish"]
    return {n: fa.AdapterConfig(bottleneck_size=w, non_linearity=a, ln_before=(n == "c"))
            for n, w, a in zip(NAMES, widths, acts)}


def make_patched(arch, placement="seq_bn", fusion="dynamic", seed=0):
    """(patched float32 model on the torch backend, its bare twin); fusion weights perturbed."""
    model = tiny_model(arch, seed=seed, dropout=False)
    bare = copy.deepcopy(model)
    fa.patch(model, adapter_configs(), fusion=fusion, placement=placement, backend="torch")
    g = torch.Generator().manual_seed(seed + 7)
    for _, _, site in fusion_sites(model):
        perturb_(site, g)
    return model, bare


def batches(arch, n=3, seq=7):
    return [tiny_inputs(arch, batch=2, seq=seq, seed=100 + i) for i in range(n)]


def rebuilt_reference(arch, source, kept, placement, fusion="dynamic", dtype=F64):
    """A fresh model patched with only ``kept`` and the source's weights for them: the truth."""
    model = tiny_model(arch, dropout=False)
    cfgs = adapter_configs()
    fa.patch(model, {n: cfgs[n] for n in kept}, fusion=fusion, placement=placement, backend="reference")
    src = source.state_dict()
    dst = model.state_dict()
    missing = [k for k in dst if k not in src]
    assert not missing, missing
    model.load_state_dict({k: src[k] for k in dst})
    return model.to(dtype)


def run(model, inputs, dtype=F32, **kw):
    with torch.no_grad():
        return last_hidden(model(**inputs, **kw)).to(dtype)


# ------------------------------------------------------------------------------------------
# pruning
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,placement", [("bert", "seq_bn"), ("llama", "double_seq_bn"), ("distilbert", "seq_bn")])
def test_prune_matches_reference_without_the_dropped_adapters(arch, placement):
    model, _ = make_patched(arch, placement)
    original = copy.deepcopy(model)
    kept_ptrs = {n: fusion_sites(model)[0][2].adapters[n].adapter_up.weight.data_ptr() for n in NAMES}
    report = fa.adapter_drop(model, batches(arch), keep=2)

    # the two most used adapters by global mean, in fusion order
    ranked = sorted(NAMES, key=lambda n: -report.mean_probs[n])
    assert report.kept == [n for n in NAMES if n in ranked[:2]]
    assert report.dropped == [n for n in NAMES if n not in ranked[:2]]
    for _, _, site in fusion_sites(model):
        assert site.adapter_names == report.kept
        assert site.num_adapters == 2 and len(list(site.adapters.parameters())) > 0
    # in place: the kept adapters' parameter tensors are the same storage
    first = fusion_sites(model)[0][2]
    for n in report.kept:
        assert first.adapters[n].adapter_up.weight.data_ptr() == kept_ptrs[n]

    x = tiny_inputs(arch, batch=3, seq=9, seed=5)
    got = run(model, x)
    truth_model = rebuilt_reference(arch, original, report.kept, placement)
    truth = run(truth_model, x, F64)
    ref = run(truth_model.to(F32), x)
    assert_oracle(got, ref, truth, F32, what=f"{arch} pruned model")

    # the same as masking the dropped adapters out of the unpruned model (per-sample masks)
    if hasattr(fa, "adapter_mask"):
        set_backend(original, "reference")
        mask = torch.tensor([[n in report.kept for n in NAMES]] * 3)
        with fa.adapter_mask(mask, NAMES):
            masked = run(original, x)
        assert_oracle(masked, ref, truth, F32, what=f"{arch} unpruned model, dropped adapters masked")


def test_prune_per_site_each_site_keeps_its_own_top_k():
    model, _ = make_patched("bert", "double_seq_bn")
    original = {(i, loc): copy.deepcopy(site) for i, loc, site in fusion_sites(model)}
    report = fa.adapter_drop(model, batches("bert"), keep=3, per_site=True)
    assert report.per_site and set(report.site_kept) == set(original)
    g = torch.Generator().manual_seed(3)
    for i, loc, site in fusion_sites(model):
        means = report.site_probs[(i, loc)]
        top = sorted(NAMES, key=lambda n: -means[n])[:3]
        assert site.adapter_names == [n for n in NAMES if n in top] == report.site_kept[(i, loc)]
        # the pruned site against its unpruned original with the others masked out (module argument)
        a, r = torch.randn(2, 5, 32, generator=g), torch.randn(2, 5, 32, generator=g)
        full = original[(i, loc)]
        with torch.no_grad():
            out, probs = site(a, r, return_probs=True)
            full.backend = "reference"
            if hasattr(fa, "adapter_mask"):
                mask = torch.tensor([n in top for n in NAMES]).expand(2, 5).clone()
                ref, ref_probs = full(a, r, return_probs=True, adapter_mask=mask)
                truth, truth_probs = copy.deepcopy(full).double()(a.double(), r.double(), return_probs=True,
                                                                  adapter_mask=mask)
                assert_oracle(out, ref, truth, F32, what=f"site {(i, loc)}")
                keep_cols = [NAMES.index(n) for n in site.adapter_names]
                assert_oracle(probs, ref_probs[..., keep_cols], truth_probs[..., keep_cols], F32,
                              what=f"site {(i, loc)} probs")
    assert set(report.kept) == {n for k in report.site_kept.values() for n in k}


def test_calibration_means_count_unpadded_tokens_and_leave_the_model_as_it_was():
    model, _ = make_patched("bert", "double_seq_bn", fusion="static")
    for _, _, site in fusion_sites(model):
        site.T = 3.0  # a temperature in flight: calibration must not step it
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bs = batches("bert", n=2, seq=6)
    # what the report should say, from collect_fusion_probs on an eval copy
    twin = copy.deepcopy(model).eval()
    sums, count = {}, 0.0
    with torch.no_grad():
        for b in bs:
            with collect_fusion_probs(twin) as store:
                twin(**b)
            w = b["attention_mask"].to(F64)
            count += float(w.sum())
            for per_layer in store.values():
                for i, per_loc in per_layer.items():
                    for loc, p in per_loc.items():
                        s = (p.to(F64) * w[..., None]).sum((0, 1))
                        sums[(i, loc)] = sums.get((i, loc), 0) + s
            for _, _, site in fusion_sites(twin):
                site.T = 3.0
    report = fa.adapter_drop(model, bs)  # measure only
    assert report.batches == 2 and report.tokens == int(count) == 2 * (2 * 6 - 1)
    assert set(report.site_probs) == set(sums) and len(sums) == 2 * LAYERS
    for key, s in sums.items():
        want = (s / count).tolist()
        got = [report.site_probs[key][n] for n in NAMES]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    glob = [report.mean_probs[n] for n in NAMES]
    assert sum(glob) == pytest.approx(1.0, abs=1e-6)
    assert glob == pytest.approx([sum(report.site_probs[k][n] for k in sums) / len(sums) for n in NAMES])
    # nothing changed: parameters, modes, temperatures, adapter sets
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for _, _, site in fusion_sites(model):
        assert site.T == 3.0 and site.adapter_names == NAMES
    assert report.kept == NAMES and report.skipped_layers == []
    assert "mean prob" in str(report)


# ------------------------------------------------------------------------------------------
# skipping
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,placement", [("bert", "seq_bn"), ("llama", "double_seq_bn"), ("vit", "double_seq_bn")])
def test_skipped_layers_compute_what_the_bare_model_computes(arch, placement):
    model, bare = make_patched(arch, placement)
    x = tiny_inputs(arch, batch=2, seq=6, seed=3)
    with torch.no_grad():
        full = model(**x, output_hidden_states=True).hidden_states
    full_out = run(model, x)
    fa.adapter_drop(model, skip_layers=1)
    assert skipped_layers(model) == [0]
    with torch.no_grad():
        got = model(**x, output_hidden_states=True).hidden_states
        want = bare(**x, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is block i's output: block 0 is the bare block, block 1 is fused again
    assert torch.equal(got[1], want[1])
    assert not torch.allclose(got[2], want[2], atol=1e-3)
    assert not torch.allclose(full[1], want[1], atol=1e-3)  # the site did something before
    # skip every block: the bare model, bit for bit; skip none: the patched model again
    fa.adapter_drop(model, skip_layers=LAYERS)
    assert skipped_layers(model) == list(range(LAYERS))
    assert torch.equal(run(model, x), run(bare, x))
    fa.adapter_drop(model, skip_layers=0)
    assert skipped_layers(model) == []
    assert torch.equal(run(model, x), full_out)


def _requires_grad(model) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _train_step_grads(model, arch):
    """One training-mode forward and backward; (names that require grad, names that got a gradient)."""
    model.train()
    for p in model.parameters():
        p.grad = None
    last_hidden(model(**tiny_inputs(arch, seed=8))).pow(2).mean().backward()
    return _requires_grad(model), {n for n, p in model.named_parameters() if p.grad is not None}


def test_skipped_sites_are_frozen_so_every_trained_parameter_gets_a_gradient():
    """A skipped site gets no gradients, so adapter_drop freezes it (DDP's default
    find_unused_parameters=False needs a gradient for every trained parameter); a later call that
    runs it again unfreezes exactly what it froze."""
    model, _ = make_patched("llama", "double_seq_bn")
    for name, p in model.named_parameters():  # AdapterFusion stage 2
        p.requires_grad_("fusedadapter_" in name and name.split(".")[-2] in ("query", "key", "value"))
    before = _requires_grad(model)
    fa.adapter_drop(model, batches("llama"), keep=3, skip_layers=1)
    assert before - _requires_grad(model) == {n for n in before if n.startswith("layers.0.")}
    assert _requires_grad(model) == {n for n in before if n.startswith("layers.1.")}
    trained, got = _train_step_grads(model, "llama")
    assert trained == got, f"no gradient for {sorted(trained - got)}"
    fa.adapter_drop(model, skip_layers=0)  # runs block 0 again: its fusion trains again, adapters stay frozen
    assert _requires_grad(model) == before
    trained, got = _train_step_grads(model, "llama")
    assert trained == got == before


def test_skip_and_prune_together_against_the_rebuilt_reference():
    model, bare = make_patched("bert", "double_seq_bn")
    original = copy.deepcopy(model)
    report = fa.adapter_drop(model, batches("bert"), keep=2, skip_layers=[0])
    assert report.skipped_layers == [0]
    # skipped sites are not counted in the ranking, but are pruned too
    assert all(k[0] == 1 for k in report.site_probs)
    assert all(site.adapter_names == report.kept for _, _, site in fusion_sites(model))
    x = tiny_inputs("bert", batch=2, seq=8, seed=11)
    truth_model = rebuilt_reference("bert", original, report.kept, "double_seq_bn")
    fa.adapter_drop(truth_model, skip_layers=1)
    truth = run(truth_model, x, F64)
    ref = run(truth_model.to(F32), x)
    assert_oracle(run(model, x), ref, truth, F32, what="pruned + skipped")
    with torch.no_grad():
        assert torch.equal(model(**x, output_hidden_states=True).hidden_states[1],
                           bare(**x, output_hidden_states=True).hidden_states[1])


def test_pruned_model_saves_the_kept_fusion_in_adapterhub_format(tmp_path):
    model, _ = make_patched("bert")
    report = fa.adapter_drop(model, batches("bert"), keep=3)
    fa.save_adapterhub(model, str(tmp_path))
    fusion_dir = tmp_path / ",".join(NAMES)  # the fusion keeps its name, with the kept adapter_names
    fresh = fa.load_adapterhub(tiny_model("bert", dropout=False), str(fusion_dir), backend="torch")
    assert [s.adapter_names for _, _, s in fusion_sites(fresh)] == [report.kept] * LAYERS
    x = tiny_inputs("bert", seed=4)
    assert torch.equal(run(fresh, x), run(model, x))


def test_bad_arguments():
    model, bare = make_patched("bert")
    bs = batches("bert", n=1)
    with pytest.raises(ValueError, match="neither patched"):
        fa.adapter_drop(bare, bs, keep=1)
    with pytest.raises(ValueError, match="only 5 adapters"):
        fa.adapter_drop(model, bs, keep=6)
    with pytest.raises(ValueError, match="positive int"):
        fa.adapter_drop(model, bs, keep=0)
    with pytest.raises(ValueError, match="needs calibration_batches"):
        fa.adapter_drop(model, keep=2)
    with pytest.raises(ValueError, match="outside"):
        fa.adapter_drop(model, bs, skip_layers=LAYERS + 1)
    with pytest.raises(ValueError, match="measured no site"):
        fa.adapter_drop(model, [], keep=2)
    with pytest.raises(ValueError, match="measured no site"):
        fa.adapter_drop(model, bs, keep=2, skip_layers=LAYERS)
    # nothing changed by the failed calls
    assert skipped_layers(model) == []
    assert all(s.adapter_names == NAMES for _, _, s in fusion_sites(model))


# ------------------------------------------------------------------------------------------
# accelerated AdapterHub models (the AdapterHub environment)
# ------------------------------------------------------------------------------------------
@requires_adapterhub
@pytest.mark.adapterhub
def test_accelerated_adapterhub_model():
    import warnings

    import adapters

    model = tiny_model("bert", dropout=False)
    bare = copy.deepcopy(model)
    adapters.init(model)
    for n in NAMES:
        model.add_adapter(n, config=adapters.SeqBnConfig(reduction_factor=8))
    fuse = adapters.Fuse(*NAMES)
    model.add_adapter_fusion(fuse)
    model.set_active_adapters(fuse)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if hasattr(m, "adapter_fusion_layer") and len(m.adapters):
            perturb_(m.adapters, g)
            perturb_(m.adapter_fusion_layer, g)
    model.eval()
    eager = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fa.accelerate(model, backend="torch")
    report = fa.adapter_drop(model, batches("bert"), keep=2, skip_layers=1)
    ranked = sorted(NAMES, key=lambda n: -report.mean_probs[n])
    assert report.kept == [n for n in NAMES if n in ranked[:2]]
    assert list(model.adapters_config.active_setup) == report.kept
    assert model.adapters_config.skip_layers == [0] == skipped_layers(model)
    assert set(report.site_probs) == {(1, "output_adapter")}

    x = tiny_inputs("bert", seed=6)
    # AdapterHub's own eager Fuse of the kept adapters (same fusion layer) with its skip_layers
    eager.set_active_adapters(adapters.Fuse(*report.kept, name=fuse.name), skip_layers=[0])
    truth_model = copy.deepcopy(eager).double()
    got, ref, truth = run(model, x), run(eager, x), run(truth_model, x, F64)
    assert_oracle(got, ref, truth, F32, what="accelerated pruned + skipped")
    with torch.no_grad():
        assert torch.equal(model(**x, output_hidden_states=True).hidden_states[1],
                           bare(**x, output_hidden_states=True).hidden_states[1])
    with pytest.raises(ValueError, match="per_site"):
        fa.adapter_drop(model, batches("bert"), keep=1, per_site=True)


@requires_adapterhub
@pytest.mark.adapterhub
def test_accelerated_adapter_drop_freezes_what_no_longer_runs():
    """Accelerated AdapterHub model trained with its adapters (unfreeze_adapters=True): the skipped
    block's adapters and fusion layer and the dropped adapters are frozen, so every parameter that
    still requires grad gets a gradient; unskipping unfreezes the block's kept adapters and fusion."""
    import adapters

    model = tiny_model("bert", dropout=False)
    adapters.init(model)
    for n in NAMES:
        model.add_adapter(n, config=adapters.SeqBnConfig(reduction_factor=8))
    fuse = adapters.Fuse(*NAMES)
    model.add_adapter_fusion(fuse)
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if hasattr(m, "adapter_fusion_layer") and len(m.adapters):
            perturb_(m.adapters, g)
            perturb_(m.adapter_fusion_layer, g)
    model.train_adapter_fusion(fuse, unfreeze_adapters=True)
    fa.accelerate(model, backend="torch")
    before = _requires_grad(model)
    report = fa.adapter_drop(model, batches("bert"), keep=2, skip_layers=1)
    dropped = [n for n in NAMES if n not in report.kept]

    def used(name, skipped_block):
        if any(f".adapters.{d}." in name for d in dropped):
            return False
        return skipped_block is None or not name.startswith(f"encoder.layer.{skipped_block}.")

    assert _requires_grad(model) == {n for n in before if used(n, 0)}
    trained, got = _train_step_grads(model, "bert")
    assert trained == got, f"no gradient for {sorted(trained - got)}"
    fa.adapter_drop(model, skip_layers=0)
    assert _requires_grad(model) == {n for n in before if used(n, None)}
    trained, got = _train_step_grads(model, "bert")
    assert trained == got, f"no gradient for {sorted(trained - got)}"
