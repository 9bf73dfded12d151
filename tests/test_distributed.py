"""Fusion training of a patched model on existing engines (the recipes of docs/distributed.md).

* ``DistributedDataParallel`` over gloo, 2 CPU processes (``torch.multiprocessing.spawn``, a file
  rendezvous): gradients and parameters bit-identical across ranks, and equal to one process
  training on the same global batch.
* FSDP2 (``torch.distributed.fsdp.fully_shard``) over gloo on CPU, the same checks (skips, with
  the reason, where the installed torch cannot shard on CPU / gloo).
* Hugging Face ``Trainer`` with a small subclass that adds ``fusedadapter.fusion_regularization_loss``.
* DDP with its **default arguments** (``find_unused_parameters=False``, which fails on the second
  step if a trained parameter gets no gradient): patched BERT and Llama (attention dropout 0, so no
  logit dropout: the fusion key bias cancels in the softmax and must still get its exact zero
  gradient), the same after ``adapter_drop`` (the skipped sites are frozen), and an accelerated
  AdapterHub BERT with ``attention_probs_dropout_prob=0`` (AdapterHub environment). All DDP runs
  share one 2-process spawn (a spawn costs ~30 s on a busy 2-core machine).

AdapterFusion stage 2 throughout: a tiny random model with a classification head, three adapters
and the dynamic fusion; the base model and the adapters frozen; the fusion's query / key / value
(and, patched, the head) trained. Dropout is off (the ranks of a DDP run draw different
logit-dropout masks than one process does on the whole batch, so only then can the runs agree).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedadapter as fa
from backends import skip_reason
from conftest import adapters_available, requires_adapterhub
from fusedadapter.patching import fusion_sites
from fusedadapter.testing import perturb_
from tiny_models import one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

WORLD = 2
PER_RANK = 2
STEPS = 3
LR = 0.5
ADAMW_LR, ADAMW_DECAY = 1e-2, 0.1  # the scenarios other than "bert" train with AdamW
ADAPTERS = {
    "a": fa.AdapterConfig(bottleneck_size=6),
    "b": fa.AdapterConfig(bottleneck_size=3, non_linearity="gelu"),
    "c": fa.AdapterConfig(bottleneck_size=4, non_linearity="tanh"),
}


# ------------------------------------------------------------------------------------------
# the model, the data, the loss (identical in every process)
# ------------------------------------------------------------------------------------------
def is_fusion_param(name: str) -> bool:
    return "fusedadapter_" in name and name.split(".")[-2] in ("query", "key", "value")


def build_model():
    model = tiny_model("bert", dropout=False, head=True)  # BertForSequenceClassification, 3 labels
    fa.patch(model, ADAPTERS, fusion="dynamic", backend="torch")
    g = torch.Generator().manual_seed(3)
    for _, _, site in fusion_sites(model):
        perturb_(site, g)  # value matrices away from the identity: the regularization term counts
    for name, p in model.named_parameters():
        p.requires_grad_(is_fusion_param(name) or name.startswith("classifier."))
    return model.train()


def global_batch(step: int, arch: str = "bert") -> dict:
    batch = tiny_inputs(arch, batch=WORLD * PER_RANK, seq=6, seed=10 + step)
    batch["labels"] = torch.tensor([(step + i) % 3 for i in range(WORLD * PER_RANK)])
    return batch


def shard(batch: dict, rank: int) -> dict:
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in batch.items()}


def trained(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole value (DTensor parameters and gradients of FSDP2 gathered)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def snapshot(params: dict) -> dict:
    return {n: (None if p.grad is None else full(p.grad).detach().clone()) for n, p in params.items()}


def train_single_process() -> dict:
    model = build_model()
    params = trained(model)
    opt = torch.optim.SGD(params.values(), lr=LR)
    grads = []
    for step in range(STEPS):
        opt.zero_grad()
        out = model(**global_batch(step))
        (out.loss + fa.fusion_regularization_loss(model)).backward()
        grads.append(snapshot(params))
        opt.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in params.items()}}


# ------------------------------------------------------------------------------------------
# workers (spawned processes)
# ------------------------------------------------------------------------------------------
def fsdp_regularization_loss(model) -> torch.Tensor:
    """``fusion_regularization_loss`` for FSDP2-sharded value matrices (DTensor, ``Shard(0)``): each
    rank adds its own rows' part, ``0.01 * ||I[rows] - W_V[rows]||^2`` (FSDP2 does not reduce the
    gradients of terms computed on the sharded parameters, and the parts of all ranks sum to the
    whole). The docs' recipe; fusion_regularization_loss itself fails on DTensors."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    total = torch.zeros(())
    for mod in model.modules():
        value = getattr(mod, "value", None)
        if not isinstance(mod, fa.FusedAdapterFusion) or value is None or not value.weight.requires_grad:
            continue
        w = value.weight
        if isinstance(w, DTensor):
            eye = distribute_tensor(torch.eye(*w.shape, dtype=w.dtype), w.device_mesh, w.placements,
                                    src_data_rank=None).to_local()  # identical on every rank: no communication
            w = w.to_local()
        else:
            eye = torch.eye(*w.shape, dtype=w.dtype)
        total = total + 0.01 * (eye - w).pow(2).sum()
    return total


