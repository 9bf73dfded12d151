"""The per-architecture site table: where AdapterHub's adapter sites sit in each supported model.

:data:`SUPPORTED_ARCHITECTURES` maps a Hugging Face ``model_type`` to an :class:`ArchSpec` (the
block list and, per location, the :class:`SiteSpec` alternatives that name the modules whose hooks
feed and replace the site); :data:`PLACEMENTS` holds AdapterHub's placements (``seq_bn``,
``double_seq_bn``) and the ``BnConfig`` flags that decide a site's inputs. The lookups
(:func:`arch_spec`, :func:`find_layers`, :func:`resolve_site`, :func:`get_module`) only read a
model; :mod:`fusedadapter.patching` installs the sites. Re-exported there under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, Union

from torch import nn

__all__ = ["SiteSpec", "ArchSpec", "SUPPORTED_ARCHITECTURES", "Placement", "PLACEMENTS", "UnsupportedArchitecture",
           "get_module", "arch_spec", "find_layers", "resolve_site", "resolve_placement", "ah_prefix"]


class UnsupportedArchitecture(ValueError):
    """``patch`` / ``load_adapterhub`` on a model type outside :data:`SUPPORTED_ARCHITECTURES`."""


@dataclass(frozen=True)
class SiteSpec:
    """Where one site sits inside a transformer block (paths relative to the block; "" = the block).

    ``capture``: (module, positional index, keyword names) of the forward pre-hook whose argument is
    ``x``. ``output``: the module whose output (or ``output[0]``) is ``h``. ``layer_norm``: the
    sub-layer's own LayerNorm (post-norm) that AdapterHub passes to the adapter layer, or None.
    ``ah_path``: where AdapterHub 1.3.0 keeps this site's ``BottleneckLayer`` (its parameter names).
    ``requires``: modules that must exist for this alternative to apply (version differences).
    """

    capture: Tuple[str, int, Tuple[str, ...]]
    output: str
    layer_norm: Optional[str]
    ah_path: str
    requires: Tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchSpec:
    name: str
    layers: Tuple[str, ...]          # candidate paths of the block list, relative to the base model
    ah_layers: str                   # AdapterHub's (transformers 4.57) path of the block list
    sites: Mapping[str, Tuple[SiteSpec, ...]]  # location -> alternatives, first match wins
    post_norm: bool


def _bert_like(name: str) -> ArchSpec:
    return ArchSpec(
        name=name, layers=("encoder.layer",), ah_layers="encoder.layer", post_norm=True,
        sites={
            "mh_adapter": (SiteSpec(("attention.output", 1, ("input_tensor",)), "attention.output.dropout",
                                    "attention.output.LayerNorm", "attention.output"),),
            "output_adapter": (SiteSpec(("output", 1, ("input_tensor",)), "output.dropout", "output.LayerNorm",
                                        "output"),),
        })


def _decoder_like(name: str) -> ArchSpec:  # Llama, Mistral, Qwen2
    return ArchSpec(
        name=name, layers=("layers",), ah_layers="layers", post_norm=False,
        sites={
            "mh_adapter": (SiteSpec(("input_layernorm", 0, ("hidden_states",)), "self_attn", None,
                                    "attention_adapters"),),
            "output_adapter": (SiteSpec(("post_attention_layernorm", 0, ("hidden_states",)), "mlp", None,
                                        "output_adapters"),),
        })


SUPPORTED_ARCHITECTURES: Dict[str, ArchSpec] = {
    "bert": _bert_like("bert"),
    "roberta": _bert_like("roberta"),
    "xlm-roberta": _bert_like("xlm-roberta"),
    "electra": _bert_like("electra"),
    "distilbert": ArchSpec(
        name="distilbert", layers=("transformer.layer",), ah_layers="transformer.layer", post_norm=True,
        sites={
            "mh_adapter": (SiteSpec(("", 0, ("hidden_states", "x")), "attention", "sa_layer_norm",
                                    "attention_adapters"),),
            "output_adapter": (SiteSpec(("ffn", 0, ("input",)), "ffn", "output_layer_norm", "output_adapters"),),
        }),
    "vit": ArchSpec(
        name="vit", layers=("encoder.layer", "layers"), ah_layers="encoder.layer", post_norm=False,
        sites={
            # transformers 5.x: one block-level dropout after attention and after the MLP, called twice
            "mh_adapter": (SiteSpec(("layernorm_before", 0, ("input",)), "dropout", None, "attention_adapters",
                                    requires=("mlp", "dropout")),
                           SiteSpec(("layernorm_before", 0, ("input",)), "attention", None, "attention_adapters",
                                    requires=("output.dropout",))),
            "output_adapter": (SiteSpec(("layernorm_after", 0, ("input",)), "dropout", None, "output.output_adapters",
                                        requires=("mlp", "dropout")),
                               SiteSpec(("layernorm_after", 0, ("input",)), "output.dropout", None,
                                        "output.output_adapters", requires=("output.dropout",))),
        }),
    "gpt2": ArchSpec(
        name="gpt2", layers=("h",), ah_layers="h", post_norm=False,
        sites={
            "mh_adapter": (SiteSpec(("ln_1", 0, ("input",)), "attn", None, "attention_adapters"),),
            "output_adapter": (SiteSpec(("ln_2", 0, ("input",)), "mlp", None, "output_adapters"),),
        }),
    "llama": _decoder_like("llama"),
    "mistral": _decoder_like("mistral"),
    "qwen2": _decoder_like("qwen2"),
}


@dataclass(frozen=True)
class Placement:
    """AdapterHub's ``BnConfig`` fields that decide a site's inputs (``pre_forward``)."""

    name: str
    locations: Tuple[str, ...]
    default_activation: str
    original_ln_before: bool
    residual_before_ln: Union[bool, str]


PLACEMENTS: Dict[str, Placement] = {
    "seq_bn": Placement("seq_bn", ("output_adapter",), "relu", True, True),
    "double_seq_bn": Placement("double_seq_bn", ("mh_adapter", "output_adapter"), "swish", False, True),
}
_PLACEMENT_ALIASES = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn"}


def _supported_list() -> str:
    return ", ".join(sorted(SUPPORTED_ARCHITECTURES))


def get_module(root: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at a dotted path ("" is ``root``; digits index a ModuleList), or None."""
    mod = root
    for part in path.split(".") if path else ():
        if part.isdigit() and isinstance(mod, (nn.ModuleList, nn.Sequential)):
            mod = mod[int(part)] if int(part) < len(mod) else None
        else:
            mod = getattr(mod, part, None)
        if not isinstance(mod, nn.Module):
            return None
    return mod


