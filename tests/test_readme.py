"""The README's Quickstart runs as written, and its training half trains on a train-mode forward."""

import re
from pathlib import Path

import torch

import fusedadapter as fa

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart_code() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_its_loss_comes_from_a_train_mode_forward(monkeypatch):
    modes = []
    forward = fa.FusedAdapterFusion.forward

    def recording(self, *args, **kwargs):
        modes.append(self.training)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(fa.FusedAdapterFusion, "forward", recording)
    torch.set_num_threads(1)
    ns = {}
    exec(compile(quickstart_code(), str(README), "exec"), ns)
    assert modes and modes[0] is False, "the Quickstart starts with an eval-mode call"
    assert modes[-1] is True, f"the training loss must come from a train-mode forward; calls in modes {modes}"
    site = ns["site"]
    assert site.training and site.query.weight.grad is not None and site.adapters["task0"].adapter_up.weight.grad is None