# ------------------------------------------------------------------------------------------
# DDP scenarios (defaults: find_unused_parameters=False)
# ------------------------------------------------------------------------------------------
DDP_SCENARIOS = ["bert", "llama", "llama-drop"] + (["ah", "ah-drop"] if adapters_available() else [])


def calibration(arch: str) -> list:
    return [tiny_inputs(arch, batch=2, seq=6, seed=50 + i) for i in range(2)]


def build_patched_llama(drop: bool):
    model = tiny_model("llama", dropout=False, head=True)  # LlamaForSequenceClassification, 3 labels
    fa.patch(model, ADAPTERS, fusion="dynamic", backend="torch")
    assert all(site.dropout_p == 0 for _, _, site in fusion_sites(model))  # Llama: no fusion dropout
    g = torch.Generator().manual_seed(4)
    for _, _, site in fusion_sites(model):
        perturb_(site, g)
    for name, p in model.named_parameters():
        p.requires_grad_(is_fusion_param(name) or name.startswith("score."))
    if drop:  # after the freezing, before DDP and the optimizer (docs/adapterdrop.md)
        fa.adapter_drop(model, calibration("llama"), keep=2, skip_layers=1)
    return model.train()


def build_accelerated_adapterhub(drop: bool):
    import adapters

    model = tiny_model("bert", dropout=False, head=True)
    assert model.config.attention_probs_dropout_prob == 0  # the fusion's dropout: off
    adapters.init(model)
    for name, cfg in ADAPTERS.items():
        model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=32 // cfg.bottleneck_size,
                                                             non_linearity=cfg.non_linearity or "relu"))
    fuse = adapters.Fuse(*ADAPTERS)
    model.add_adapter_fusion(fuse, config="dynamic")
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if hasattr(m, "adapter_fusion_layer") and len(m.adapters):
            perturb_(m.adapters, g)
            perturb_(m.adapter_fusion_layer, g)
    model.train_adapter_fusion(fuse)  # AdapterHub's stage 2: the fusion layers (and the head) train
    fa.accelerate(model, backend="torch")
    if drop:
        fa.adapter_drop(model, calibration("bert"), keep=2, skip_layers=1)
    return model.train()


def build_scenario(kind: str):
    if kind == "bert":
        return build_model()
    if kind.startswith("llama"):
        return build_patched_llama(kind.endswith("-drop"))
    return build_accelerated_adapterhub(kind.endswith("-drop"))


def scenario_arch(kind: str) -> str:
    return "llama" if kind.startswith("llama") else "bert"


def _ddp_scenario(kind: str, rank: int) -> dict:
    import fusedadapter.fold as fold

    form = getattr(fold, "TRAIN_FORM", None)
    if form is not None and kind == "llama":  # the folded training form here; the cost model picks
        fold.TRAIN_FORM = "folded"             # the per-token form for these few tokens elsewhere
    try:
        return _ddp_train(kind, rank)
    finally:
        if form is not None:
            fold.TRAIN_FORM = form


def _ddp_train(kind: str, rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = build_scenario(kind)
    engine = DDP(model)  # the defaults: find_unused_parameters=False
    params = trained(model)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    if kind == "bert":  # compared with one process below: plain SGD
        opt = torch.optim.SGD(params.values(), lr=LR)
    else:  # AdamW's decoupled weight decay reaches every parameter with a gradient (a zero one too)
        opt = torch.optim.AdamW(params.values(), lr=ADAMW_LR, weight_decay=ADAMW_DECAY)
    grads = []
    for step in range(STEPS):
        opt.zero_grad()
        out = engine(**shard(global_batch(step, scenario_arch(kind)), rank))
        (out.loss + fa.fusion_regularization_loss(model)).backward()
        grads.append(snapshot(params))
        opt.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "init": init, "trained": sorted(params)}


