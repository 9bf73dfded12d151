"""Configuration objects, named and defaulted like AdapterHub's.

`AdapterConfig` describes one bottleneck adapter (AdapterHub's `BnConfig` fields that change
what a fused site computes); `FusionConfig` is AdapterHub's `AdapterFusionConfig` with its two
presets, `dynamic` (the default) and `static`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from .activations import canonical_activation

__all__ = ["AdapterConfig", "FusionConfig", "FUSION_PRESETS", "check_adapter_name"]


def check_adapter_name(name, where: str = "") -> str:
    """The one rule for adapter names (:class:`fusedadapter.FusedAdapterFusion`, :func:`fusedadapter.patch`):
    a non-empty ``str`` without ``'.'`` (names are module keys: ``adapters.<name>.adapter_up.weight``)
    or ``','`` (AdapterHub names a fusion by its adapters' names joined with ``','``, as its
    ``Fuse`` and its saved folders do). Returns ``name``; raises ``ValueError`` (``where`` prefixes
    the message)."""
    if not isinstance(name, str) or not name or "." in name or "," in name:
        raise ValueError(f"{where}adapter names must be non-empty strings without '.' or ',' (module keys; "
                         f"AdapterHub joins a fusion's adapter names with ','), got {name!r}")
    return name


def _flag(owner: str, field: str, value):
    """A boolean config flag: ``True``/``False`` (numpy bools too), or the ints 0 and 1 (as ``False`` and
    ``True``); anything else raises ``TypeError`` naming the field (``"no"`` or ``"False"`` are truthy
    strings and used to switch a flag on)."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{owner}.{field} must be a bool (True or False), got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class AdapterConfig:
    """One bottleneck adapter: ``up = scaling * W_up act(W_down [LN](x) + b_down) + b_up``.

    Width: ``bottleneck_size`` when given, else ``int(hidden_size // reduction_factor)`` (at
    least 1), exactly as AdapterHub computes ``down_sample``. ``non_linearity=None`` takes the
    placement's default (``relu`` for ``seq_bn``, ``swish`` for ``double_seq_bn``) where a
    placement applies, and ``relu`` elsewhere.
    ``scaling``: a float, ``"learned"`` (one trainable scalar) or ``"channel"`` (a trainable
    vector of the hidden size), as AdapterHub's ``scaling``.
    """

    reduction_factor: float = 16
    bottleneck_size: Optional[int] = None
    non_linearity: Optional[str] = "relu"
    scaling: Union[float, str] = 1.0
    ln_before: bool = False

    def __post_init__(self):
        object.__setattr__(self, "ln_before", _flag("AdapterConfig", "ln_before", self.ln_before))
        if self.bottleneck_size is not None:
            if isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1:
                raise ValueError(f"AdapterConfig.bottleneck_size must be a positive int or None, got {self.bottleneck_size!r}")
        elif not isinstance(self.reduction_factor, (int, float)) or isinstance(self.reduction_factor, bool) or self.reduction_factor <= 0:
            raise ValueError(f"AdapterConfig.reduction_factor must be a positive number, got {self.reduction_factor!r}")
        if self.non_linearity is not None:
            canonical_activation(self.non_linearity)  # raises on unknown names
        if isinstance(self.scaling, str):
            if self.scaling not in ("learned", "channel"):
                raise ValueError(
                    f"AdapterConfig.scaling must be a float, 'learned' or 'channel', got {self.scaling!r}"
                )
        elif not isinstance(self.scaling, (int, float)) or isinstance(self.scaling, bool):
            raise ValueError(f"AdapterConfig.scaling must be a float, 'learned' or 'channel', got {self.scaling!r}")

    def width(self, hidden_size: int) -> int:
        if self.bottleneck_size is not None:
            return int(self.bottleneck_size)
        return max(1, int(hidden_size // self.reduction_factor))

    def activation(self, default: str = "relu") -> str:
        return canonical_activation(self.non_linearity if self.non_linearity is not None else default)


@dataclass(frozen=True)
class FusionConfig:
    """AdapterHub's ``AdapterFusionConfig`` (same field names, defaults of the ``dynamic`` preset).

    ``value_before_softmax`` does not change the result (``W_V`` has no bias and the
    probabilities sum to one) and is kept for file compatibility. ``dropout_prob=None`` or
    ``0.0`` means "the model's attention dropout" in AdapterHub (it uses ``or``); a bare
    fusion layer has no model, so it then uses ``default_dropout`` (0.1, BERT's value), see
    :meth:`effective_dropout`.
    """

    query: bool = True
    key: bool = True
    value: bool = True
    query_before_ln: bool = False
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: bool = True  # AdapterHub annotates it str, but uses it (and saves it) as a bool
    dropout_prob: Optional[float] = None
    regularization: bool = True

    def __post_init__(self):
        for name in _BOOL_FLAGS:
            object.__setattr__(self, name, _flag("FusionConfig", name, getattr(self, name)))
        if self.dropout_prob is not None and not (0.0 <= float(self.dropout_prob) < 1.0):
            raise ValueError(f"FusionConfig.dropout_prob must be in [0, 1) or None, got {self.dropout_prob!r}")

    @classmethod
    def load(cls, config: Union[str, Mapping[str, Any], "FusionConfig"] = "dynamic", **overrides: Any) -> "FusionConfig":
        """``FusionConfig.load("dynamic" | "static" | dict | FusionConfig, **overrides)``."""
        if isinstance(config, FusionConfig):
            base = config.to_dict()
        elif isinstance(config, str):
            if config not in FUSION_PRESETS:
                raise ValueError(f"unknown fusion preset {config!r}; expected one of {sorted(FUSION_PRESETS)}")
            base = FUSION_PRESETS[config].to_dict()
        elif isinstance(config, Mapping):
            base = FUSION_PRESETS["dynamic"].to_dict()
            unknown = set(config) - set(base) - {"architecture"}
            if unknown:
                raise ValueError(f"unknown FusionConfig fields {sorted(unknown)}; expected a subset of {sorted(base)}")
            base.update({k: v for k, v in config.items() if k in base})
        else:
            raise TypeError(f"fusion config must be a preset name, a mapping or a FusionConfig, got {type(config).__name__}")
        unknown = set(overrides) - set(base)
        if unknown:
            raise ValueError(f"unknown FusionConfig fields {sorted(unknown)}; expected a subset of {sorted(base)}")
        base.update(overrides)
        return cls(**base)

    def effective_dropout(self, default_dropout: float = 0.1) -> float:
        """AdapterHub: ``fusion_config.dropout_prob or model_config.attention_probs_dropout_prob``."""
        return float(self.dropout_prob or default_dropout)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_BOOL_FLAGS = ("query", "key", "value", "query_before_ln", "residual_before", "temperature", "value_before_softmax",
               "value_initialized", "regularization")

FUSION_PRESETS = {
    "dynamic": FusionConfig(),
    "static": FusionConfig(value=False, regularization=False, value_initialized=False),
}
