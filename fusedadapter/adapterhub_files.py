"""Reading, checking and writing the files of an AdapterHub checkpoint (``adapters`` 1.3.0).

The helpers of :func:`fusedadapter.load_adapterhub` / :func:`fusedadapter.save_adapterhub`
(:mod:`fusedadapter.checkpoint`): JSON and weight files (safetensors or torch), the base-prefix
and legacy key forms, the ``BnConfig`` checks, the per-site parameter checks against the model,
and the writer. Every problem raises :class:`~fusedadapter.adapterhub_format.AdapterHubFormatError`
naming the file and the field or key. The format constants live in
:mod:`fusedadapter.adapterhub_format`; the architecture table in :mod:`fusedadapter.architectures`.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from .activations import canonical_activation
from .adapterhub_format import AdapterHubFormatError, bn_config_template
from .adapterhub_format import ADAPTER_PARAMS_IGNORED as _ADAPTER_PARAMS_IGNORED
from .adapterhub_format import BN_DEFAULTS as _BN_DEFAULTS
from .adapterhub_format import BN_PRESETS as _PRESETS
from .adapterhub_format import LEGACY_ACTIVATION_RENAME as _LEGACY_ACTIVATION_RENAME
from .adapterhub_format import LEGACY_WEIGHT_RENAME as _LEGACY_WEIGHT_RENAME
from .architectures import SUPPORTED_ARCHITECTURES, ArchSpec
from .config import FusionConfig


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def _err(path: str, msg: str) -> AdapterHubFormatError:
    return AdapterHubFormatError(f"{path}: {msg}")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise _err(path, "file not found")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _err(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _err(path, f"expected a JSON object, got {type(data).__name__}")
    return data


def _read_weights(directory: str, safe_name: str, bin_name: str) -> Tuple[str, Dict[str, torch.Tensor]]:
    safe, binary = os.path.join(directory, safe_name), os.path.join(directory, bin_name)
    if os.path.isfile(safe):
        path = safe
        try:
            from safetensors.torch import load_file

            sd = load_file(safe, device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise _err(safe, f"cannot read safetensors weights ({exc})") from None
    elif os.path.isfile(binary):
        path = binary
        try:
            sd = torch.load(binary, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _err(binary, f"cannot read torch weights ({exc})") from None
    else:
        raise AdapterHubFormatError(f"{directory}: no weights file ({safe_name} or {bin_name})")
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise _err(path, "expected a mapping of parameter names to tensors")
    return path, dict(sd)


def _normalize_keys(sd: Dict[str, torch.Tensor], model: nn.Module, path: str) -> Dict[str, torch.Tensor]:
    """Strip the base-model prefix (both key forms are valid) and apply AdapterHub's legacy renames."""
    base = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for k, v in sd.items():
        nk = k[len(base) + 1:] if base and k.startswith(base + ".") else k
        for old, new in _LEGACY_WEIGHT_RENAME.items():
            nk = nk.replace(old, new)
        if nk in out:
            raise _err(path, f"key {k!r} appears both with and without the {base!r} prefix")
        out[nk] = v
    return out


def _config_dict(meta: dict, path: str) -> dict:
    if "config" not in meta:
        raise _err(path, "missing field 'config'")
    cfg = meta["config"]
    if isinstance(cfg, str):
        if cfg not in _PRESETS:
            raise _err(path, f"field 'config' names the preset {cfg!r}; load_adapterhub reads the bottleneck presets "
                             f"{sorted(_PRESETS)} or a full config dict")
        cfg = bn_config_template(cfg)
    if not isinstance(cfg, dict):
        raise _err(path, f"field 'config' must be an object, got {type(cfg).__name__}")
    return dict(cfg)