def arch_spec(model: nn.Module, *, what: str = "patch") -> ArchSpec:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise TypeError(f"fusedadapter.{what}: expected a Hugging Face PreTrainedModel with a .config, got "
                        f"{type(model).__name__}")
    spec = SUPPORTED_ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(
            f"fusedadapter.{what}: model type {model_type!r} ({type(model).__name__}) is not supported; supported "
            f"architectures: {_supported_list()}")
    return spec


def find_layers(model: nn.Module, spec: ArchSpec) -> List[Tuple[str, nn.Module]]:
    """[(full module name, block)] of the model's transformer blocks, in order."""
    base = getattr(model, "base_model", model)
    for path in spec.layers:
        layers = get_module(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            names = {id(m): n for n, m in model.named_modules()}
            return [(names[id(layer)], layer) for layer in layers]
    raise UnsupportedArchitecture(
        f"fusedadapter: could not find the transformer blocks of this {spec.name} model (looked for "
        f"{' / '.join(spec.layers)} under {type(base).__name__}); is it a supported transformers version?")


def resolve_site(layer: nn.Module, spec: ArchSpec, location: str) -> SiteSpec:
    for alt in spec.sites[location]:
        needed = (alt.capture[0], alt.output) + ((alt.layer_norm,) if alt.layer_norm else ()) + alt.requires
        if all(get_module(layer, p) is not None for p in needed):
            return alt
    raise UnsupportedArchitecture(
        f"fusedadapter: {spec.name} block {type(layer).__name__} does not have the modules of the {location} site "
        f"({[a.output for a in spec.sites[location]]}); is it a supported transformers version?")


def ah_prefix(model: nn.Module) -> str:
    """The prefix AdapterHub's parameter names carry in this model ("" for a base model, else e.g. "bert.")."""
    base_prefix = getattr(model, "base_model_prefix", "")
    if base_prefix and hasattr(model, base_prefix) and isinstance(getattr(model, base_prefix), nn.Module):
        return base_prefix + "."
    return ""


def resolve_placement(placement: str) -> Placement:
    key = _PLACEMENT_ALIASES.get(placement, placement)
    if key not in PLACEMENTS:
        raise ValueError(f"fusedadapter.patch: unknown placement {placement!r}; expected one of "
                         f"{sorted(PLACEMENTS)} (or AdapterHub's aliases {sorted(_PLACEMENT_ALIASES)})")
    return PLACEMENTS[key]