def _worker(rank: int, kind: str, rdzv: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=120))
        if kind == "ddp":
            for scenario in DDP_SCENARIOS:
                torch.save(_ddp_scenario(scenario, rank), os.path.join(out_dir, f"ddp-{scenario}-rank{rank}.pt"))
            dist.destroy_process_group()
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = build_model()
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model.bert.encoder.layer:  # each block with its fusion sites: one FSDP unit
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = trained(model)
        opt = torch.optim.SGD(params.values(), lr=LR)
        grads = []
        for step in range(STEPS):
            opt.zero_grad()
            out = model(**shard(global_batch(step), rank))
            (out.loss + fsdp_regularization_loss(model)).backward()
            grads.append(snapshot(params))
            opt.step()
        result = {"grads": grads, "params": {n: full(p.detach()).clone() for n, p in params.items()}}
        torch.save(result, os.path.join(out_dir, f"{kind}-rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"{kind}-rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_distributed(kind: str, tmp_path):
    """FSDP2: the ranks' results (a list); "ddp": {scenario: the ranks' results} of DDP_SCENARIOS."""
    rdzv = os.path.join(tempfile.mkdtemp(dir=tmp_path), "rendezvous")
    try:
        mp.spawn(_worker, args=(kind, rdzv, str(tmp_path)), nprocs=WORLD, join=True)
    except Exception as exc:
        errors = [p.read_text() for p in sorted(tmp_path.glob(f"{kind}-rank*.err"))]
        raise AssertionError(f"{kind} workers failed: {exc}\n" + "\n".join(errors)) from None
    if kind == "ddp":
        return {sc: [torch.load(tmp_path / f"ddp-{sc}-rank{r}.pt") for r in range(WORLD)] for sc in DDP_SCENARIOS}
    return [torch.load(tmp_path / f"{kind}-rank{r}.pt") for r in range(WORLD)]


def check_ranks_agree(ranks: list, what: str) -> None:
    """Every rank holds the same gradients (none missing) and parameters, bit for bit."""
    for r in ranks[1:]:
        for step in range(STEPS):
            for n, g in ranks[0]["grads"][step].items():
                assert g is not None and r["grads"][step][n] is not None, f"{what}: step {step}: {n} got no gradient"
                assert torch.equal(g, r["grads"][step][n]), f"{what}: step {step} grad {n} differs across ranks"
        for n, p in ranks[0]["params"].items():
            assert torch.equal(p, r["params"][n]), f"{what}: param {n} differs across ranks"


def check_against_single_process(results: list, what: str) -> None:
    ranks = results
    check_ranks_agree(ranks, what)
    single = train_single_process()
    for step in range(STEPS):
        for n, g in single["grads"][step].items():
            got = ranks[0]["grads"][step][n]
            assert (g is None) == (got is None), f"{what}: step {step} grad {n} None-ness"
            if g is not None:
                torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-7, msg=f"{what}: step {step} grad {n}")
    init = build_model().state_dict()
    for n, p in single["params"].items():
        torch.testing.assert_close(ranks[0]["params"][n], p, rtol=1e-5, atol=1e-7, msg=f"{what}: param {n}")
        if is_fusion_param(n) and n.endswith(("query.weight", "value.weight")):
            assert not torch.equal(p, init[n]), f"{n} did not train"


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Every DDP scenario, trained in one 2-process gloo spawn with DDP's default arguments."""
    return run_distributed("ddp", tmp_path_factory.mktemp("ddp"))


def check_adamw_ddp_run(ranks: list, what: str) -> None:
    """Ranks agree; the key bias got its exact zero gradient every step and moved only by AdamW's
    weight decay (lr * decay per step); the other fusion weights trained."""
    check_ranks_agree(ranks, what)
    res = ranks[0]
    key_biases = [n for n in res["trained"] if n.endswith(".key.bias")]
    assert key_biases, f"{what}: no trained key bias"
    for step in range(STEPS):
        for n in key_biases:
            g = res["grads"][step][n]
            assert g is not None and g.shape == res["init"][n].shape and not g.any(), f"{what}: {n} grad {g}"
    for n in key_biases:
        decayed = res["init"][n] * (1 - ADAMW_LR * ADAMW_DECAY) ** STEPS
        torch.testing.assert_close(res["params"][n], decayed, rtol=1e-6, atol=0, msg=f"{what}: {n}")
        assert not torch.equal(res["params"][n], res["init"][n]), f"{what}: weight decay did not reach {n}"
    for n in res["trained"]:
        if n.endswith(("query.weight", "value.weight")):
            assert not torch.equal(res["params"][n], res["init"][n]), f"{what}: {n} did not train"


@needs_gloo
def test_ddp_gloo_two_processes_matches_single_process(ddp_results):
    """Patched BERT (dropout 0) under DDP with its default arguments, equal to one process."""
    check_against_single_process(ddp_results["bert"], "DDP")


@needs_gloo
def test_ddp_default_arguments_patched_llama(ddp_results):
    """A patched Llama (attention dropout 0, so no logit dropout), DDP defaults, AdamW, 3 steps."""
    check_adamw_ddp_run(ddp_results["llama"], "DDP Llama")


def _site_params(names, layer: int) -> list:
    return [n for n in names if "fusedadapter_" in n and f"layers.{layer}." in n]


@needs_gloo
def test_ddp_default_arguments_after_adapter_drop(ddp_results):
    """adapter_drop(keep=2, skip_layers=1) freezes the skipped block-0 site: DDP's defaults work,
    and block 0's site stays as it was."""
    ranks = ddp_results["llama-drop"]
    check_adamw_ddp_run(ranks, "DDP Llama after adapter_drop")
    res = ranks[0]
    assert not _site_params(res["trained"], 0) and _site_params(res["trained"], 1)
    for n in _site_params(res["params"], 0):
        assert torch.equal(res["params"][n], res["init"][n]), f"skipped {n} moved"


@needs_gloo
@requires_adapterhub
@pytest.mark.adapterhub
@pytest.mark.parametrize("scenario", ["ah", "ah-drop"])
def test_ddp_default_arguments_accelerated_adapterhub(ddp_results, scenario):
    """fa.accelerate'd AdapterHub BERT, attention_probs_dropout_prob=0 (AdapterHub gives every
    trained parameter a gradient; so do we), and the same after adapter_drop(keep=2, skip_layers=1)."""
    ranks = ddp_results[scenario]
    check_adamw_ddp_run(ranks, f"DDP accelerated AdapterHub ({scenario})")
    res = ranks[0]
    fusion = [n for n in res["trained"] if ".adapter_fusion_layer." in n]
    assert fusion and all(".adapter_fusion_layer." in n or n.startswith("classifier.") for n in res["trained"])
    if scenario == "ah-drop":
        assert not any("layer.0." in n for n in res["trained"]) and any("layer.1." in n for n in res["trained"])
        for n, p in res["params"].items():
            if "layer.0." in n and "adapter" in n:
                assert torch.equal(p, res["init"][n]), f"skipped {n} moved"


def _fsdp2_unsupported_reason():
    try:
        from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard): {exc}"
    return None


