"""Threads sharing one model (a server's requests): every call's output is the single-threaded one.

Two threads, 100 calls each, released together by a ``threading.Barrier`` and switching every
few microseconds (``sys.setswitchinterval``), call one model with their own inputs; each call is
plain, under the thread's own ``fa.adapter_mask`` (the two threads' masks differ), or collects
the fusion probabilities (``collect_fusion_probs`` / AdapterHub's
``output_adapter_fusion_attentions``). Every output and every collected probability must equal,
bit for bit, what the same call returns on one thread (one intra-op thread: the arithmetic is
deterministic). Models: a patched tiny BERT, one loaded with ``load_adapterhub`` and (AdapterHub
environment) an accelerated AdapterHub model.
"""

from __future__ import annotations

import copy
import sys
import threading

import pytest
import torch

import fusedadapter as fa
from conftest import requires_adapterhub
from fusedadapter.patching import collect_fusion_probs, fusion_sites
from fusedadapter.testing import perturb_
from threads_helper import run_together
from tiny_models import last_hidden, one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

N_THREADS = 2
N_CALLS = 100
BATCH, SEQ = 3, 8
ADAPTERS = {
    "a": fa.AdapterConfig(bottleneck_size=6),
    "b": fa.AdapterConfig(bottleneck_size=3, non_linearity="gelu", ln_before=True),
    "c": fa.AdapterConfig(bottleneck_size=4, non_linearity="tanh", scaling="learned"),
}
# Thread t's mask (batch 3 x adapters 3): different rows masked in each thread, one row bare.
MASKS = [
    torch.tensor([[True, False, True], [False, False, False], [True, True, True]]),
    torch.tensor([[False, True, True], [True, False, False], [False, False, False]]),
]
MODES = ("plain", "mask", "collect", "collect+mask")


@pytest.fixture(autouse=True)
def fast_switching():
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the interpreter switches threads every ~10 us: calls interleave
    yield
    sys.setswitchinterval(old)


def patched_bert(seed=0):
    model = tiny_model("bert", seed=seed, dropout=False)
    fa.patch(model, ADAPTERS, backend="torch")
    g = torch.Generator().manual_seed(seed + 1)
    for _, _, site in fusion_sites(model):
        perturb_(site, g)
    return model


def thread_inputs(arch="bert"):
    return [tiny_inputs(arch, batch=BATCH, seq=SEQ, seed=10 + t) for t in range(N_THREADS)]


def patched_call(model, inputs, mask, mode):
    """(last hidden state, {(fusion, layer, location): probs} or None) of one call."""
    with torch.no_grad(), fa.adapter_mask(mask if "mask" in mode else None):
        if not mode.startswith("collect"):
            return last_hidden(model(**inputs)), None
        with collect_fusion_probs(model) as store:
            out = last_hidden(model(**inputs))
    probs = {(f, i, loc): p for f, per in store.items() for i, locs in per.items() for loc, p in locs.items()}
    return out, probs


def run_threads(call, inputs, masks):
    """Each thread t runs N_CALLS calls (modes in turn, shifted per thread); returns the mismatches
    against the single-threaded results, as strings."""
    want = {(t, mode): call(inputs[t], masks[t], mode) for t in range(N_THREADS) for mode in MODES}
    assert not torch.equal(want[0, "plain"][0], want[0, "mask"][0])  # the mask matters
    assert want[0, "collect"][1] and want[0, "collect"][1].keys() == want[1, "collect+mask"][1].keys()
    bad = []

    def body(t):
        for i in range(N_CALLS):
            mode = MODES[(i + t) % len(MODES)]
            out, probs = call(inputs[t], masks[t], mode)
            w_out, w_probs = want[t, mode]
            if not torch.equal(out, w_out):
                bad.append(f"thread {t} call {i} ({mode}): output off by {(out - w_out).abs().max().item():.3g}")
            if (probs is None) != (w_probs is None) or (probs is not None and (
                    probs.keys() != w_probs.keys() or not all(torch.equal(probs[k], w_probs[k]) for k in probs))):
                bad.append(f"thread {t} call {i} ({mode}): collected probabilities differ")

    run_together(N_THREADS, body)
    return bad


def test_patched_model_under_threads():
    model = patched_bert()
    bad = run_threads(lambda x, m, mode: patched_call(model, x, m, mode), thread_inputs(), MASKS)
    assert not bad, f"{len(bad)} wrong of {N_THREADS * N_CALLS * 2} checks; first: {bad[:3]}"


