"""The routed inference path that writes each row group's output into its rows of one batch
output (fusedadapter/multitask_rows.py: run_group_into, the cpu backend's fusion_cpu_out).

Inference (``torch.inference_mode`` / ``no_grad``): every fusion the path takes (folded form on
``cpu``) writes straight into the output (rows not adjacent per fusion: into a fusion-ordered buffer,
gathered back once), the others (``residual_before``, other backends) run as usual and are copied in. Every row equals that row run alone through its
own fusion (docs/algorithm.md §4 oracle) and, bitwise, its group's own forward (the same op on the
same rows); with and without masks, with a fusion without rows.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fusedadapter.multitask_rows as rows
from fusedadapter.testing import assert_oracle
from test_multitask import FUSIONS, POOL, _backend_or_skip, _separate, make_inputs, make_multi, masks
from tiny_models import one_thread  # noqa: F401 (autouse: one intra-op thread)

F32, F64 = torch.float32, torch.float64
SORTED = ["sst", "sst", "mnli", "qqp", "qqp"]      # each fusion's rows adjacent (the slice path)
NO_MNLI = ["sst", "sst", "sst", "qqp", "qqp"]
INTERLEAVED = ["qqp", "sst", "mnli", "sst", "qqp"]  # groups run in fusion order, then one gather


@pytest.fixture
def taken(monkeypatch):
    """The fusions whose group run_group_into wrote into the batch output."""
    seen = []
    orig = rows.run_group_into

    def spy(site, *args):
        probs = orig(site, *args)
        if probs is not None:
            seen.append([n for n, s in multi_sites.items() if s is site][0])
        return probs

    multi_sites = {}
    monkeypatch.setattr(rows, "run_group_into", spy)
    return seen, multi_sites


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("mask", ["none", "batch", "token"])
@pytest.mark.parametrize("route", [SORTED, NO_MNLI, INTERLEAVED], ids=["all", "mnli-no-rows", "interleaved"])
@pytest.mark.parametrize("grad_off", ["inference_mode", "no_grad"])
def test_inference_rows_written_in_place(backend, mask, route, grad_off, taken):
    _backend_or_skip(backend)
    seen, multi_sites = taken
    multi = make_multi(2)
    inputs = make_inputs(3)
    rounded = copy.deepcopy(multi).to(F32).double()
    inputs = (inputs[0].to(F32).double(), inputs[1].to(F32).double(), inputs[2])
    adapter_mask = masks()[mask]
    dummy = torch.zeros(inputs[0].shape, dtype=F64), torch.zeros(*inputs[0].shape[:-1], len(POOL), dtype=F64)
    args = (inputs, route, False, adapter_mask, False, *dummy)
    truth = _separate(rounded, "reference", F64, *args)
    ref = _separate(multi, "reference", F32, *args)
    m = copy.deepcopy(multi).to(F32).eval()
    m.backend = backend
    multi_sites.update(m.fusions_by_name)
    a, res = inputs[0].to(F32), inputs[1].to(F32)
    ctx = torch.inference_mode() if grad_off == "inference_mode" else torch.no_grad()
    with ctx:
        out, probs = m(a, res, route=route, return_probs=True, adapter_mask=adapter_mask)
        out_only = m(a, res, route=route, adapter_mask=adapter_mask)
    assert torch.equal(out, out_only)
    assert_oracle(out.double(), ref["out"], truth["out"], F32, what=f"{backend} in-place routed output")
    assert_oracle(probs.double(), ref["probs"], truth["probs"], F32, what=f"{backend} in-place routed probs")
    # qqp (residual_before) and the torch / triton backends take the usual forward, copied in
    want = sorted({r for r in route if r != "qqp"}) if backend == "cpu" else []
    assert sorted(set(seen)) == want
    pool = m.adapter_names
    with torch.no_grad():  # bitwise: each group's own forward on its rows (the separate forwards)
        for name in dict.fromkeys(route):
            idx = torch.tensor([i for i, r in enumerate(route) if r == name])
            cols = [pool.index(n) for n in FUSIONS[name][1]]
            sub_mask = None if adapter_mask is None else adapter_mask[idx][..., cols]
            o, p = m.fusions_by_name[name](a[idx], res[idx], adapter_mask=sub_mask, return_probs=True)
            assert torch.equal(out[idx], o), name
            assert torch.equal(probs[idx][..., cols], p), name


def test_autograd_keeps_the_general_path(taken):
    seen, multi_sites = taken
    m = make_multi(2).to(F32).eval()
    m.backend = "cpu"
    _backend_or_skip("cpu")
    multi_sites.update(m.fusions_by_name)
    a, res, _ = make_inputs(3)
    out = m(a.to(F32), res.to(F32), route=SORTED)
    assert out.requires_grad and seen == []


def test_fusion_cpu_out_rejects_a_bad_buffer():
    _backend_or_skip("cpu")
    m = make_multi(2).to(F32).eval()
    site = m.fusions_by_name["mnli"]  # no ln_before: the op takes the activations as they are
    a, res, _ = make_inputs(3)
    x, r = a[:, 0].to(F32).contiguous(), res[:, 0].to(F32).contiguous()
    folded = site.folded(F32, n_tokens=x.shape[0])
    args = (x, None, r, folded.w_down, folded.b_down, folded.w_query, folded.b_query, folded.w_out,
            folded.segments, folded.activations)
    good = torch.empty(x.shape)
    with torch.no_grad():
        probs = torch.ops.fusedadapter.fusion_cpu_out(good, *args)
        want, want_p = torch.ops.fusedadapter.fusion_cpu(*args)
    assert torch.equal(good, want) and torch.equal(probs, want_p)
    for bad in (torch.empty(x.shape[0], 2 * x.shape[1])[:, :x.shape[1]], torch.empty(x.shape, dtype=F64),
                torch.empty(x.shape[0] + 1, x.shape[1])):
        with torch.no_grad(), pytest.raises(RuntimeError, match="fusion_cpu_out: out must be a contiguous"):
            torch.ops.fusedadapter.fusion_cpu_out(bad, *args)