@needs_gloo
def test_fsdp2_fully_shard_gloo_cpu_matches_single_process(tmp_path):
    reason = _fsdp2_unsupported_reason()
    if reason:
        pytest.skip(reason + " — run this test on a GPU machine (NCCL) instead")
    check_against_single_process(run_distributed("fsdp2", tmp_path), "FSDP2")


def test_hf_trainer_fusion_training_with_regularization(tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs the `accelerate` package")
    import transformers

    class FusionTrainer(transformers.Trainer):
        """The model's loss plus AdapterHub's fusion regularization (the docs' recipe)."""

        regs = []

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            reg = fa.fusion_regularization_loss(model)
            self.regs.append(float(reg.detach()))
            loss = loss + reg
            return (loss, outputs) if return_outputs else loss

    class Data(torch.utils.data.Dataset):
        def __init__(self):
            self.rows = []
            for step in range(STEPS):
                b = global_batch(step)
                self.rows += [{k: v[i] for k, v in b.items()} for i in range(len(b["labels"]))]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    model = build_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=STEPS,
        per_device_train_batch_size=WORLD * PER_RANK, learning_rate=1e-2, logging_steps=1, save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, seed=0)
    trainer = FusionTrainer(model=model, args=args, train_dataset=Data())
    result = trainer.train()
    assert result.global_step == STEPS
    assert len(FusionTrainer.regs) == STEPS and all(r > 0 for r in FusionTrainer.regs)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and all(torch.isfinite(torch.tensor(losses)))
    for n, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[n])
        if n.endswith(("query.weight", "value.weight")) and is_fusion_param(n):
            assert moved, f"{n} was not trained"
        if not p.requires_grad:
            assert not moved, f"frozen {n} moved"


