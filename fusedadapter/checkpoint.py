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

The file reading, checking and writing helpers live in :mod:`fusedadapter.adapterhub_files`, the
format constants in :mod:`fusedadapter.adapterhub_format`; this module is the two entry points.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Dict, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn

from .adapterhub_format import (AH_FORMAT_VERSION, CONFIG_NAME, FUSION_CONFIG_NAME, FUSION_WEIGHTS_NAME,
                                SAFE_FUSION_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, AdapterHubFormatError,
                                bn_config_template)
from .adapterhub_files import (_ah_paths, _check_adapter_config, _check_adapter_params, _check_fusion_params,
                               _check_model_type, _config_dict, _err, _normalize_keys, _read_json, _read_weights,
                               _saveable_config, _site_regex, _write)
from .architectures import SUPPORTED_ARCHITECTURES, ah_prefix, arch_spec, find_layers
from .config import AdapterConfig, FusionConfig
from .patching import SitePlan, install, patch_record

__all__ = ["load_adapterhub", "save_adapterhub", "AdapterHubFormatError", "bn_config_template",
           "CONFIG_NAME", "WEIGHTS_NAME", "SAFE_WEIGHTS_NAME", "FUSION_CONFIG_NAME", "FUSION_WEIGHTS_NAME",
           "SAFE_FUSION_WEIGHTS_NAME"]