def test_loaded_model_under_threads(tmp_path):
    source = patched_bert(seed=3)
    fa.save_adapterhub(source, str(tmp_path))
    model = tiny_model("bert", seed=3, dropout=False)
    fa.load_adapterhub(model, str(tmp_path / "a,b,c"), backend="torch")
    inputs = thread_inputs()
    with torch.no_grad():  # the loaded model is the patched one
        assert torch.equal(last_hidden(model(**inputs[0])), last_hidden(source(**inputs[0])))
    bad = run_threads(lambda x, m, mode: patched_call(model, x, m, mode), inputs, MASKS)
    assert not bad, f"{len(bad)} wrong of {N_THREADS * N_CALLS * 2} checks; first: {bad[:3]}"


def test_collect_block_in_one_thread_sees_only_its_own_calls():
    """A long collect block in thread A while thread B calls the model without one: A's store
    holds A's probabilities only, and B's calls are plain calls."""
    model = patched_bert()
    inputs = thread_inputs()
    want_a = patched_call(model, inputs[0], None, "collect")
    want_b = patched_call(model, inputs[1], None, "plain")[0]
    barrier = threading.Barrier(2)
    bad, errors = [], []

    def thread_a():
        try:
            with torch.no_grad(), collect_fusion_probs(model) as store:
                barrier.wait(60)
                for i in range(N_CALLS):
                    store.clear()
                    model(**inputs[0])
                    got = {(f, j, loc): p for f, per in store.items() for j, locs in per.items()
                           for loc, p in locs.items()}
                    if got.keys() != want_a[1].keys() or not all(torch.equal(got[k], want_a[1][k]) for k in got):
                        bad.append(f"A call {i}: store differs")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    def thread_b():
        try:
            barrier.wait(60)
            for i in range(N_CALLS):
                with torch.no_grad():
                    if not torch.equal(last_hidden(model(**inputs[1])), want_b):
                        bad.append(f"B call {i}: output differs")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    if errors:
        raise errors[0]
    assert not bad, f"{len(bad)} wrong; first: {bad[:3]}"


def test_deep_copy_and_unpatch_after_threaded_calls():
    """The per-thread hook state neither blocks a deep copy nor survives it; unpatch still finds
    every hook (by runtime identity) on the original and on the copy."""
    bare = tiny_model("bert", dropout=False)
    model = patched_bert()
    inputs = thread_inputs()
    t = threading.Thread(target=lambda: patched_call(model, inputs[1], MASKS[1], "collect+mask"))
    t.start()
    t.join()
    clone = copy.deepcopy(model)
    for mode in MODES:
        a, b = patched_call(model, inputs[0], MASKS[0], mode), patched_call(clone, inputs[0], MASKS[0], mode)
        assert torch.equal(a[0], b[0])
    with torch.no_grad():
        want = last_hidden(bare(**inputs[0]))
        for unpatched in (fa.unpatch(model), fa.unpatch(clone)):
            assert torch.equal(last_hidden(unpatched(**inputs[0])), want)
            assert not any(m._forward_hooks or m._forward_pre_hooks for m in unpatched.modules())


# ------------------------------------------------------------------------------------------
# AdapterHub: an accelerated model (adapters 1.3.0, transformers 4.57: .venv-ah)
# ------------------------------------------------------------------------------------------
def accelerated_bert():
    import adapters

    model = tiny_model("bert", seed=4, dropout=False)
    adapters.init(model)
    model.add_adapter("a", config=adapters.SeqBnConfig(reduction_factor=4))
    model.add_adapter("b", config=adapters.SeqBnConfig(reduction_factor=6, non_linearity="gelu", ln_before=True))
    model.add_adapter("c", config=adapters.SeqBnConfig(reduction_factor=11, non_linearity="tanh"))
    fuse = adapters.Fuse("a", "b", "c")
    model.add_adapter_fusion(fuse, config="dynamic")
    model.set_active_adapters(fuse)
    g = torch.Generator().manual_seed(6)
    for m in model.modules():
        if type(m).__name__ == "BottleneckLayer" and len(m.adapters):
            perturb_(m.adapters, g)
            perturb_(m.adapter_fusion_layer, g)
    return fa.accelerate(model.eval(), backend="torch")


def accelerated_call(model, inputs, mask, mode):
    collect = mode.startswith("collect")
    with torch.no_grad(), fa.adapter_mask(mask if "mask" in mode else None):
        out = model(**inputs, output_adapter_fusion_attentions=collect)
    if not collect:
        return last_hidden(out), None
    probs = {(f, i, loc): torch.from_numpy(p) for f, per in out.adapter_fusion_attentions.items()
             for i, locs in per.items() for loc, p in locs.items()}
    return last_hidden(out), probs


@requires_adapterhub
def test_accelerated_adapterhub_model_under_threads():
    model = accelerated_bert()
    bad = run_threads(lambda x, m, mode: accelerated_call(model, x, m, mode), thread_inputs(), MASKS)
    assert not bad, f"{len(bad)} wrong of {N_THREADS * N_CALLS * 2} checks; first: {bad[:3]}"
