"""The eager reference against AdapterHub's own modules (runs in the AdapterHub environment).

Same weights, same inputs: AdapterHub's `Adapter` (adapters.methods.modeling) produces the
stacked up-projections and its `BertFusion` fuses them; our `FusedAdapterFusion` with
backend="reference" must match to a max relative error of 1e-6 in fp32 (both presets, every
flag, mixed widths and activations, eval and train with a replayed dropout draw).
"""

import pytest
import torch

import fusedadapter as fa
from cases import ADAPTERHUB_ACTIVATIONS, ADAPTERHUB_FLAG_SETS, flags_id
from conftest import requires_adapterhub
from fusedadapter.testing import perturb_, rel_err

pytestmark = requires_adapterhub

ACTS = ADAPTERHUB_ACTIVATIONS


class ReplayDropout(torch.nn.Module):
    """Stands in for BertFusion.dropout: applies a given keep-mask with the 1/(1-p) scaling."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.to(x.dtype) / (1.0 - self.p)


def build_pair(hidden, widths, acts, preset, flags, ln_before=(), scalings=None, seed=0, dropout=0.1):
    from adapters.configuration import AdapterFusionConfig, SeqBnConfig
    from adapters.methods.modeling import Adapter, BertFusion

    g = torch.Generator().manual_seed(seed)
    cfgs, ah_adapters = [], []
    for i, (w, act) in enumerate(zip(widths, acts)):
        sc = scalings[i] if scalings else 1.0
        cfgs.append(fa.AdapterConfig(bottleneck_size=w, non_linearity=act, ln_before=i in ln_before, scaling=sc))
        bn = SeqBnConfig(reduction_factor=hidden / w, non_linearity=act, ln_before=i in ln_before, scaling=sc)
        ah_adapters.append(Adapter(f"a{i}", hidden, w, bn))
    fcfg = fa.FusionConfig.load(preset, **flags)
    ours = fa.FusedAdapterFusion(hidden, {f"a{i}": c for i, c in enumerate(cfgs)}, fcfg, backend="reference",
                                 attention_dropout=dropout)
    perturb_(ours, g)
    ah_config = AdapterFusionConfig.load(preset, **flags)
    # as BottleneckLayer.add_fusion_layer: `fusion_config.dropout_prob or attention_probs_dropout_prob`
    ah_fusion = BertFusion(ah_config, hidden, ah_config.dropout_prob or dropout)
    for i, ad in enumerate(ah_adapters):
        ad.load_state_dict(ours.adapters[f"a{i}"].state_dict())
    missing, unexpected = ah_fusion.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("adapters.")}, strict=False)
    assert not unexpected and all(k.startswith("dense") for k in missing)
    return ours, ah_adapters, ah_fusion


def run_adapterhub(ah_adapters, ah_fusion, a, res, q, train, keep):
    for m in ah_adapters + [ah_fusion]:
        m.train(train)
    if train:
        ah_fusion.dropout = ReplayDropout(keep, ah_fusion.dropout.p)
    ups = torch.stack([ad(a, residual_input=res)[2] for ad in ah_adapters])  # as compose_fuse
    up_list = ups.permute(1, 2, 0, 3)
    out, probs = ah_fusion(q, up_list, up_list, res, output_attentions=True)
    return out, torch.as_tensor(probs)


FLAG_SETS = ADAPTERHUB_FLAG_SETS


@pytest.mark.parametrize("preset", ["dynamic", "static"])
@pytest.mark.parametrize("flags", FLAG_SETS, ids=flags_id)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_reference_matches_adapterhub(preset, flags, train):
    hidden, widths = 48, [6, 12, 3, 8]
    acts = ["relu", "gelu", "swish", "tanh"]
    ours, ah_adapters, ah_fusion = build_pair(hidden, widths, acts, preset, flags, ln_before=(2,),
                                              scalings=[1.0, 0.5, "learned", "channel"], seed=len(flags))
    assert ours.dropout_p == ah_fusion.dropout.p
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, hidden, generator=g)
    res = torch.randn(2, 5, hidden, generator=g)
    q = torch.randn(2, 5, hidden, generator=g) if flags.get("query_before_ln") else a
    keep = torch.rand(2, 5, len(widths), generator=g) > ours.dropout_p
    ours.train(train)
    for _ in range(3 if flags.get("temperature") else 1):  # the temperature falls on every call
        out_ah, p_ah = run_adapterhub(ah_adapters, ah_fusion, a, res.clone(), q, train, keep)
        out, p = ours(a, res, None if q is a else q, return_probs=True, dropout_mask=keep if train else None)
        assert rel_err(out, out_ah) <= 1e-6
        assert rel_err(p, p_ah) <= 1e-6
        assert ours.T == pytest.approx(ah_fusion.T)


@pytest.mark.parametrize("act", ACTS)
def test_every_activation_matches_adapterhub(act):
    ours, ah_adapters, ah_fusion = build_pair(32, [4, 7], [act, act], "dynamic", {})
    a, res = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
    out_ah, p_ah = run_adapterhub(ah_adapters, ah_fusion, a, res.clone(), a, False, None)
    out, p = ours.eval()(a, res, return_probs=True)
    assert rel_err(out, out_ah) <= 1e-6 and rel_err(p, p_ah) <= 1e-6


def test_gradients_match_adapterhub():
    ours, ah_adapters, ah_fusion = build_pair(32, [4, 7, 5], ["relu", "gelu", "swish"], "dynamic", {})
    a, res = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    keep = torch.rand(2, 3, 3) > 0.1
    out_ah, _ = run_adapterhub(ah_adapters, ah_fusion, a, res.clone(), a, True, keep)
    out_ah.pow(2).sum().backward()
    ours.train()
    ours(a, res, dropout_mask=keep).pow(2).sum().backward()
    for name in ("query.weight", "key.weight", "key.bias", "value.weight"):
        theirs = dict(ah_fusion.named_parameters())[name].grad
        mine = dict(ours.named_parameters())[name].grad
        assert rel_err(mine, theirs) <= 1e-6, name


def test_preset_defaults_match_adapterhub():
    from adapters.configuration import AdapterFusionConfig

    for preset in ("dynamic", "static"):
        theirs = AdapterFusionConfig.load(preset).to_dict()
        mine = fa.FusionConfig.load(preset).to_dict()
        for key, value in mine.items():
            assert theirs[key] == value, (preset, key)