def _check_adapter_config(cfg: dict, meta: dict, path: str, hidden: int) -> dict:
    """Validate one adapter's BnConfig dict; returns it completed with BnConfig defaults."""
    arch = cfg.get("architecture")
    if arch not in (None, "bottleneck"):
        raise _err(path, f"field 'config.architecture' is {arch!r}: only bottleneck adapters can be fused")
    for key in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity"):
        if key not in cfg:
            raise _err(path, f"missing field 'config.{key}'")
    full = dict(_BN_DEFAULTS)
    full.update(cfg)
    if "version" not in meta and isinstance(full["non_linearity"], str) and \
            full["non_linearity"] in _LEGACY_ACTIVATION_RENAME:
        full["non_linearity"] = _LEGACY_ACTIVATION_RENAME[full["non_linearity"]]
    for key in ("mh_adapter", "output_adapter", "original_ln_before", "original_ln_after", "ln_before", "is_parallel",
                "phm_layer"):
        if not isinstance(full[key], bool):
            raise _err(path, f"field 'config.{key}' must be true or false, got {full[key]!r}")
    if not isinstance(full["non_linearity"], str):
        raise _err(path, f"field 'config.non_linearity' must be a string, got {full['non_linearity']!r}")
    try:
        canonical_activation(full["non_linearity"])
    except ValueError as exc:
        raise _err(path, f"field 'config.non_linearity': {exc}") from None
    rf = full["reduction_factor"]
    if isinstance(rf, Mapping):
        for k, v in rf.items():
            if not _positive_number(v):
                raise _err(path, f"field 'config.reduction_factor[{k!r}]' must be a positive number, got {v!r}")
    elif not _positive_number(rf):
        raise _err(path, f"field 'config.reduction_factor' must be a positive number or a mapping, got {rf!r}")
    if full["is_parallel"]:
        raise _err(path, "field 'config.is_parallel' is true: parallel adapters are not supported by load_adapterhub")
    if full["phm_layer"]:
        raise _err(path, "field 'config.phm_layer' is true: PHM (Compacter) adapters are not supported")
    if not full["original_ln_after"]:
        raise _err(path, "field 'config.original_ln_after' is false: only sites that end with the model's own "
                         "residual (and LayerNorm) are supported")
    if full["residual_before_ln"] not in (True, False, "post_add"):
        raise _err(path, f"field 'config.residual_before_ln' must be true, false or 'post_add', got "
                         f"{full['residual_before_ln']!r}")
    sc = full["scaling"]
    if isinstance(sc, bool) or not (isinstance(sc, (int, float)) or sc in ("learned", "channel")):
        raise _err(path, f"field 'config.scaling' must be a number, 'learned' or 'channel', got {sc!r}")
    lo = full["leave_out"]
    if lo is None:
        full["leave_out"] = lo = []
    if not isinstance(lo, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in lo):
        raise _err(path, f"field 'config.leave_out' must be a list of layer indices, got {lo!r}")
    if full.get("cross_adapter"):
        warnings.warn(f"{path}: 'config.cross_adapter' is set; cross-attention sites are not part of the "
                      f"supported (encoder / decoder-only) models and are ignored", RuntimeWarning, stacklevel=4)
    hs = meta.get("hidden_size")
    if hs is not None and hs != hidden:
        raise _err(path, f"field 'hidden_size' is {hs!r} but the model's hidden size is {hidden}")
    return full


def _positive_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)


