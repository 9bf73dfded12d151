"""AdapterHub checkpoints without AdapterHub: ``load_adapterhub`` and ``save_adapterhub``.

Reads and writes the files of ``adapters`` 1.3.0 (``model.save_adapter`` /
``model.save_adapter_fusion``) without importing ``adapters``, so AdapterHub-trained fusions
run on any transformers version :mod:`fusedadapter.patching` supports (5.x included):

=====================  =========================================================================
adapter directory       ``adapter_config.json`` + ``pytorch_adapter.bin`` or ``adapter.safetensors``
fusion directory        ``adapter_fusion_config.json`` + ``pytorch_model_adapter_fusion.bin`` or
                        ``model_adapter_fusion.safetensors``
parameter names         ``[<base prefix>.]<blocks>.<i>.<site>.adapters.<name>.adapter_down.0.weight`` ...
                        ``[<base prefix>.]<blocks>.<i>.<site>.adapter_fusion_layer.<fusion>.query.weight`` ...
=====================  =========================================================================

Both key forms (with the model's base prefix, e.g. ``bert.``, as a model with a head saves
them, and without, as a base model does) are read. Every file is read and checked against the
model (hidden size, sites, shapes, AdapterHub's width rule) before the model changes; a
problem raises :class:`AdapterHubFormatError` naming the file and the field or key.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Dict, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from .activations import canonical_activation
from .adapterhub_format import (AH_FORMAT_VERSION, CONFIG_NAME, FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME,
                                SAFE_FUSION_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, AdapterHubFormatError,
                                bn_config_template)
from .adapterhub_format import ADAPTER_PARAMS_IGNORED as _ADAPTER_PARAMS_IGNORED
from .adapterhub_format import BN_DEFAULTS as _BN_DEFAULTS
from .adapterhub_format import BN_PRESETS as _PRESETS
from .adapterhub_format import LEGACY_ACTIVATION_RENAME as _LEGACY_ACTIVATION_RENAME
from .adapterhub_format import LEGACY_WEIGHT_RENAME as _LEGACY_WEIGHT_RENAME
from .config import AdapterConfig, FusionConfig
from .architectures import SUPPORTED_ARCHITECTURES, ArchSpec, ah_prefix, arch_spec, find_layers
from .patching import SitePlan, install, patch_record

__all__ = ["load_adapterhub", "save_adapterhub", "AdapterHubFormatError", "bn_config_template",
           "CONFIG_NAME", "WEIGHTS_NAME", "SAFE_WEIGHTS_NAME", "FUSION_CONFIG_NAME", "FUSION_WEIGHTS_NAME",
           "SAFE_FUSION_WEIGHTS_NAME"]


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


def load_adapterhub(model: nn.Module, fusion_dir: str, adapter_dirs: Union[None, Sequence[str], Mapping[str, str]] = None,
                    backend: str = "auto") -> nn.Module:
    """Patch ``model`` in place with an AdapterHub-trained AdapterFusion and its adapters; returns ``model``.

    ``fusion_dir``: what ``save_adapter_fusion`` wrote. ``adapter_dirs``: None (``<parent of
    fusion_dir>/<name>`` for each name in ``adapter_fusion_config.json``), a sequence in the
    fusion's adapter order, or a mapping name -> directory. Works without ``adapters`` installed.
    """
    spec = arch_spec(model, what="load_adapterhub")
    if patch_record(model) is not None:
        raise ValueError("fusedadapter.load_adapterhub: the model is already patched; call fusedadapter.unpatch first")
    layers = find_layers(model, spec)
    n_layers = len(layers)
    hidden = int(model.config.hidden_size)
    model_type = model.config.model_type

    # ---- fusion config and weights
    fpath = os.path.join(fusion_dir, FUSION_CONFIG_NAME)
    fmeta = _read_json(fpath)
    if "config" not in fmeta:
        raise _err(fpath, "missing field 'config'")
    try:
        fusion_config = FusionConfig.load(fmeta["config"])
    except (ValueError, TypeError) as exc:
        raise _err(fpath, f"field 'config': {exc}") from None
    fusion_name = fmeta.get("name")
    if not isinstance(fusion_name, str) or not fusion_name:
        raise _err(fpath, f"field 'name' must be a non-empty string, got {fusion_name!r}")
    names = fmeta.get("adapter_names", fusion_name.split(","))
    if isinstance(names, str):
        names = names.split(",")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise _err(fpath, f"field 'adapter_names' must be a non-empty list of adapter names, got {names!r}")
    if len(set(names)) != len(names):
        raise _err(fpath, f"field 'adapter_names' repeats a name: {names!r}")
    for n in names:
        if "." in n:
            raise _err(fpath, f"field 'adapter_names': adapter name {n!r} contains '.'")
    if fmeta.get("hidden_size") is not None and fmeta["hidden_size"] != hidden:
        raise _err(fpath, f"field 'hidden_size' is {fmeta['hidden_size']!r} but the model's hidden size is {hidden}")
    _check_model_type(fmeta, fpath, model_type)

    # ---- adapter directories
    if adapter_dirs is None:
        parent = os.path.dirname(os.path.abspath(fusion_dir.rstrip("/\\")))
        dirs = {n: os.path.join(parent, n) for n in names}
    elif isinstance(adapter_dirs, Mapping):
        missing = [n for n in names if n not in adapter_dirs]
        if missing:
            raise ValueError(f"fusedadapter.load_adapterhub: adapter_dirs has no directory for {missing} "
                             f"(the adapters of fusion {fusion_name!r}: {names})")
        dirs = {n: adapter_dirs[n] for n in names}
    elif isinstance(adapter_dirs, (list, tuple)):
        if len(adapter_dirs) != len(names):
            raise ValueError(f"fusedadapter.load_adapterhub: {len(adapter_dirs)} adapter_dirs for the "
                             f"{len(names)} adapters of fusion {fusion_name!r} ({names})")
        dirs = dict(zip(names, adapter_dirs))
    else:
        raise TypeError(f"fusedadapter.load_adapterhub: adapter_dirs must be None, a sequence or a mapping, got "
                        f"{type(adapter_dirs).__name__}")

    ah_paths = _ah_paths(spec)
    configs: Dict[str, dict] = {}
    site_weights: Dict[Tuple[int, str], Dict[str, Dict[str, torch.Tensor]]] = {}  # (layer, loc) -> name -> params
    for idx, n in enumerate(names):
        d = dirs[n]
        cpath = os.path.join(d, CONFIG_NAME)
        meta = _read_json(cpath)
        cfg = _check_adapter_config(_config_dict(meta, cpath), meta, cpath, hidden)
        _check_model_type(meta, cpath, model_type)
        saved_name = meta.get("name", n)
        if not isinstance(saved_name, str) or not saved_name:
            raise _err(cpath, f"field 'name' must be a non-empty string, got {saved_name!r}")
        if idx == 0 and cfg.get("inv_adapter"):
            raise _err(cpath, f"field 'config.inv_adapter' is {cfg['inv_adapter']!r}: AdapterHub applies the first "
                              f"fused adapter's invertible adapter to the embeddings, which fusedadapter does not")
        configs[n] = cfg
        wpath, sd = _read_weights(d, SAFE_WEIGHTS_NAME, WEIGHTS_NAME)
        sd = _normalize_keys(sd, model, wpath)
        expected_sites = [(i, loc) for loc in ("mh_adapter", "output_adapter") if cfg[loc]
                          for i in range(n_layers) if i not in cfg["leave_out"]]
        found: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
        pats = {loc: _site_regex(spec, ah_paths[loc], rf"adapters\.{re.escape(saved_name)}\.(.+)") for loc in ah_paths}
        for key, t in sd.items():
            if key.startswith(f"invertible_adapters.{saved_name}."):
                continue  # only the first fused adapter's invertible adapter is used (checked above)
            for loc, pat in pats.items():
                m = pat.match(key)
                if m:
                    found.setdefault((int(m.group(1)), loc), {})[m.group(2)] = t
                    break
            else:
                raise _err(wpath, f"key {key!r} is not an adapter parameter of a {spec.name} site "
                                  f"(expected '<{spec.ah_layers}>.<i>.<{'|'.join(sorted(set(ah_paths.values())))}>"
                                  f".adapters.{saved_name}.<param>')")
        for site in found:
            if site not in expected_sites:
                raise _err(wpath, f"has weights for block {site[0]} {site[1]}, but adapter_config.json "
                                  f"(fields 'config.{site[1]}', 'config.leave_out') and the model ({n_layers} blocks) "
                                  f"place no adapter there")
        for site in expected_sites:
            if site not in found:
                raise _err(wpath, f"no weights for block {site[0]} {site[1]}, where adapter_config.json (fields "
                                  f"'config.{site[1]}', 'config.leave_out') places the adapter (expected "
                                  f"'{spec.ah_layers}.{site[0]}.{ah_paths[site[1]]}.adapters.{saved_name}.*')")
            params = _check_adapter_params(found[site], cfg, site, hidden, wpath, cpath)
            site_weights.setdefault(site, {})[n] = params

    # ---- fusion sites: AdapterHub creates a fusion layer where all fused adapters share the location flag
    fusion_locs = []
    for loc in ("mh_adapter", "output_adapter"):
        flags = {n: configs[n][loc] for n in names}
        if len(set(flags.values())) > 1:
            raise AdapterHubFormatError(
                f"{os.path.join(dirs[names[0]], CONFIG_NAME)}: the fused adapters disagree on field 'config.{loc}' "
                f"({flags}); AdapterHub cannot run this Fuse")
        if flags[names[0]]:
            fusion_locs.append(loc)
    wpath, fsd = _read_weights(fusion_dir, SAFE_FUSION_WEIGHTS_NAME, FUSION_WEIGHTS_NAME)
    fsd = _normalize_keys(fsd, model, wpath)
    fpats = {loc: _site_regex(spec, ah_paths[loc], rf"adapter_fusion_layer\.{re.escape(fusion_name)}\.(.+)")
             for loc in ah_paths}
    fusion_found: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
    for key, t in fsd.items():
        for loc, pat in fpats.items():
            m = pat.match(key)
            if m:
                fusion_found.setdefault((int(m.group(1)), loc), {})[m.group(2)] = t
                break
        else:
            raise _err(wpath, f"key {key!r} is not a parameter of fusion {fusion_name!r} at a {spec.name} site")
    for site in fusion_found:
        if site[1] not in fusion_locs or not 0 <= site[0] < n_layers:
            raise _err(wpath, f"has fusion weights for block {site[0]} {site[1]}, but the adapters' configs and the "
                              f"model ({n_layers} blocks) have no such site")

    plans, weights = [], []
    for loc in fusion_locs:
        for i in range(n_layers):
            present = [n for n in names if (i, loc) in site_weights and n in site_weights[(i, loc)]]
            if not present:
                continue  # AdapterHub skips a block where no fused adapter lives
            last = names[-1]
            if last not in present:
                raise _err(os.path.join(dirs[last], CONFIG_NAME),
                           f"field 'config.leave_out' leaves out block {i}, where other fused adapters live; "
                           f"AdapterHub needs the last adapter of a Fuse at every site it runs")
            fparams = _check_fusion_params(fusion_found.get((i, loc), {}), fusion_config, (i, loc), hidden, wpath,
                                           spec, ah_paths, fusion_name)
            last_cfg = configs[last]
            adapters = {n: AdapterConfig(bottleneck_size=int(site_weights[(i, loc)][n]["adapter_up.weight"].shape[1]),
                                         non_linearity=configs[n]["non_linearity"],
                                         scaling=configs[n]["scaling"] if isinstance(configs[n]["scaling"], str)
                                         else float(configs[n]["scaling"]),
                                         ln_before=bool(configs[n]["ln_before"]))
                        for n in present}
            plans.append(SitePlan(i, loc, adapters, fusion_config, "relu", last_cfg["original_ln_before"],
                                  last_cfg["residual_before_ln"]))
            sd = {}
            for n in present:
                for k, v in site_weights[(i, loc)][n].items():
                    sd[f"adapters.{n}.{k}"] = v
            sd.update(fparams)
            weights.append(sd)
    if not plans:
        raise _err(fpath, "no site to patch: the adapters place no fused site in this model")
    if any(configs[n].get("stochastic_depth", 0) for n in names):
        warnings.warn("fusedadapter.load_adapterhub: some adapters were trained with stochastic_depth; it only acts "
                      "in training mode in AdapterHub and is not applied here", RuntimeWarning, stacklevel=2)

    # ---- everything checked: change the model
    record = install(model, plans, fusion_name=fusion_name, adapter_names=names, fusion_config=fusion_config,
                     backend=backend)
    try:
        with torch.no_grad():
            for site, sd in zip(record.sites, weights):
                module = site.module
                own = module.state_dict(keep_vars=True)
                for key in list(sd):  # AdapterHub's second name of the ln_before LayerNorm, where the module has it
                    if ".adapter_down.0." in key:
                        alias = key.replace(".adapter_down.0.", ".adapter_norm_before.")
                        name = key.split(".")[1]
                        if module.adapters[name].config.ln_before and alias in own:
                            sd[alias] = sd[key]
                module.load_state_dict(sd, strict=True)
    except Exception:
        from .patching import unpatch

        unpatch(model)
        raise
    record.ah_configs = {n: _saveable_config(configs[n]) for n in names}
    return model


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
def save_adapterhub(model: nn.Module, directory: str, *, use_safetensors: bool = False) -> None:
    """Write a patched model's adapters and fusion in AdapterHub's format:
    ``<directory>/<adapter name>/`` for each adapter and ``<directory>/<fusion name>/``.

    AdapterHub reads them with ``model.load_adapter(dir)`` and ``model.load_adapter_fusion(dir)``
    (``use_safetensors=True`` writes ``*.safetensors``, which AdapterHub reads when asked to).
    """
    record = patch_record(model)
    if record is None:
        raise ValueError("fusedadapter.save_adapterhub: the model is not patched (fusedadapter.patch / load_adapterhub)")
    if getattr(record, "fusions", None):  # issue 16: not written yet (docs/multitask.md)
        raise NotImplementedError("fusedadapter.save_adapterhub: a model patched with several fusions "
                                  "(patch(fusions=...)) cannot be saved in AdapterHub's format yet")
    spec = SUPPORTED_ARCHITECTURES[record.arch]
    hidden = int(model.config.hidden_size)
    prefix = ah_prefix(model)
    common = {"hidden_size": hidden, "model_class": type(model).__name__,
              "model_name": getattr(model.config, "name_or_path", "") or "", "model_type": model.config.model_type,
              "version": AH_FORMAT_VERSION}
    adapter_states: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in record.adapter_names}
    fusion_state: Dict[str, torch.Tensor] = {}
    for site in record.sites:
        base = f"{prefix}{spec.ah_layers}.{site.layer_idx}.{site.ah_path}"
        module = site.module
        for name, adapter in module.adapters.items():
            st = adapter_states[name]
            for k, v in adapter.state_dict().items():
                st[f"{base}.adapters.{name}.{k}"] = v
            if adapter.config.ln_before:  # AdapterHub registers its LayerNorm twice: write both names
                ln = adapter.layer_norm
                st.setdefault(f"{base}.adapters.{name}.adapter_norm_before.weight", ln.weight)
                st.setdefault(f"{base}.adapters.{name}.adapter_norm_before.bias", ln.bias)
        for lin_name in ("query", "key", "value"):
            lin = getattr(module, lin_name)
            if lin is None:
                continue
            for k, v in lin.state_dict().items():
                fusion_state[f"{base}.adapter_fusion_layer.{record.fusion_name}.{lin_name}.{k}"] = v
    os.makedirs(directory, exist_ok=True)
    for name in record.adapter_names:
        cfg = record.ah_configs.get(name)
        if cfg is None:
            raise ValueError(f"fusedadapter.save_adapterhub: no AdapterHub config recorded for adapter {name!r}")
        _write(os.path.join(directory, name), CONFIG_NAME, dict(common, config=cfg, name=name),
               WEIGHTS_NAME, SAFE_WEIGHTS_NAME, adapter_states[name], use_safetensors)
    _write(os.path.join(directory, record.fusion_name), FUSION_CONFIG_NAME,
           dict(common, config=record.fusion_config.to_dict(), name=record.fusion_name,
                adapter_names=list(record.adapter_names)),
           FUSION_WEIGHTS_NAME, SAFE_FUSION_WEIGHTS_NAME, fusion_state, use_safetensors)


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
