"""torch.compile on whole patched models: no graph breaks at the fusion sites, dynamic sequence
lengths without recompiling, compiled outputs and fusion-training gradients equal to eager.

Tiny random BERT and Llama (transformers 5.x here; 4.57 in the AdapterHub environment), the CPU
``aot_eager`` backend (dynamo and AOTAutograd, no code generation: fast). ``torch._dynamo.explain``
runs on the whole model; a break counts against fusedadapter when its reason or any frame of its
user stack lies in the fusedadapter package. Breaks elsewhere (the Hugging Face model's own code)
are not asserted on — there were none with transformers 5.24 and 4.57.6 when this was written —
and are printed with ``-s``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import fusedadapter as fa
from fusedadapter.patching import fusion_sites
from tiny_models import last_hidden, one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

PKG_DIR = os.path.dirname(os.path.abspath(fa.__file__))
ADAPTERS = {
    "a": fa.AdapterConfig(bottleneck_size=6),
    "b": fa.AdapterConfig(bottleneck_size=3, non_linearity="gelu", ln_before=True),
    "c": fa.AdapterConfig(bottleneck_size=4, non_linearity="tanh", scaling="learned"),
}


def backends():
    out = ["torch"]
    if fa.available_backends("cpu").get("cpu") is None:  # loads (builds once) the C++ op outside any trace
        out.append("cpu")
    return out


def patched(arch, placement="seq_bn", backend="torch", fusion="dynamic", seed=0):
    model = tiny_model(arch, seed=seed, dropout=False)
    fa.patch(model, ADAPTERS, fusion=fusion, placement=placement, backend=backend)
    g = torch.Generator().manual_seed(seed + 1)
    from fusedadapter.testing import perturb_

    for _, _, site in fusion_sites(model):
        perturb_(site, g)
    return model


def fusedadapter_breaks(explanation):
    """[(reason, 'file:line' of the innermost fusedadapter frame)] of breaks in fusedadapter code."""
    out = []
    for br in explanation.break_reasons:
        frames = [f for f in br.user_stack if os.path.abspath(f.filename).startswith(PKG_DIR)]
        if frames or PKG_DIR in str(br.reason):
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            out.append((str(br.reason).splitlines()[0], where))
    return out


def explain(model, inputs):
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(**inputs)
    others = len(ex.break_reasons) - len(fusedadapter_breaks(ex))
    if others:
        print(f"{type(model).__name__}: {others} graph breaks outside fusedadapter (not asserted): "
              + "; ".join(str(b.reason).splitlines()[0] for b in ex.break_reasons))
    return ex


class GraphCounter:
    """A dynamo backend (aot_eager underneath) that counts the graphs it is handed."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


@pytest.mark.parametrize("arch,placement,backend", [("bert", "seq_bn", "torch"), ("llama", "double_seq_bn", "torch"),
                                                    ("bert", "double_seq_bn", "cpu")])
def test_no_graph_breaks_in_fusedadapter(arch, placement, backend):
    if backend not in backends():
        pytest.skip(f"backend {backend!r} is not available here: {fa.available_backends('cpu')[backend]}")
    model = patched(arch, placement, backend)
    ex = explain(model, tiny_inputs(arch))
    assert fusedadapter_breaks(ex) == []
    assert ex.graph_count >= 1 and ex.op_count > 0