def _width(cfg: dict, layer_idx: int, hidden: int, path: str) -> int:
    rf = cfg["reduction_factor"]
    if isinstance(rf, Mapping):
        if str(layer_idx) in rf:
            rf = rf[str(layer_idx)]
        elif "default" in rf:
            rf = rf["default"]
        else:
            raise _err(path, f"field 'config.reduction_factor' has no entry for layer {layer_idx} and no 'default'")
    return max(1, int(hidden // rf))


def _site_regex(spec: ArchSpec, ah_path: str, tail: str) -> re.Pattern:
    return re.compile(rf"^{re.escape(spec.ah_layers)}\.(\d+)\.{re.escape(ah_path)}\.{tail}$")


def _ah_paths(spec: ArchSpec) -> Dict[str, str]:
    return {loc: alts[0].ah_path for loc, alts in spec.sites.items()}



def _check_model_type(meta: dict, path: str, model_type: str) -> None:
    mt = meta.get("model_type")
    if mt is not None and mt != model_type:
        a, b = SUPPORTED_ARCHITECTURES.get(mt), SUPPORTED_ARCHITECTURES.get(model_type)
        if a is None or b is None or a.sites != b.sites or a.ah_layers != b.ah_layers:
            raise _err(path, f"field 'model_type' is {mt!r} but the model is {model_type!r}")


def _check_adapter_params(params: Dict[str, torch.Tensor], cfg: dict, site, hidden: int, wpath: str,
                          cpath: str) -> Dict[str, torch.Tensor]:
    i, loc = site
    ln = bool(cfg["ln_before"])
    k = 1 if ln else 0
    where = f"block {i} {loc}"
    required = {f"adapter_down.{k}.weight", f"adapter_down.{k}.bias", "adapter_up.weight", "adapter_up.bias"}
    if ln:
        required |= {"adapter_down.0.weight", "adapter_down.0.bias"}
    if cfg["scaling"] in ("learned", "channel"):
        required.add("scaling")
    for key in sorted(required):
        if key not in params:
            raise _err(wpath, f"missing parameter {key!r} of the adapter at {where} (config: ln_before={ln}, "
                              f"scaling={cfg['scaling']!r})")
    for key in params:
        if key not in required and not _ADAPTER_PARAMS_IGNORED.match(key):
            raise _err(wpath, f"unexpected parameter {key!r} of the adapter at {where} (config: ln_before={ln}, "
                              f"scaling={cfg['scaling']!r}, phm_layer={cfg['phm_layer']})")
    down = params[f"adapter_down.{k}.weight"]
    if down.dim() != 2 or down.shape[1] != hidden:
        raise _err(wpath, f"adapter_down.{k}.weight at {where} has shape {tuple(down.shape)}, expected (r, {hidden})")
    r = down.shape[0]
    want = _width(cfg, i, hidden, cpath)
    if r != want:
        raise _err(wpath, f"the adapter at {where} has width {r}, but field 'config.reduction_factor' "
                          f"({cfg['reduction_factor']!r}) of {cpath} gives {want} for hidden size {hidden}")
    shapes = {f"adapter_down.{k}.bias": (r,), "adapter_up.weight": (hidden, r), "adapter_up.bias": (hidden,)}
    if ln:
        shapes.update({"adapter_down.0.weight": (hidden,), "adapter_down.0.bias": (hidden,)})
    if cfg["scaling"] == "learned":
        shapes["scaling"] = (1,)
    elif cfg["scaling"] == "channel":
        shapes["scaling"] = (hidden,)
    for key, shape in shapes.items():
        if tuple(params[key].shape) != shape:
            raise _err(wpath, f"{key} at {where} has shape {tuple(params[key].shape)}, expected {shape}")
    for key in required:
        if not params[key].is_floating_point():
            raise _err(wpath, f"{key} at {where} has dtype {params[key].dtype}, expected a floating-point tensor")
    return {key: params[key] for key in required}


def _check_fusion_params(params: Dict[str, torch.Tensor], fcfg: FusionConfig, site, hidden: int, wpath: str,
                         spec: ArchSpec, ah_paths, fusion_name) -> Dict[str, torch.Tensor]:
    i, loc = site
    required = {}
    if fcfg.query:
        required.update({"query.weight": (hidden, hidden), "query.bias": (hidden,)})
    if fcfg.key:
        required.update({"key.weight": (hidden, hidden), "key.bias": (hidden,)})
    if fcfg.value:
        required["value.weight"] = (hidden, hidden)
    prefix = f"{spec.ah_layers}.{i}.{ah_paths[loc]}.adapter_fusion_layer.{fusion_name}."
    for key, shape in required.items():
        if key not in params:
            raise _err(wpath, f"missing fusion parameter {prefix + key!r} (fusion config: query={fcfg.query}, "
                              f"key={fcfg.key}, value={fcfg.value})")
        t = params[key]
        if tuple(t.shape) != shape or not t.is_floating_point():
            raise _err(wpath, f"{prefix + key} has shape {tuple(t.shape)} / dtype {t.dtype}, expected a "
                              f"floating-point tensor of shape {shape}")
    for key in params:
        if key not in required and not key.startswith("dense."):
            raise _err(wpath, f"unexpected fusion parameter {prefix + key!r} (fusion config: query={fcfg.query}, "
                              f"key={fcfg.key}, value={fcfg.value})")
    return dict((k, params[k]) for k in required)


def _saveable_config(cfg: dict) -> dict:
    out = dict(cfg)
    out.pop("architecture", None)
    return out



# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _write(directory: str, config_name: str, config: dict, weights_name: str, safe_name: str,
           state: Dict[str, torch.Tensor], use_safetensors: bool) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, config_name), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if use_safetensors:
        from safetensors.torch import save_file

        save_file(state, os.path.join(directory, safe_name))
    else:
        torch.save(state, os.path.join(directory, weights_name))
