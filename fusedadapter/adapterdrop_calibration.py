"""AdapterDrop's calibration pass (:mod:`fusedadapter.adapterdrop`): run the calibration batches and
average each site's fusion probabilities per adapter, token-weighted by the attention mask."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .patching import collect_fusion_probs

SiteKey = Tuple[int, str]  # (block index, AdapterHub location key)


def _call(model: nn.Module, batch, **extra):
    if isinstance(batch, Mapping):
        return model(**batch, **extra)
    if isinstance(batch, (tuple, list)):
        return model(*batch, **extra)
    return model(batch, **extra)


def _token_weights(batch, lead: Tuple[int, ...]) -> Optional[torch.Tensor]:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(lead):
        return mask.to(torch.float64)
    return None


class _Accumulator:
    def __init__(self):
        self.sums: Dict[SiteKey, torch.Tensor] = {}
        self.counts: Dict[SiteKey, float] = {}
        self.names: Dict[SiteKey, List[str]] = {}

    def add(self, key: SiteKey, names: Sequence[str], probs: torch.Tensor, batch) -> None:
        p = probs.detach().to(torch.float64)
        lead = tuple(p.shape[:-1])
        w = _token_weights(batch, lead)
        p = p.reshape(-1, p.shape[-1])
        if w is not None:
            w = w.to(p.device).reshape(-1)
            total, count = (p * w[:, None]).sum(0), float(w.sum())
        else:
            total, count = p.sum(0), float(p.shape[0])
        total = total.cpu()
        if key in self.sums:
            if self.names[key] != list(names):
                raise RuntimeError(f"fusedadapter.adapter_drop: site {key} changed its adapters during calibration")
            self.sums[key] += total
            self.counts[key] += count
        else:
            self.sums[key], self.counts[key], self.names[key] = total, count, list(names)

    def means(self) -> Dict[SiteKey, Dict[str, float]]:
        out = {}
        for key, total in self.sums.items():
            c = self.counts[key]
            out[key] = {n: (float(v) / c if c > 0 else float("nan")) for n, v in zip(self.names[key], total.tolist())}
        return out


class _EvalState:
    """Eval mode and saved fusion temperatures for the calibration; restored on exit."""

    def __init__(self, model: nn.Module, fusions: Sequence[nn.Module]):
        self.model, self.fusions = model, list(fusions)

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.temps = [(f, f.T) for f in self.fusions if hasattr(f, "T")]
        self.model.eval()
        return self

    def reset_temperatures(self) -> None:
        """Every batch sees the temperatures the model had (AdapterHub lowers them on every call)."""
        for f, t in self.temps:
            f.T = t

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode
        self.reset_temperatures()
        return False


def _calibrate_patched(model, record, batches, counted: set) -> Tuple[Dict[SiteKey, Dict[str, float]], int, int]:
    acc = _Accumulator()
    modules = {(s.layer_idx, s.location): s.module for s in record.sites}
    n_batches = tokens = 0
    with _EvalState(model, modules.values()) as state, torch.inference_mode():
        for batch in batches:
            state.reset_temperatures()
            with collect_fusion_probs(model) as store:
                _call(model, batch)
            n_batches += 1
            seen = set()
            for per_layer in store.values():
                for layer_idx, per_loc in per_layer.items():
                    for loc, probs in per_loc.items():
                        key = (layer_idx, loc)
                        if key in counted:
                            acc.add(key, modules[key].adapter_names, probs, batch)
                            seen.add(key)
            if seen:
                tokens = int(round(acc.counts[next(iter(seen))]))
    return acc.means(), n_batches, tokens