@pytest.mark.parametrize("arch,placement", [("bert", "double_seq_bn"), ("llama", "seq_bn")])
def test_dynamic_sequence_lengths_compile_once_and_match_eager(arch, placement):
    model = patched(arch, placement)
    counter = GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter, dynamic=True)
    graphs_after_first = None
    for batch, seq in [(2, 5), (3, 11), (4, 3)]:
        x = tiny_inputs(arch, batch=batch, seq=seq, seed=seq)
        with torch.no_grad():
            got, want = last_hidden(compiled(**x)), last_hidden(model(**x))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if graphs_after_first is None:
            graphs_after_first = counter.graphs
    assert counter.graphs == graphs_after_first, "a new sequence length or batch size recompiled the model"


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_compiled_fusion_training_step_matches_eager(arch):
    """AdapterFusion stage 2: adapters and the base model frozen, query/key/value trained."""
    eager = patched(arch).train()
    for name, p in eager.named_parameters():
        p.requires_grad_("fusedadapter_" in name and name.split(".")[-2] in ("query", "key", "value"))
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    x = tiny_inputs(arch, batch=2, seq=7)

    def step(m):
        out = last_hidden(m(**x))
        loss = out.pow(2).mean() + fa.fusion_regularization_loss(m)
        loss.backward()
        return loss.detach()

    torch.testing.assert_close(step(compiled), step(eager), rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    # the key bias adds one constant to every adapter's logit (softmax-invariant): no gradient
    assert all(g is not None for n, g in grads.items() if not n.endswith("key.bias"))
    for n, p in eager.named_parameters():
        if p.requires_grad:
            assert (grads[n] is None) == (p.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_adapter_drop_model_compiles_without_breaks():
    model = patched("bert", "double_seq_bn")
    fa.adapter_drop(model, [tiny_inputs("bert", seed=i) for i in range(2)], keep=2, skip_layers=1)
    x = tiny_inputs("bert", batch=3, seq=9)
    counter = GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(last_hidden(compiled(**x)), last_hidden(model(**x)), rtol=1e-5, atol=1e-6)
    if counter.graphs > 1:  # some break: it must not be in fusedadapter (the HF model's own are tolerated)
        assert fusedadapter_breaks(explain(model, x)) == []


def test_temperature_fusion_compiled_matches_eager():
    """``temperature=True`` lowers every site's ``T`` by 0.05 on every call; a compiled patched BERT
    follows AdapterHub's schedule as its eager twin does (T used to freeze at 49.9 under inductor
    and to recompile on every call), without recompiling, and a T set by hand takes effect."""
    eager = patched("bert", fusion={"temperature": True})
    model = copy.deepcopy(eager)
    counter = GraphCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)

    def both(seed):
        x = tiny_inputs("bert", seed=seed)
        with torch.no_grad():
            torch.testing.assert_close(last_hidden(compiled(**x)), last_hidden(eager(**x)), rtol=1e-5, atol=1e-6)

    both(0)
    first = counter.graphs
    for call in range(1, 12):
        both(call)
    t_eager = [s.T for _, _, s in fusion_sites(eager)]
    assert [s.T for _, _, s in fusion_sites(model)] == t_eager
    assert t_eager == pytest.approx([50.0 - 12 * 0.05] * len(t_eager))
    for m in (model, eager):  # by hand: a temperature that moves the probabilities
        for _, _, s in fusion_sites(m):
            s.T = 2.0
    both(12)
    assert [s.T for _, _, s in fusion_sites(model)] == [s.T for _, _, s in fusion_sites(eager)] == pytest.approx(
        [1.95] * len(t_eager))
    assert counter.graphs == first, f"recompiled: {counter.graphs - first} more graphs in 12 more calls"
    torch._dynamo.reset()


def test_compiling_a_patched_model_needs_hook_guards_or_a_reset():
    """fusedadapter patches with module hooks; dynamo does not guard on hooks by default
    (``torch._dynamo.config.skip_nnmodule_hook_guards=True``) nor on which instance of a class it
    compiled, so a patched model compiled after another instance of its class (or compiled,
    then patched) runs the cached graph without its sites. The two remedies of the docs work."""
    x = tiny_inputs("bert")
    bare = tiny_model("bert", dropout=False)
    model = patched("bert")
    with torch.no_grad():
        want, want_bare = last_hidden(model(**x)), last_hidden(bare(**x))
        assert not torch.allclose(want, want_bare, atol=1e-4)
        # remedy 1: torch._dynamo.reset() between patching and compiling
        torch._dynamo.reset()
        torch.compile(bare, backend="aot_eager")(**x)  # the bare class compiled first (hooks not guarded)
        torch._dynamo.reset()
        torch.testing.assert_close(last_hidden(torch.compile(model, backend="aot_eager")(**x)), want,
                                   rtol=1e-5, atol=1e-6)
        # remedy 2: guard on hooks, set before anything compiles
        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            torch._dynamo.reset()
            torch.compile(bare, backend="aot_eager")(**x)
            torch.testing.assert_close(last_hidden(torch.compile(model, backend="aot_eager")(**x)), want,
                                       rtol=1e-5, atol=1e-6)
            late = copy.deepcopy(bare)
            compiled = torch.compile(late, backend="aot_eager")
            torch.testing.assert_close(last_hidden(compiled(**x)), want_bare, rtol=1e-5, atol=1e-6)
            fa.patch(late, ADAPTERS, backend="torch")  # patched after it compiled
            late.load_state_dict(model.state_dict())
            torch.testing.assert_close(last_hidden(compiled(**x)), want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_patch_and_unpatch_drop_stale_compiled_graphs():
    """patch/unpatch reset dynamo themselves, so neither remedy above is needed: a model compiled
    before it was patched (or after another instance of its class) runs its fusion sites."""
    x = tiny_inputs("bert")
    with torch.no_grad():
        torch._dynamo.reset()
        bare = tiny_model("bert", dropout=False)
        want_bare = last_hidden(bare(**x))
        late = copy.deepcopy(bare)
        compiled = torch.compile(late, backend="aot_eager")
        torch.testing.assert_close(last_hidden(compiled(**x)), want_bare, rtol=1e-5, atol=1e-6)
        reference = patched("bert")
        fa.patch(late, ADAPTERS, backend="torch")  # patched after it compiled: no manual reset
        late.load_state_dict(reference.state_dict())
        want = last_hidden(reference(**x))
        assert not torch.allclose(want, want_bare, atol=1e-4)
        torch.testing.assert_close(last_hidden(compiled(**x)), want, rtol=1e-5, atol=1e-6)
        fa.unpatch(late)
        torch.testing.assert_close(last_hidden(compiled(**x)), want_bare, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
