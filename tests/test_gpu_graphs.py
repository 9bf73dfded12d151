"""CUDA graphs on a patched model (docs/compile.md): GPU only, ``benchmarks/device_check.sh`` runs them.

- ``torch.compile(mode="reduce-overhead")`` (the recommended path; Triton backend): outputs equal eager; a new mask
  object in a ``fusedadapter.adapter_mask`` block takes effect on the next replay (the mask is a graph
  input, copied in), switching masking off and on too; an in-place weight update takes effect (the
  fold runs inside the graph when compiled).
- A graph captured by hand (``torch.cuda.CUDAGraph``, ``benchmarks.devicecheck_graphs.capture``): the
  replay equals eager; new token ids and a new mask *copied into the captured tensors* take effect;
  after a weight update a fresh capture gives the new eager output (a replay of the old graph reads the
  fold cached at capture: docs/compile.md says to capture again).

Fused backends: ``triton`` and ``torch`` (and ``cuda`` for the captured graph, where the extension
loads); fp32, a 2-block BERT.
"""

import copy

import pytest
import torch

import fusedadapter as fa
from conftest import _cuda_present

ON_CUDA = _cuda_present() and torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device: CUDA graphs capture GPU work only (and "
                                           "torch.compile's reduce-overhead mode uses them only on CUDA)"),
]
N = 3


def _backend(name):
    if ON_CUDA:
        why = fa.available_backends("cuda").get(name, "not registered")
        if why is not None:
            pytest.skip(f"backend {name!r} does not load on CUDA here: {why}")
    return name


def _model(backend, layers=2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    model = BertModel(cfg).eval()
    fa.patch(model, {f"a{i}": fa.AdapterConfig(bottleneck_size=8 + 4 * i) for i in range(N)}, backend=backend)
    with torch.no_grad():  # adapters that matter: up projections away from their ~0 init
        for name, p in model.named_parameters():
            if "fusedadapter" in name:
                p.normal_(0.0, 0.3)
    return model.cuda()


def _bump(model):
    """An in-place update of the first block's adapter up projections (an optimizer step would do this)."""
    site = next(m for n, m in model.named_modules() if n.endswith("fusedadapter_output"))
    with torch.no_grad():
        for name, p in site.named_parameters():
            if "adapter_up" in name:
                p.add_(0.2)


def _eager(model, ids, mask=None):
    with torch.no_grad(), fa.adapter_mask(mask):
        return model(input_ids=ids).last_hidden_state.clone()


def _ids(seed, shape=(2, 16)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 101, shape, generator=g).cuda()


MASK_A = [[True, True, True], [True, False, True]]
MASK_B = [[False, True, True], [True, True, False]]


def _mask(rows):
    return torch.tensor(rows, device="cuda")


def _differs(a, b):
    assert (a - b).abs().max().item() > 1e-3, "the mask change did not change the output (a vacuous check)"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graph_by_hand_replays_eager_and_takes_copied_inputs(backend):
    _graph_by_hand(backend)


def test_graph_by_hand_cuda_backend():
    # its own test: device_check.sh runs it with the CUDA backend's tests, once the extension is built
    _graph_by_hand("cuda")


def _graph_by_hand(backend):
    from benchmarks.devicecheck_graphs import capture

    model = _model(_backend(backend))
    ids, mask = _ids(1), _mask(MASK_A)
    with fa.adapter_mask(mask):  # captured with a mask: its tensor is read by every replay
        graph, out = capture(model, ids)
    graph.replay()
    torch.testing.assert_close(out, _eager(model, ids, _mask(MASK_A)))
    first = out.clone()
    ids.copy_(_ids(2))  # new token ids, copied into the captured input
    graph.replay()
    torch.testing.assert_close(out, _eager(model, _ids(2), _mask(MASK_A)))
    mask.copy_(_mask(MASK_B))  # a new mask, copied into the captured mask: takes effect
    graph.replay()
    want = _eager(model, _ids(2), _mask(MASK_B))
    torch.testing.assert_close(out, want)
    _differs(want, _eager(model, _ids(2), _mask(MASK_A)))
    assert not torch.equal(out, first)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graph_by_hand_after_a_weight_update_capture_again(backend):
    from benchmarks.devicecheck_graphs import capture

    model = _model(_backend(backend))
    ids = _ids(3)
    graph, out = capture(model, ids)
    graph.replay()
    before = out.clone()
    torch.testing.assert_close(before, _eager(model, ids))
    _bump(model)
    del graph, out  # docs/compile.md: drop the old graph, then capture again
    graph, out = capture(model, ids)
    graph.replay()
    want = _eager(model, ids)
    torch.testing.assert_close(out, want)
    _differs(want, before)


@pytest.mark.parametrize("backend", ["triton"])  # (one block, one backend: inductor compiles take a while)
def test_reduce_overhead_compile_follows_masks_and_weights(backend):
    model = _model(_backend(backend), layers=1)
    twin = copy.deepcopy(model)  # eager twin with the same weights
    compiled = torch.compile(model, mode="reduce-overhead")
    ids = _ids(4)

    def run(mask=None):
        with torch.no_grad(), fa.adapter_mask(mask):
            return compiled(input_ids=ids).last_hidden_state.clone()

    rtol, atol = 1e-4, 1e-4  # inductor fuses the model's own ops differently from eager
    for _ in range(3):  # warm-up, record, replay
        got = run(_mask(MASK_A))
    torch.testing.assert_close(got, _eager(twin, ids, _mask(MASK_A)), rtol=rtol, atol=atol)
    got_b = run(_mask(MASK_B))  # a new mask object, same shape: the replay takes it
    torch.testing.assert_close(got_b, _eager(twin, ids, _mask(MASK_B)), rtol=rtol, atol=atol)
    _differs(got_b, got)
    for _ in range(2):  # masking off: another graph (dynamo guards on the mask state)
        got_none = run(None)
    torch.testing.assert_close(got_none, _eager(twin, ids), rtol=rtol, atol=atol)
    for m in (model, twin):  # an in-place weight update: the fold runs in the graph, so it takes effect
        _bump(m)
    got_w = run(_mask(MASK_A))
    want_w = _eager(twin, ids, _mask(MASK_A))
    torch.testing.assert_close(got_w, want_w, rtol=rtol, atol=atol)
    _differs(want_w, got)
