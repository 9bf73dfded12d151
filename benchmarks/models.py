"""Model level: a whole random-init model, bare vs patched (``fusedadapter.patch``) vs AdapterHub.

Models: ``bert-base`` (BertConfig defaults: 12 layers, H=768) and ``llama-small`` (a Llama-shape
decoder: 6 layers, H=768, 12 heads, 4 KV heads, FFN 2048). N ``seq_bn`` adapters of width r
fused by a ``dynamic`` fusion at every layer's FFN output (AdapterHub's place for seq_bn).

Providers (each its own model instance, same base weights):

- ``bare``: the plain Hugging Face model;
- ``reference`` / ``torch`` / ``triton`` / ``cuda`` / ``cpu``: ``fusedadapter.patch(model, ...,
  backend=name)``, only when ``fusedadapter.patch`` exists and the backend runs here;
- ``adapterhub``: ``adapters.init`` + ``add_adapter`` x N + ``add_adapter_fusion`` +
  ``set_active_adapters(Fuse(...))`` (where ``adapters`` imports);
- ``adapterhub+accelerate``: that model after ``fusedadapter.accelerate`` (where both exist).

Modes and metrics (``kernel="model"``): ``nograd`` forward under ``inference_mode``: ``time``
(ms), ``tokens_per_s``, ``overhead`` (% over ``bare``, from paired repeats); ``train``: one
fusion-training step (base and adapters frozen, fusion Q/K/V trained; forward, backward, AdamW
step): ``time`` and ``tokens_per_s`` (``bare`` has nothing to train and is not in this mode).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import fusedadapter as fa

from .env import adapters_importable
from .providers import DTYPES, FAST_BACKENDS, Step, site_providers
from .results import Row, make_row
from .timing import quantiles, time_interleaved

__all__ = ["ModelSpec", "model_providers", "run_models", "bert", "fusion_adapters", "MODEL_PROVIDERS", "MODELS"]

MODEL_PROVIDERS = ("bare", "reference", "adapterhub", "adapterhub+accelerate") + FAST_BACKENDS
MODEL_MODES = ("nograd", "train")
MODELS = ("bert-base", "llama-small", "bert-tiny", "llama-tiny")


@dataclass(frozen=True)
class ModelSpec:
    model: str = "bert-base"
    batch: int = 8
    seq: int = 128
    n: int = 8
    r: int = 48
    dtype: str = "float32"
    seed: int = 0


def _config(name: str):
    from transformers import BertConfig, LlamaConfig

    if name == "bert-base":
        return BertConfig()
    if name == "llama-small":
        return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=12,
                           num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
    if name == "bert-tiny":  # for tests of the suite itself
        return BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          vocab_size=512)
    if name == "llama-tiny":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def bert(layers: int = 12, hidden: int = 768, *, seed: int = 0, **config):
    """A random-init ``BertModel`` (``torch.manual_seed(seed)`` first): ``layers`` blocks of width
    ``hidden``, ``hidden // 64`` heads, FFN ``4 * hidden`` (BERT-base at the defaults); ``config``
    overrides other ``BertConfig`` fields. The standalone ``bench_*.py`` scripts build their BERT here."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=max(1, hidden // 64),
                                intermediate_size=4 * hidden, **config))


def fusion_adapters(n: int = 8, r: int = 48, prefix: str = "task") -> Dict[str, "fa.AdapterConfig"]:
    """``{f"{prefix}{i}": AdapterConfig(bottleneck_size=r)}``: the benchmarks' N adapters of width r."""
    return {f"{prefix}{i}": fa.AdapterConfig(bottleneck_size=r) for i in range(n)}


def _bare(spec: ModelSpec):
    from transformers import AutoModel

    torch.manual_seed(spec.seed)
    cfg = _config(spec.model)
    try:
        model = AutoModel.from_config(cfg, attn_implementation="sdpa")
    except (TypeError, ValueError):
        model = AutoModel.from_config(cfg)
    return model


def model_providers(device="cpu", requested: Optional[Sequence[str]] = None) -> Tuple[List[str], Dict[str, str]]:
    device = torch.device(device)
    wanted = list(requested) if requested else list(MODEL_PROVIDERS)
    site_ok, site_skip = site_providers(device, [p for p in wanted if p in FAST_BACKENDS or p == "reference"])
    ok, skipped = [], {}
    has_patch = callable(getattr(fa, "patch", None))
    for p in wanted:
        if p == "bare":
            ok.append(p)
        elif p == "adapterhub":
            (ok.append(p) if adapters_importable() else skipped.__setitem__(p, "`adapters` does not import here"))
        elif p == "adapterhub+accelerate":
            if not adapters_importable():
                skipped[p] = "`adapters` does not import here"
            elif not callable(getattr(fa, "accelerate", None)):
                skipped[p] = "fusedadapter.accelerate is not present yet"
            else:
                ok.append(p)
        elif p in site_skip:
            skipped[p] = site_skip[p]
        elif not has_patch:
            skipped[p] = "fusedadapter.patch is not present yet"
        elif p in site_ok:
            ok.append(p)
        else:
            skipped[p] = "unknown provider"
    return ok, skipped


def _adapterhub(model, spec: ModelSpec):
    import adapters
    from adapters import Fuse, SeqBnConfig

    adapters.init(model)
    hidden = model.config.hidden_size
    names = [f"a{i}" for i in range(spec.n)]
    for name in names:
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=hidden / spec.r))
    model.add_adapter_fusion(Fuse(*names), "dynamic")
    model.set_active_adapters(Fuse(*names))
    return model, Fuse(*names)