def load_adapterhub(model: nn.Module, fusion_dir: Union[str, Sequence[str]],
                    adapter_dirs: Union[None, Sequence[str], Mapping[str, str]] = None,
                    backend: str = "auto") -> nn.Module:
    """Patch ``model`` in place with an AdapterHub-trained AdapterFusion and its adapters; returns ``model``.

    ``fusion_dir``: what ``save_adapter_fusion`` wrote. ``adapter_dirs``: None (``<parent of
    fusion_dir>/<name>`` for each name in ``adapter_fusion_config.json``), a sequence in the
    fusion's adapter order, or a mapping name -> directory. Works without ``adapters`` installed.

    Several fusions over one adapter pool (multi-task serving, docs/multitask.md): ``fusion_dir``
    a list of fusion directories (``save_adapter_fusion`` / ``save_all_adapter_fusions``, one per
    fusion). Every site is then a :class:`fusedadapter.MultiFusion` holding the pool (the union of
    the fusions' adapters) once and the fusions under their saved names, in the list's order
    (route ids); ``adapter_dirs``: None (each adapter beside the first fusion that names it) or a
    mapping name -> directory. Route rows with :func:`fusedadapter.fusion_route`.
    """
    spec = arch_spec(model, what="load_adapterhub")
    if patch_record(model) is not None:
        raise ValueError("fusedadapter.load_adapterhub: the model is already patched; call fusedadapter.unpatch first")
    multi = not isinstance(fusion_dir, (str, os.PathLike))
    fusion_dirs = list(fusion_dir) if multi else [fusion_dir]
    if multi and (not fusion_dirs or not all(isinstance(d, (str, os.PathLike)) for d in fusion_dirs)):
        raise TypeError(f"fusedadapter.load_adapterhub: fusion_dir must be a directory or a non-empty list of fusion "
                        f"directories, got {fusion_dir!r}")
    n_layers = len(find_layers(model, spec))
    hidden = int(model.config.hidden_size)
    model_type = model.config.model_type
    fusions = [_read_fusion_config(str(d), hidden, model_type) for d in fusion_dirs]
    fnames = [f.name for f in fusions]
    if len(set(fnames)) != len(fnames):
        raise ValueError(f"fusedadapter.load_adapterhub: two fusion directories hold the same fusion name ({fnames})")
    if len({f.config.query_before_ln for f in fusions}) != 1:
        raise AdapterHubFormatError(f"{', '.join(f.path for f in fusions)}: the fusions disagree on field "
                                    f"'config.query_before_ln'; fusedadapter feeds one query per site")
    pool = list(dict.fromkeys(n for f in fusions for n in f.names))
    dirs = _adapter_dirs(fusions, pool, adapter_dirs, multi)

    ah_paths = _ah_paths(spec)
    firsts = {f.names[0] for f in fusions}
    configs: Dict[str, dict] = {}
    site_weights: Dict[Tuple[int, str], Dict[str, Dict[str, torch.Tensor]]] = {}  # (layer, loc) -> name -> params
    for n in pool:
        configs[n] = _read_adapter(model, spec, ah_paths, n, dirs[n], n in firsts, n_layers, hidden, model_type,
                                   site_weights)
    for f in fusions:
        f.read_weights(model, spec, ah_paths, configs, dirs, n_layers)

    plans, weights = [], []
    for loc in ("mh_adapter", "output_adapter"):
        for i in range(n_layers):
            here = {f.name: [n for n in f.names if n in site_weights.get((i, loc), {})] for f in fusions
                    if loc in f.locs}
            here = {k: v for k, v in here.items() if v}
            if not here:
                continue  # AdapterHub skips a block where no fused adapter lives
            lacking = [f.name for f in fusions if f.name not in here]
            if lacking:
                raise AdapterHubFormatError(
                    f"block {i} {loc}: fusions {sorted(here)} have a site there but {lacking} do not (their adapters' "
                    f"'config.{loc}' / 'config.leave_out'); the fusions of one model must share their sites")
            site_fparams, lasts = {}, {}
            for f in fusions:
                last = f.names[-1]
                if last not in here[f.name]:
                    raise _err(os.path.join(dirs[last], CONFIG_NAME),
                               f"field 'config.leave_out' leaves out block {i}, where other fused adapters live; "
                               f"AdapterHub needs the last adapter of a Fuse at every site it runs")
                site_fparams[f.name] = _check_fusion_params(f.found.get((i, loc), {}), f.config, (i, loc), hidden,
                                                            f.wpath, spec, ah_paths, f.name)
                lasts[f.name] = (configs[last]["original_ln_before"], configs[last]["residual_before_ln"])
            if len(set(lasts.values())) != 1:
                raise AdapterHubFormatError(
                    f"block {i} {loc}: the fusions' last adapters disagree on 'config.original_ln_before' / "
                    f"'config.residual_before_ln' ({lasts}); one site cannot run both")
            present = [n for n in pool if any(n in v for v in here.values())]
            adapters = {n: AdapterConfig(bottleneck_size=int(site_weights[(i, loc)][n]["adapter_up.weight"].shape[1]),
                                         non_linearity=configs[n]["non_linearity"],
                                         scaling=configs[n]["scaling"] if isinstance(configs[n]["scaling"], str)
                                         else float(configs[n]["scaling"]),
                                         ln_before=bool(configs[n]["ln_before"]))
                        for n in present}
            flags = next(iter(lasts.values()))
            plans.append(SitePlan(i, loc, adapters, fusions[0].config, "relu", flags[0], flags[1],
                                  [(f.name, f.config, here[f.name]) for f in fusions] if multi else None))
            sd = {f"adapters.{n}.{k}": v for n in present for k, v in site_weights[(i, loc)][n].items()}
            for f in fusions:
                fprefix = f"adapter_fusion_layer.{f.name}." if multi else ""
                sd.update({fprefix + k: v for k, v in site_fparams[f.name].items()})
            weights.append(sd)
    if not plans:
        raise _err(fusions[0].path, "no site to patch: the adapters place no fused site in this model")
    if any(configs[n].get("stochastic_depth", 0) for n in pool):
        warnings.warn("fusedadapter.load_adapterhub: some adapters were trained with stochastic_depth; it only acts "
                      "in training mode in AdapterHub and is not applied here", RuntimeWarning, stacklevel=2)

    # ---- everything checked: change the model
    record = install(model, plans, fusion_name=fnames[0] if not multi else ",".join(pool), adapter_names=pool,
                     fusion_config=fusions[0].config, backend=backend)
    try:
        with torch.no_grad():
            for site, sd in zip(record.sites, weights):
                module = site.module
                own = module.state_dict(keep_vars=True)
                for key in list(sd):  # AdapterHub's second name of the ln_before LayerNorm, where the module has it
                    if key.startswith("adapters.") and ".adapter_down.0." in key:
                        alias = key.replace(".adapter_down.0.", ".adapter_norm_before.")
                        name = key.split(".")[1]
                        if module.adapters[name].config.ln_before and alias in own:
                            sd[alias] = sd[key]
                module.load_state_dict(sd, strict=True)
    except Exception:
        from .patching import unpatch

        unpatch(model)
        raise
    record.ah_configs = {n: _saveable_config(configs[n]) for n in pool}
    if multi:
        record.fusions = [(f.name, f.config, list(f.names)) for f in fusions]
    return model