# ------------------------------------------------------------------------------------------
# the key bias's exact zero gradient, per backend and path (what DDP's defaults need)
# ------------------------------------------------------------------------------------------
def _train_forms():
    """The training forms of the fold (fusedadapter.fold.TRAIN_FORM, where it exists)."""
    import fusedadapter.fold as fold

    return ["folded", "per_token"] if hasattr(fold, "TRAIN_FORM") else [None]


def _fast_backends():
    """(backend, widths, training form): every fast backend this machine runs in every training
    form, and the torch backend's plain form (adapters wider in total than 2 H: their own up
    projections, functional._plain_form)."""
    narrow, wide = [3, 5, 4], [12, 14, 13]  # H = 16: R = 12 folded, 39 > 32 plain
    on = [("torch", "cpu"), ("cpu", "cpu"), ("triton", "cpu")] + ([("cuda", "cuda")] if torch.cuda.is_available() else [])
    out = []
    for b, device in on:  # one that cannot run is a skip naming why (tests/backends.py)
        why = skip_reason(b, device)
        marks = () if why is None else pytest.mark.skip(reason=why)
        out += [pytest.param(b, narrow, f, id=f"{b}-{f}", marks=marks) for f in _train_forms()]
    out.append(pytest.param("torch", wide, None, id="torch-plain"))
    return out


@pytest.mark.parametrize("backend,widths,form", _fast_backends())
def test_key_bias_gets_an_exact_zero_gradient_without_logit_dropout(backend, widths, form, monkeypatch):
    """Training mode, logit dropout 0: the key bias cancels in the softmax, so its gradient is a zero
    tensor (not None), on the module and the functional form; every other parameter still gets its
    gradient; with logit dropout on, the key bias's gradient is the real (nonzero) one."""
    if form is not None:
        monkeypatch.setattr("fusedadapter.fold.TRAIN_FORM", form)
    device = "cuda" if backend == "cuda" else "cpu"
    acts = ["relu", "gelu", "tanh"]
    cfgs = {n: fa.AdapterConfig(bottleneck_size=w, non_linearity=a) for n, w, a in zip("abc", widths, acts)}
    g = torch.Generator().manual_seed(21)
    # (logit dropout, adapters frozen: AdapterFusion's stage 2, where the fold may cache the adapters' half)
    for dropout, stage2 in ((0.0, False), (0.0, True), (0.3, False)):
        site = fa.FusedAdapterFusion(16, cfgs, "dynamic", backend=backend, attention_dropout=dropout)
        perturb_(site, g)
        site = site.to(device).train()
        if stage2:
            site.adapters.requires_grad_(False)
        assert site.dropout_p == dropout
        x = torch.randn(2, 5, 16, generator=g).to(device)
        res = torch.randn(2, 5, 16, generator=g).to(device)
        w = torch.randn(2, 5, 16, generator=g).to(device)
        (site(x, res) * w).sum().backward()
        kb = site.key.bias.grad
        assert kb is not None and kb.shape == site.key.bias.shape, f"{backend} dropout {dropout}: key bias grad {kb}"
        if dropout == 0.0:
            assert not kb.any(), f"{backend}: key bias grad {kb} (exactly zero expected)"
            missing = [n for n, p in site.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, f"{backend}: no gradient for {missing}"
            if stage2:
                continue
            # the functional form, on the same tensors
            kb_param = site.key.bias.detach().clone().requires_grad_(True)
            ad = list(site.adapters.values())
            out = fa.adapter_fusion(
                x, res, down_weights=[a.down.weight for a in ad], down_biases=[a.down.bias for a in ad],
                up_weights=[a.adapter_up.weight for a in ad], up_biases=[a.adapter_up.bias for a in ad],
                activations=acts, query_weight=site.query.weight, query_bias=site.query.bias,
                key_weight=site.key.weight, key_bias=kb_param, value_weight=site.value.weight, backend=backend)
            (out * w).sum().backward()
            assert kb_param.grad is not None and not kb_param.grad.any(), f"{backend} functional: {kb_param.grad}"
        else:
            assert kb.abs().max() > 1e-4, f"{backend}: under logit dropout the key bias has a real gradient, got {kb}"
    # no autograd, nothing attached: eval outputs unchanged in kind (a plain tensor, no grad_fn)
    with torch.no_grad():
        assert site.eval()(x, res).grad_fn is None