def _build(provider: str, spec: ModelSpec, device: torch.device, bare_state):
    model = _bare(spec)
    model.load_state_dict(bare_state)
    fuse = None
    if provider in ("adapterhub", "adapterhub+accelerate"):
        model, fuse = _adapterhub(model, spec)
        if provider == "adapterhub+accelerate":
            model = fa.accelerate(model, backend="auto") or model
    elif provider != "bare":
        cfgs = [fa.AdapterConfig(bottleneck_size=spec.r) for _ in range(spec.n)]
        model = fa.patch(model, cfgs, fusion="dynamic", placement="seq_bn", backend=provider) or model
    return model.to(device=device, dtype=DTYPES[spec.dtype]), fuse


def _trainable(model, provider: str, fuse) -> List[torch.nn.Parameter]:
    if provider.startswith("adapterhub"):
        model.train_adapter_fusion(fuse)
        return [p for p in model.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, fa.FusedAdapterFusion):
            for name, p in m.named_parameters():
                if not name.startswith("adapters."):
                    p.requires_grad_(True)
                    params.append(p)
    return params


def _steps(models, spec: ModelSpec, mode: str, ids: torch.Tensor) -> Dict[str, Step]:
    steps = {}
    for provider, (model, fuse) in models.items():
        if mode == "nograd":
            model.eval()

            def run(model=model):
                with torch.inference_mode():
                    return model(input_ids=ids).last_hidden_state

            steps[provider] = Step(run)
            continue
        if provider == "bare":
            continue
        model.train()
        params = _trainable(model, provider, fuse)
        if not params:
            raise RuntimeError(f"{provider}: no trainable fusion parameters found")
        opt = torch.optim.AdamW(params, lr=1e-4)

        def train_step(model=model, opt=opt):
            out = model(input_ids=ids).last_hidden_state
            loss = out.float().pow(2).mean()
            loss.backward()
            opt.step()
            return loss

        steps[provider] = Step(train_step, lambda opt=opt: opt.zero_grad(set_to_none=True))
    return steps


def run_models(specs: Sequence[ModelSpec], *, device="cpu", providers=None, modes=MODEL_MODES, repeats=5,
               warmup=1, sink=None) -> Tuple[List[Row], Dict[str, str]]:
    device = torch.device(device)
    ok, skipped = model_providers(device, providers)
    rows: List[Row] = []
    if ok == ["bare"] or not ok:
        skipped.setdefault("*", "no fused or AdapterHub provider runs here: model level skipped")
        return rows, skipped
    for spec in specs:
        spec_rows: List[Row] = []
        bare_state = copy.deepcopy(_bare(spec).state_dict())
        models = {}
        for p in ok:
            try:
                models[p] = _build(p, spec, device, bare_state)
            except Exception as exc:
                spec_rows.append(_row(spec, p, "setup", "error", "", {}, device, error=f"{type(exc).__name__}: {exc}"))
        del bare_state
        g = torch.Generator().manual_seed(spec.seed + 1)
        vocab = _config(spec.model).vocab_size
        ids = torch.randint(0, vocab, (spec.batch, spec.seq), generator=g).to(device)
        tokens = spec.batch * spec.seq
        for mode in modes:
            failed: Dict[str, BaseException] = {}
            try:
                steps = _steps(models, spec, mode, ids)
            except Exception as exc:
                spec_rows.append(_row(spec, "-", mode, "error", "", {}, device, error=f"{type(exc).__name__}: {exc}"))
                continue
            samples = time_interleaved(steps, device, repeats=repeats, min_sample_s=0.0, warmup=warmup,
                                       on_error=lambda n, e: failed.setdefault(n, e))
            for p, exc in failed.items():
                spec_rows.append(_row(spec, p, mode, "error", "", {}, device, error=f"{type(exc).__name__}: {exc}"))
            for p, s in samples.items():
                if not s:
                    continue
                q = quantiles(s)
                spec_rows.append(_row(spec, p, mode, "time", "ms", q, device, samples_ms=[round(x, 4) for x in s]))
                tps = {k: tokens / (v * 1e-3) for k, v in zip(("p80", "median", "p20"), (q["p20"], q["median"], q["p80"]))}
                spec_rows.append(_row(spec, p, mode, "tokens_per_s", "tokens/s", tps, device))
                if mode == "nograd" and p != "bare" and samples.get("bare"):
                    n = min(len(s), len(samples["bare"]))
                    over = 100.0 * (np.asarray(s[:n]) / np.asarray(samples["bare"][:n]) - 1.0)
                    qo = quantiles(list(over))
                    spec_rows.append(_row(spec, p, mode, "overhead", "%", qo, device))
        del models
        rows.extend(spec_rows)
        if sink is not None:
            sink(spec_rows)
    return rows, skipped


def _row(spec: ModelSpec, provider, mode, metric, unit, q, device, **more) -> Row:
    cfg = asdict(spec)
    cfg.update(tokens=spec.batch * spec.seq, threads=torch.get_num_threads(), **more)
    from .env import versions

    cfg["adapters_version"] = versions()["adapters"]
    return make_row(kernel="model", provider=provider, mode=mode, metric=metric, unit=unit, x_name="model",
                    x_value=spec.model, p20=q.get("p20"), median=q.get("median"), p80=q.get("p80"), config=cfg,
                    device=device)