class _FusionFiles:
    """One fusion directory: its config (checked) and, after :meth:`read_weights`, its weights per site."""

    def __init__(self, path: str, fusion_dir: str, config: FusionConfig, name: str, names: List[str]):
        self.path, self.dir, self.config, self.name, self.names = path, fusion_dir, config, name, names
        self.locs: List[str] = []
        self.found: Dict[Tuple[int, str], Dict[str, torch.Tensor]] = {}
        self.wpath = ""

    def read_weights(self, model, spec, ah_paths, configs, dirs, n_layers) -> None:
        # AdapterHub creates a fusion layer where all fused adapters share the location flag
        for loc in ("mh_adapter", "output_adapter"):
            flags = {n: configs[n][loc] for n in self.names}
            if len(set(flags.values())) > 1:
                raise AdapterHubFormatError(
                    f"{os.path.join(dirs[self.names[0]], CONFIG_NAME)}: the fused adapters disagree on field "
                    f"'config.{loc}' ({flags}); AdapterHub cannot run this Fuse")
            if flags[self.names[0]]:
                self.locs.append(loc)
        self.wpath, fsd = _read_weights(self.dir, SAFE_FUSION_WEIGHTS_NAME, FUSION_WEIGHTS_NAME)
        fsd = _normalize_keys(fsd, model, self.wpath)
        pats = {loc: _site_regex(spec, ah_paths[loc], rf"adapter_fusion_layer\.{re.escape(self.name)}\.(.+)")
                for loc in ah_paths}
        for key, t in fsd.items():
            for loc, pat in pats.items():
                m = pat.match(key)
                if m:
                    self.found.setdefault((int(m.group(1)), loc), {})[m.group(2)] = t
                    break
            else:
                raise _err(self.wpath, f"key {key!r} is not a parameter of fusion {self.name!r} at a {spec.name} site")
        for site in self.found:
            if site[1] not in self.locs or not 0 <= site[0] < n_layers:
                raise _err(self.wpath, f"has fusion weights for block {site[0]} {site[1]}, but the adapters' configs "
                                       f"and the model ({n_layers} blocks) have no such site")


def _read_fusion_config(fusion_dir: str, hidden: int, model_type: str) -> _FusionFiles:
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
    return _FusionFiles(fpath, fusion_dir, fusion_config, fusion_name, list(names))


def _adapter_dirs(fusions: List[_FusionFiles], pool: List[str], adapter_dirs, multi: bool) -> Dict[str, str]:
    what = "the adapters of fusion " + repr(fusions[0].name) if not multi else "the fusions' adapters"
    if adapter_dirs is None:
        dirs: Dict[str, str] = {}
        for f in fusions:
            parent = os.path.dirname(os.path.abspath(f.dir.rstrip("/\\")))
            for n in f.names:
                dirs.setdefault(n, os.path.join(parent, n))
        return dirs
    if isinstance(adapter_dirs, Mapping):
        missing = [n for n in pool if n not in adapter_dirs]
        if missing:
            raise ValueError(f"fusedadapter.load_adapterhub: adapter_dirs has no directory for {missing} "
                             f"({what}: {pool})")
        return {n: adapter_dirs[n] for n in pool}
    if isinstance(adapter_dirs, (list, tuple)) and not multi:
        if len(adapter_dirs) != len(pool):
            raise ValueError(f"fusedadapter.load_adapterhub: {len(adapter_dirs)} adapter_dirs for the "
                             f"{len(pool)} adapters of fusion {fusions[0].name!r} ({pool})")
        return dict(zip(pool, adapter_dirs))
    raise TypeError(f"fusedadapter.load_adapterhub: adapter_dirs must be None, "
                    f"{'a mapping name -> directory (several fusions)' if multi else 'a sequence or a mapping'}, got "
                    f"{type(adapter_dirs).__name__}")


