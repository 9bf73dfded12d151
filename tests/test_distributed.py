"""Fusion training of a patched model on existing engines (the recipes of docs/distributed.md).

* ``DistributedDataParallel`` over gloo, 2 CPU processes (``torch.multiprocessing.spawn``, a file
  rendezvous): gradients and parameters bit-identical across ranks, and equal to one process
  training on the same global batch.
* FSDP2 (``torch.distributed.fsdp.fully_shard``) over gloo on CPU, the same checks (skips, with
  the reason, where the installed torch cannot shard on CPU / gloo).
* Hugging Face ``Trainer`` with a small subclass that adds ``fusedadapter.fusion_regularization_loss``.

AdapterFusion stage 2 throughout: a tiny random BERT with a classification head, three adapters
and the dynamic fusion patched in; the base model and the adapters frozen; the fusion's
query / key / value and the head trained. Dropout is off (the ranks of a DDP run draw different
logit-dropout masks than one process does on the whole batch, so only then can the runs agree).
"""

from __future__ import annotations

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedadapter as fa
from fusedadapter.patching import fusion_sites
from fusedadapter.testing import perturb_
from tiny_models import one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

WORLD = 2
PER_RANK = 2
STEPS = 2
LR = 0.5
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


def global_batch(step: int) -> dict:
    batch = tiny_inputs("bert", batch=WORLD * PER_RANK, seq=6, seed=10 + step)
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


def _worker(rank: int, kind: str, rdzv: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=WORLD)
        model = build_model()
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # find_unused_parameters: with logit dropout off the key bias gets no gradient (it adds
            # one constant to every adapter's logit, and the fused op leaves it out)
            engine = DDP(model, find_unused_parameters=True)
            reg = fa.fusion_regularization_loss
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model.bert.encoder.layer:  # each block with its fusion sites: one FSDP unit
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            engine = model
            reg = fsdp_regularization_loss
        params = trained(model)
        opt = torch.optim.SGD(params.values(), lr=LR)
        grads = []
        for step in range(STEPS):
            opt.zero_grad()
            out = engine(**shard(global_batch(step), rank))
            (out.loss + reg(model)).backward()
            grads.append(snapshot(params))
            opt.step()
        result = {"grads": grads, "params": {n: full(p.detach()).clone() for n, p in params.items()}}
        torch.save(result, os.path.join(out_dir, f"{kind}-rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"{kind}-rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_distributed(kind: str, tmp_path) -> list:
    rdzv = os.path.join(tempfile.mkdtemp(dir=tmp_path), "rendezvous")
    try:
        mp.spawn(_worker, args=(kind, rdzv, str(tmp_path)), nprocs=WORLD, join=True)
    except Exception as exc:
        errors = [p.read_text() for p in sorted(tmp_path.glob(f"{kind}-rank*.err"))]
        raise AssertionError(f"{kind} workers failed: {exc}\n" + "\n".join(errors)) from None
    return [torch.load(tmp_path / f"{kind}-rank{r}.pt") for r in range(WORLD)]


def check_against_single_process(results: list, what: str) -> None:
    ranks = results
    for r in ranks[1:]:  # every rank holds the same gradients and parameters, bit for bit
        for step in range(STEPS):
            for n, g in ranks[0]["grads"][step].items():
                assert (g is None) == (r["grads"][step][n] is None), n
                assert g is None or torch.equal(g, r["grads"][step][n]), f"{what}: step {step} grad {n} differs across ranks"
        for n, p in ranks[0]["params"].items():
            assert torch.equal(p, r["params"][n]), f"{what}: param {n} differs across ranks"
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


@needs_gloo
def test_ddp_gloo_two_processes_matches_single_process(tmp_path):
    check_against_single_process(run_distributed("ddp", tmp_path), "DDP")


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
