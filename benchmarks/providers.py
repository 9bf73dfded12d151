"""One setup function for a fusion-site benchmark, with named providers.

:func:`setup_site` builds one perturbed fusion site (N bottleneck adapters of width ``r``,
AdapterHub's ``dynamic`` fusion) and one set of inputs, then hands every provider the same
weights and the same inputs:

- ``reference``: :class:`fusedadapter.FusedAdapterFusion` with ``backend="reference"`` (eager,
  AdapterHub's op sequence): the baseline every ratio is taken against.
- ``adapterhub``: AdapterHub's own ``Adapter`` modules and ``BertFusion`` (``adapters`` package,
  only where it imports), with the same weights loaded into them, called as AdapterHub's
  ``compose_fuse`` calls them.
- ``torch``, ``triton``, ``cuda``, ``cpu``: the module with that backend, where
  :func:`fusedadapter.available_backends` says it runs on the device.

Modes (what one timed iteration is):

- ``nograd``: ``module.eval()`` under ``torch.inference_mode()`` (serving).
- ``forward``: the forward of a fusion-training step (``module.train()``: logit dropout on;
  adapters frozen, fusion query/key/value trainable; inputs require grad as they do inside a model).
- ``backward``: that step's backward alone (its forward runs untimed before each iteration).
- ``full``: forward + backward.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

import fusedadapter as fa
from fusedadapter.testing import perturb_

from .env import adapters_importable

__all__ = ["SiteShape", "Step", "SiteCase", "setup_site", "build_site", "site_copies", "site_providers", "MODES",
           "SITE_PROVIDERS", "FAST_BACKENDS"]

MODES = ("nograd", "forward", "backward", "full")
GRAD_MODES = ("forward", "backward", "full")
FAST_BACKENDS = ("torch", "triton", "cuda", "cpu")
SITE_PROVIDERS = ("reference", "adapterhub") + FAST_BACKENDS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class SiteShape:
    """The shape of one benchmarked fusion site: ``n`` adapters of width ``hidden // reduction`` (or ``width``),
    ``tokens`` rows (where a patched site sits in a block is :class:`fusedadapter.patching.SiteSpec`)."""

    tokens: int
    hidden: int = 768
    n: int = 8
    reduction: int = 16
    dtype: str = "float32"
    width: Optional[int] = None
    fusion: str = "dynamic"
    seed: int = 0

    @property
    def r(self) -> int:
        return self.width if self.width is not None else max(1, self.hidden // self.reduction)

    @property
    def bottleneck(self) -> int:
        return self.r * self.n

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["r"] = self.r
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SiteShape":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def label(self) -> str:
        return f"T={self.tokens} H={self.hidden} N={self.n} r={self.r} {self.dtype}"

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class Step:
    """One timed iteration: ``prep()`` (untimed, may be None) then ``run()`` (timed)."""

    run: Callable[[], object]
    prep: Optional[Callable[[], None]] = None


@functools.lru_cache(maxsize=None)
def _backends_on(device_type: str, index: Optional[int]) -> Tuple[Tuple[str, Optional[str]], ...]:
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    try:
        return tuple(fa.available_backends(device).items())
    except Exception:  # a backend whose loader fails with something else than BackendUnavailable
        from fusedadapter.dispatch import fusion_op

        out = {"reference": None}
        for name in FAST_BACKENDS:
            try:
                fusion_op(name, device)
                out[name] = None
            except Exception as exc:
                out[name] = f"{type(exc).__name__}: {exc}"
        return tuple(out.items())


def site_providers(device="cpu", requested: Optional[List[str]] = None, *, allow_interpreter: bool = False
                   ) -> Tuple[List[str], Dict[str, str]]:
    """(providers that run on ``device``, {provider: why it is skipped}).

    Discovered at run time: a backend that is not built or not installed yet is skipped with its
    reason. ``triton`` on a CPU device would run through the Triton interpreter, a test tool
    thousands of times slower than any backend, so it is skipped there unless
    ``allow_interpreter``.
    """
    device = torch.device(device)
    wanted = list(requested) if requested else list(SITE_PROVIDERS)
    unknown = [p for p in wanted if p not in SITE_PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; expected some of {list(SITE_PROVIDERS)}")
    avail = dict(_backends_on(device.type, device.index))
    ok, skipped = [], {}
    for p in wanted:
        if p == "adapterhub":
            if not adapters_importable():
                skipped[p] = "the `adapters` package (AdapterHub) does not import here"
                continue
        elif p == "triton" and device.type == "cpu" and not allow_interpreter:
            skipped[p] = "Triton on CPU is the interpreter (a test tool, not a backend): not timed"
            continue
        elif p == "cpu" and device.type != "cpu":
            skipped[p] = f"the cpu backend does not run on {device.type}"
            continue
        elif p == "cuda" and device.type != "cuda":
            skipped[p] = f"the cuda backend does not run on {device.type}"
            continue
        elif p != "reference":
            reason = avail.get(p, "not registered")
            if reason is not None:
                skipped[p] = reason
                continue
        ok.append(p)
    return ok, skipped


def build_site(spec: SiteShape, device="cpu", backend: str = "reference") -> fa.FusedAdapterFusion:
    """The benchmark site of ``spec``: ``n`` adapters of width ``r`` (relu), ``spec.fusion``'s
    preset, weights perturbed from seed ``spec.seed`` (every value non-trivial), on ``device`` in
    ``spec.dtype``. Made outside inference mode, so it can also be trained."""
    g = torch.Generator().manual_seed(spec.seed)
    cfgs = {f"a{i}": fa.AdapterConfig(bottleneck_size=spec.r) for i in range(spec.n)}
    site = fa.FusedAdapterFusion(spec.hidden, cfgs, spec.fusion, backend=backend)
    perturb_(site, g)
    return site.to(device=torch.device(device), dtype=spec.torch_dtype)


def site_copies(site: fa.FusedAdapterFusion, backends) -> Dict[str, fa.FusedAdapterFusion]:
    """{backend: a copy of ``site`` with that backend}: the same weights, each with its own caches."""
    out = {}
    for b in backends:
        m = copy.deepcopy(site)
        m.backend = b
        out[b] = m
    return out


def _train_setup(module: torch.nn.Module, fusion_params: List[torch.nn.Parameter]) -> None:
    """Fusion training (stage 2 of AdapterFusion): adapters frozen, fusion Q/K/V trained."""
    for p in module.parameters():
        p.requires_grad_(False)
    for p in fusion_params:
        p.requires_grad_(True)


class SiteCase:
    """One site and its inputs, shared by every provider; :meth:`step` gives a provider's iteration."""

    def __init__(self, spec: SiteShape, device="cpu"):
        self.spec = spec
        self.device = torch.device(device)
        self.base = build_site(spec, self.device)
        g = torch.Generator().manual_seed(spec.seed + 1)
        shape = (1, spec.tokens, spec.hidden)  # (B, T, H): AdapterHub's BertFusion wants 3-D inputs
        dt = spec.torch_dtype
        self.a = torch.randn(shape, generator=g, dtype=torch.float32).to(self.device, dt)
        self.res = torch.randn(shape, generator=g, dtype=torch.float32).to(self.device, dt)
        self.grad_out = torch.randn(shape, generator=g, dtype=torch.float32).to(self.device, dt)
        self.a_grad = self.a.detach().clone().requires_grad_(True)
        self.res_grad = self.res.detach().clone().requires_grad_(True)
        self._forwards: Dict[str, Tuple[Callable, Callable, List[torch.nn.Parameter]]] = {}

    # ------------------------------------------------------------------ providers
    def _fused(self, backend: str):
        mod = copy.deepcopy(self.base)
        mod.backend = backend
        fusion_params = [p for n, p in mod.named_parameters() if not n.startswith("adapters.")]

        def fwd(a, res):
            return mod(a, res)

        return mod, fwd, fusion_params

    def _adapterhub(self):
        from adapters.configuration import AdapterFusionConfig, SeqBnConfig
        from adapters.methods.modeling import Adapter, BertFusion

        spec, base = self.spec, self.base
        bn = SeqBnConfig(reduction_factor=spec.hidden / spec.r, non_linearity="relu")
        ads = torch.nn.ModuleList()
        for name in base.adapter_names:
            ad = Adapter(name, spec.hidden, spec.r, bn)
            ad.load_state_dict(base.adapters[name].state_dict())
            ads.append(ad)
        fusion = BertFusion(AdapterFusionConfig.load(spec.fusion), spec.hidden, base.dropout_p)
        missing, unexpected = fusion.load_state_dict(
            {k: v for k, v in base.state_dict().items() if not k.startswith("adapters.")}, strict=False)
        if unexpected or any(not k.startswith("dense") for k in missing):
            raise RuntimeError(f"AdapterHub BertFusion weights did not load: missing {missing}, unexpected {unexpected}")
        holder = torch.nn.ModuleDict({"adapters": ads, "fusion": fusion}).to(self.device, spec.torch_dtype)

        def fwd(a, res):
            # AdapterHub's compose_fuse: each adapter's forward (its `up` is output [2]), stack, permute, fuse.
            ups = torch.stack([ad(a, residual_input=res)[2] for ad in holder["adapters"]])
            up_list = ups.permute(1, 2, 0, 3)
            return holder["fusion"](a, up_list, up_list, res)

        return holder, fwd, list(holder["fusion"].parameters())

    def provider(self, name: str):
        if name not in self._forwards:
            self._forwards[name] = self._adapterhub() if name == "adapterhub" else self._fused(name)
        return self._forwards[name]

    # ------------------------------------------------------------------ steps
    def step(self, name: str, mode: str) -> Step:
        """The iteration of provider ``name`` in ``mode`` (see the module docstring)."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        mod, fwd, fusion_params = self.provider(name)
        if mode == "nograd":
            mod.eval()
            a, res = self.a, self.res

            def run():
                with torch.inference_mode():
                    return fwd(a, res)

            return Step(run)
        mod.train()
        _train_setup(mod, fusion_params)
        leaves = [self.a_grad, self.res_grad] + fusion_params
        a, res, gout = self.a_grad, self.res_grad, self.grad_out

        def zero():
            for t in leaves:
                t.grad = None
            # An optimizer step updates the trained weights in place between two training steps; the
            # in-place no-op bumps their version counters the same way, so no step reuses a cached
            # product of the previous step's weights (the fold's checkpointing memo, issue 11).
            with torch.no_grad():
                for p in fusion_params:
                    p.add_(0.0)

        if mode == "forward":
            return Step(lambda: fwd(a, res), zero)
        if mode == "full":
            def run_full():
                out = fwd(a, res)
                out.backward(gout)
                return out

            return Step(run_full, zero)
        holder = {}

        def prep():
            zero()
            holder["out"] = fwd(a, res)

        def run_bwd():
            holder.pop("out").backward(gout)

        return Step(run_bwd, prep)

    def output(self, name: str) -> torch.Tensor:
        """The provider's no-grad output (for the correctness check that rides along)."""
        out = self.step(name, "nograd").run()
        return out.detach().reshape(-1, self.spec.hidden)

    def saved_bytes(self, name: str) -> int:
        """Bytes autograd saves for backward in a training forward: distinct storages, leaving out
        the inputs and parameters (they are alive anyway)."""
        mod, fwd, fusion_params = self.provider(name)
        mod.train()
        _train_setup(mod, fusion_params)
        skip = {t.untyped_storage().data_ptr() for t in [self.a_grad, self.res_grad] + list(mod.parameters())}
        seen: Dict[int, int] = {}

        def pack(t):
            try:
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in skip and ptr != 0:
                    seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
            except Exception:  # tensors without storage (e.g. nested or fake)
                pass
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fwd(self.a_grad, self.res_grad)
        del out
        return int(sum(seen.values()))

    def folded_weight_bytes(self) -> int:
        """Bytes of the folded weights the fused op reads (docs/algorithm.md §2), at the op's weight dtype."""
        from fusedadapter.ops import acc_dtype

        with torch.no_grad():
            folded = self.base.folded(acc_dtype(self.spec.torch_dtype))
        return int(sum(t.numel() * t.element_size() for t in (folded.w_down, folded.b_down, folded.w_query,
                                                                   folded.b_query, folded.w_out) if t is not None))


def setup_site(spec: SiteShape, device="cpu") -> SiteCase:
    """The one setup function: a site and inputs shared by every provider (see :class:`SiteCase`)."""
    return SiteCase(spec, device)