def _read_adapter(model, spec, ah_paths, n: str, d: str, first: bool, n_layers: int, hidden: int, model_type: str,
                  site_weights) -> dict:
    """Read and check adapter ``n`` from directory ``d``; adds its per-site weights to ``site_weights``."""
    cpath = os.path.join(d, CONFIG_NAME)
    meta = _read_json(cpath)
    cfg = _check_adapter_config(_config_dict(meta, cpath), meta, cpath, hidden)
    _check_model_type(meta, cpath, model_type)
    saved_name = meta.get("name", n)
    if not isinstance(saved_name, str) or not saved_name:
        raise _err(cpath, f"field 'name' must be a non-empty string, got {saved_name!r}")
    if first and cfg.get("inv_adapter"):
        raise _err(cpath, f"field 'config.inv_adapter' is {cfg['inv_adapter']!r}: AdapterHub applies the first "
                          f"fused adapter's invertible adapter to the embeddings, which fusedadapter does not")
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
    return cfg


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def save_adapterhub(model: nn.Module, directory: str, *, use_safetensors: bool = False) -> None:
    """Write a patched model's adapters and fusion in AdapterHub's format:
    ``<directory>/<adapter name>/`` for each adapter and ``<directory>/<fusion name>/``.

    AdapterHub reads them with ``model.load_adapter(dir)`` and ``model.load_adapter_fusion(dir)``
    (``use_safetensors=True`` writes ``*.safetensors``, which AdapterHub reads when asked to).
    A model with several fusions (``patch(fusions=...)``, ``load_adapterhub([dirs])``) writes each
    pool adapter once and ``<directory>/<fusion name>/`` per fusion, as AdapterHub's
    ``save_all_adapters`` / ``save_all_adapter_fusions`` do.
    """
    record = patch_record(model)
    if record is None:
        raise ValueError("fusedadapter.save_adapterhub: the model is not patched (fusedadapter.patch / load_adapterhub)")
    spec = SUPPORTED_ARCHITECTURES[record.arch]
    hidden = int(model.config.hidden_size)
    prefix = ah_prefix(model)
    common = {"hidden_size": hidden, "model_class": type(model).__name__,
              "model_name": getattr(model.config, "name_or_path", "") or "", "model_type": model.config.model_type,
              "version": AH_FORMAT_VERSION}
    adapter_states: Dict[str, Dict[str, torch.Tensor]] = {n: {} for n in record.adapter_names}
    fusions = record.fusions or [(record.fusion_name, record.fusion_config, list(record.adapter_names))]
    fusion_states: Dict[str, Dict[str, torch.Tensor]] = {f[0]: {} for f in fusions}
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
        # a MultiFusion site holds one FusedAdapterFusion per fusion, over the pool's adapters
        layers = module.adapter_fusion_layer if record.fusions else {record.fusion_name: module}
        for fname, layer in layers.items():
            for lin_name in ("query", "key", "value"):
                lin = getattr(layer, lin_name)
                if lin is None:
                    continue
                for k, v in lin.state_dict().items():
                    fusion_states[fname][f"{base}.adapter_fusion_layer.{fname}.{lin_name}.{k}"] = v
    os.makedirs(directory, exist_ok=True)
    for name in record.adapter_names:
        cfg = record.ah_configs.get(name)
        if cfg is None:
            raise ValueError(f"fusedadapter.save_adapterhub: no AdapterHub config recorded for adapter {name!r}")
        _write(os.path.join(directory, name), CONFIG_NAME, dict(common, config=cfg, name=name),
               WEIGHTS_NAME, SAFE_WEIGHTS_NAME, adapter_states[name], use_safetensors)
    for fname, fconfig, names in fusions:
        _write(os.path.join(directory, fname), FUSION_CONFIG_NAME,
               dict(common, config=fconfig.to_dict(), name=fname, adapter_names=list(names)),
               FUSION_WEIGHTS_NAME, SAFE_FUSION_WEIGHTS_NAME, fusion_states[fname], use_safetensors)
