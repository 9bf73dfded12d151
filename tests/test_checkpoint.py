"""save_adapterhub / load_adapterhub without AdapterHub: round trips, the files, and clear errors.

(Files written by AdapterHub itself are checked in test_adapterhub_integration.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fusedadapter as fa
from fusedadapter.checkpoint import AdapterHubFormatError
from fusedadapter.patching import collect_fusion_probs, fusion_sites, is_patched
from fusedadapter.testing import perturb_
from tiny_models import last_hidden, one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

ADAPTERS = {
    "a": fa.AdapterConfig(bottleneck_size=8, non_linearity=None),
    "b": fa.AdapterConfig(bottleneck_size=5, non_linearity="gelu_new", ln_before=True, scaling="learned"),
    "c": fa.AdapterConfig(reduction_factor=11, non_linearity="tanh", scaling="channel"),
}
FUSE = "a,b,c"


def _patched(arch="bert", placement="seq_bn", fusion="dynamic", head=False, seed=4):
    model = tiny_model(arch, head=head)
    fa.patch(model, ADAPTERS, fusion=fusion, placement=placement, backend="reference")
    g = torch.Generator().manual_seed(seed)
    for _, _, site in fusion_sites(model):
        perturb_(site, g)
    return model


def _out(model, inputs):
    with torch.no_grad(), collect_fusion_probs(model) as probs:
        out = model(**inputs)
    y = out.logits if hasattr(out, "logits") and not hasattr(out, "last_hidden_state") else last_hidden(out)
    return y, probs


@pytest.mark.parametrize("arch,placement,fusion,safe", [
    ("bert", "seq_bn", "dynamic", False),
    ("gpt2", "double_seq_bn", "static", True),
    ("vit", "double_seq_bn", "dynamic", False),
    ("qwen2", "seq_bn", {"query_before_ln": True, "residual_before": True, "temperature": True}, True),
])
def test_round_trip(arch, placement, fusion, safe, tmp_path):
    model = _patched(arch, placement, fusion)
    inputs = tiny_inputs(arch)
    fa.save_adapterhub(model, str(tmp_path), use_safetensors=safe)
    weights = ("adapter.safetensors", "model_adapter_fusion.safetensors") if safe else (
        "pytorch_adapter.bin", "pytorch_model_adapter_fusion.bin")
    for n in "abc":
        assert sorted(os.listdir(tmp_path / n)) == sorted(["adapter_config.json", weights[0]])
    assert sorted(os.listdir(tmp_path / FUSE)) == sorted(["adapter_fusion_config.json", weights[1]])
    y, probs = _out(model, inputs)

    fresh = tiny_model(arch)
    assert fa.load_adapterhub(fresh, str(tmp_path / FUSE), backend="reference") is fresh
    y2, probs2 = _out(fresh, inputs)
    assert torch.equal(y, y2)
    assert probs.keys() == probs2.keys()
    for i in probs[FUSE]:
        for loc in probs[FUSE][i]:
            assert torch.equal(probs[FUSE][i][loc], probs2[FUSE][i][loc])
    ours = {(i, loc): s for i, loc, s in fusion_sites(fresh)}
    for i, loc, s in fusion_sites(model):
        assert ours[(i, loc)].fusion_config == s.fusion_config
        assert [(n, a.bottleneck_size, a.activation_name, a.config.scaling, a.config.ln_before)
                for n, a in ours[(i, loc)].adapters.items()] == [
            (n, a.bottleneck_size, a.activation_name, a.config.scaling, a.config.ln_before) for n, a in s.adapters.items()]


def test_written_files_are_adapterhubs_format(tmp_path):
    model = _patched("bert", "double_seq_bn", head=True)
    fa.save_adapterhub(model, str(tmp_path))
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["name"] == "b" and cfg["model_type"] == "bert" and cfg["hidden_size"] == 32
    assert cfg["version"].startswith("adapters.")
    c = cfg["config"]
    assert c["mh_adapter"] is True and c["output_adapter"] is True and c["original_ln_before"] is False
    assert c["non_linearity"] == "gelu_new" and c["ln_before"] is True and c["scaling"] == "learned"
    assert int(32 // c["reduction_factor"]) == 5
    for field in ("phm_layer", "is_parallel", "leave_out", "residual_before_ln", "stochastic_depth", "init_weights"):
        assert field in c
    a = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["config"]
    assert a["non_linearity"] == "swish"  # double_seq_bn's default activation
    fcfg = json.loads((tmp_path / FUSE / "adapter_fusion_config.json").read_text())
    assert fcfg["adapter_names"] == ["a", "b", "c"] and fcfg["name"] == FUSE
    assert fcfg["config"]["value"] is True and fcfg["config"]["dropout_prob"] is None
    keys = torch.load(tmp_path / "b" / "pytorch_adapter.bin", weights_only=True)
    assert "bert.encoder.layer.1.attention.output.adapters.b.adapter_down.1.weight" in keys
    assert "bert.encoder.layer.0.output.adapters.b.adapter_norm_before.weight" in keys  # AdapterHub's alias
    assert "bert.encoder.layer.0.output.adapters.b.scaling" in keys
    fkeys = torch.load(tmp_path / FUSE / "pytorch_model_adapter_fusion.bin", weights_only=True)
    assert "bert.encoder.layer.1.output.adapter_fusion_layer.a,b,c.value.weight" in fkeys
    assert all(".adapter_fusion_layer.a,b,c." in k for k in fkeys)


def test_prefixed_keys_load_into_a_base_model_and_adapter_dirs_forms(tmp_path):
    model = _patched("bert", "seq_bn", head=True)
    fa.save_adapterhub(model, str(tmp_path / "saved"))
    with torch.no_grad():
        y = model.bert(**tiny_inputs("bert")).last_hidden_state
    dirs = {n: str(tmp_path / "saved" / n) for n in "abc"}
    for adapter_dirs in (None, dirs, [dirs[n] for n in "abc"]):
        base = tiny_model("bert")
        fa.load_adapterhub(base, str(tmp_path / "saved" / FUSE), adapter_dirs=adapter_dirs, backend="reference")
        assert torch.equal(_out(base, tiny_inputs("bert"))[0], y)
    with pytest.raises(ValueError, match="no directory for"):
        fa.load_adapterhub(tiny_model("bert"), str(tmp_path / "saved" / FUSE), adapter_dirs={"a": dirs["a"]})
    with pytest.raises(ValueError, match="3 adapters"):
        fa.load_adapterhub(tiny_model("bert"), str(tmp_path / "saved" / FUSE), adapter_dirs=[dirs["a"]])


# ------------------------------------------------------------------------------------------
# hand-made files: AdapterHub features a patched model does not write (per-layer widths,
# leave_out, legacy configs)
# ------------------------------------------------------------------------------------------
def _write_adapter(directory, name, config, tensors, version="adapters.1.3.0"):
    os.makedirs(directory, exist_ok=True)
    meta = {"config": config, "hidden_size": 32, "model_type": "bert", "name": name}
    if version:
        meta["version"] = version
    (directory / "adapter_config.json").write_text(json.dumps(meta))
    torch.save(tensors, directory / "pytorch_adapter.bin")


def _adapter_tensors(name, layer_widths, g, ln_before=False):
    out = {}
    for i, r in layer_widths.items():
        p = f"encoder.layer.{i}.output.adapters.{name}."
        k = 1 if ln_before else 0
        if ln_before:
            out[p + "adapter_down.0.weight"] = 1 + 0.1 * torch.randn(32, generator=g)
            out[p + "adapter_down.0.bias"] = 0.1 * torch.randn(32, generator=g)
        out[p + f"adapter_down.{k}.weight"] = torch.randn(r, 32, generator=g) / 6
        out[p + f"adapter_down.{k}.bias"] = 0.1 * torch.randn(r, generator=g)
        out[p + "adapter_up.weight"] = torch.randn(32, r, generator=g) / 3
        out[p + "adapter_up.bias"] = 0.1 * torch.randn(32, generator=g)
    return out


def _fusion_tensors(name, layers, g):
    out = {}
    for i in layers:
        p = f"encoder.layer.{i}.output.adapter_fusion_layer.{name}."
        out[p + "query.weight"] = torch.randn(32, 32, generator=g) / 6
        out[p + "query.bias"] = 0.1 * torch.randn(32, generator=g)
        out[p + "key.weight"] = torch.randn(32, 32, generator=g) / 6
        out[p + "key.bias"] = 0.1 * torch.randn(32, generator=g)
        out[p + "value.weight"] = torch.eye(32) + torch.randn(32, 32, generator=g) / 60
    return out


def _seq_bn(**kw):
    from fusedadapter.checkpoint import bn_config_template

    c = bn_config_template("seq_bn")
    c.update(kw)
    return c


def _handmade(tmp_path, *, legacy=False):
    g = torch.Generator().manual_seed(0)
    # "b" lives only in block 0; "a" has per-layer widths (32 // 4 = 8 in block 0, 32 // 8 = 4 in block 1)
    _write_adapter(tmp_path / "b", "b", _seq_bn(reduction_factor=16, leave_out=[1], non_linearity="gelu"),
                   _adapter_tensors("b", {0: 2}, g), version=None if legacy else "adapters.1.3.0")
    _write_adapter(tmp_path / "a", "a", _seq_bn(reduction_factor={"1": 8, "default": 4}, ln_before=True),
                   _adapter_tensors("a", {0: 8, 1: 4}, g, ln_before=True))
    os.makedirs(tmp_path / "b,a")
    (tmp_path / "b,a" / "adapter_fusion_config.json").write_text(json.dumps(
        {"config": "dynamic", "name": "b,a", "adapter_names": ["b", "a"], "hidden_size": 32, "model_type": "bert"}))
    torch.save(_fusion_tensors("b,a", [0, 1], g), tmp_path / "b,a" / "pytorch_model_adapter_fusion.bin")
    return tmp_path / "b,a"


def test_per_layer_widths_leave_out_and_legacy_activation(tmp_path):
    fusion_dir = _handmade(tmp_path, legacy=True)
    model = fa.load_adapterhub(tiny_model("bert"), str(fusion_dir))
    sites = {(i, loc): s for i, loc, s in fusion_sites(model)}
    assert sorted(sites) == [(0, "output_adapter"), (1, "output_adapter")]
    s0, s1 = sites[(0, "output_adapter")], sites[(1, "output_adapter")]
    assert [(n, a.bottleneck_size) for n, a in s0.adapters.items()] == [("b", 2), ("a", 8)]
    assert [(n, a.bottleneck_size) for n, a in s1.adapters.items()] == [("a", 4)]
    # an adapter_config.json without "version" is adapter-transformers' format: "gelu" meant gelu_new
    assert s0.adapters["b"].activation_name == "gelu_new"
    assert s0.adapters["a"].config.ln_before
    y = _out(model, tiny_inputs("bert"))[0]
    assert torch.isfinite(y).all()


# ------------------------------------------------------------------------------------------
# errors: named file and field, and the model untouched
# ------------------------------------------------------------------------------------------
def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _edit_weights(path, fn):
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def _put(key, value):
    def fn(sd):
        sd[key] = value
    return fn


def _drop_block(name, block):
    def fn(sd):
        for k in [k for k in sd if f".layer.{block}." in k]:
            del sd[k]
    return fn


def _set(key, value):
    def fn(d):
        target = d
        parts = key.split(".")
        for p in parts[:-1]:
            target = target[p]
        target[parts[-1]] = value
    return fn


CASES = [  # (edit, message fragments)
    (lambda d: os.remove(d / FUSE / "adapter_fusion_config.json"), ["adapter_fusion_config.json", "file not found"]),
    (lambda d: (d / FUSE / "adapter_fusion_config.json").write_text("{not json"), ["adapter_fusion_config.json",
                                                                                   "not valid JSON"]),
    (lambda d: _edit_json(d / FUSE / "adapter_fusion_config.json", lambda j: j.pop("config")),
     ["adapter_fusion_config.json", "missing field 'config'"]),
    (lambda d: _edit_json(d / FUSE / "adapter_fusion_config.json", _set("config.fancy", True)),
     ["adapter_fusion_config.json", "field 'config'", "fancy"]),
    (lambda d: _edit_json(d / FUSE / "adapter_fusion_config.json", _set("adapter_names", 3)),
     ["adapter_fusion_config.json", "field 'adapter_names'"]),
    (lambda d: _edit_json(d / FUSE / "adapter_fusion_config.json", _set("hidden_size", 64)),
     ["adapter_fusion_config.json", "field 'hidden_size'", "64"]),
    (lambda d: _edit_json(d / FUSE / "adapter_fusion_config.json", _set("model_type", "gpt2")),
     ["adapter_fusion_config.json", "field 'model_type'", "gpt2"]),
    (lambda d: os.remove(d / FUSE / "pytorch_model_adapter_fusion.bin"), [FUSE, "no weights file"]),
    (lambda d: (d / FUSE / "pytorch_model_adapter_fusion.bin").write_bytes(b"garbage"),
     ["pytorch_model_adapter_fusion.bin", "cannot read"]),
    (lambda d: _edit_weights(d / FUSE / "pytorch_model_adapter_fusion.bin",
                             lambda sd: sd.pop("bert.encoder.layer.1.output.adapter_fusion_layer.a,b,c.key.weight")),
     ["pytorch_model_adapter_fusion.bin", "missing fusion parameter", "layer.1.output", "key.weight"]),
    (lambda d: _edit_weights(d / FUSE / "pytorch_model_adapter_fusion.bin",
                             _put("bert.encoder.layer.0.output.adapter_fusion_layer.a,b,c.query.bias", torch.zeros(31))),
     ["pytorch_model_adapter_fusion.bin", "query.bias", "(31,)", "(32,)"]),
    (lambda d: _edit_weights(d / FUSE / "pytorch_model_adapter_fusion.bin",
                             _put("bert.encoder.layer.7.output.adapter_fusion_layer.a,b,c.query.bias", torch.zeros(32))),
     ["pytorch_model_adapter_fusion.bin", "block 7"]),
    (lambda d: os.remove(d / "b" / "adapter_config.json"), ["b/adapter_config.json", "file not found"]),
    (lambda d: _edit_json(d / "b" / "adapter_config.json", lambda j: j["config"].pop("non_linearity")),
     ["b/adapter_config.json", "missing field 'config.non_linearity'"]),
    (lambda d: _edit_json(d / "b" / "adapter_config.json", _set("config.non_linearity", "mish")),
     ["b/adapter_config.json", "config.non_linearity", "mish"]),
    (lambda d: _edit_json(d / "b" / "adapter_config.json", _set("config.reduction_factor", 4)),
     ["pytorch_adapter.bin", "width 5", "config.reduction_factor", "gives 8"]),
    (lambda d: _edit_json(d / "b" / "adapter_config.json", _set("config.reduction_factor", "big")),
     ["b/adapter_config.json", "config.reduction_factor"]),
    (lambda d: _edit_json(d / "b" / "adapter_config.json", _set("config.is_parallel", True)),
     ["b/adapter_config.json", "config.is_parallel"]),
    (lambda d: _edit_json(d / "b" / "adapter_config.json", _set("config.architecture", "lora")),
     ["b/adapter_config.json", "config.architecture", "lora"]),
    (lambda d: _edit_json(d / "b" / "adapter_config.json", _set("config.mh_adapter", True)),
     ["config.mh_adapter"]),
    (lambda d: _edit_json(d / "c" / "adapter_config.json", _set("config.leave_out", [1])),
     ["c/pytorch_adapter.bin", "block 1", "config.leave_out"]),
    (lambda d: (_edit_json(d / "c" / "adapter_config.json", _set("config.leave_out", [1])),
                _edit_weights(d / "c" / "pytorch_adapter.bin", _drop_block("c", 1))),
     ["c/adapter_config.json", "field 'config.leave_out' leaves out block 1", "last adapter"]),
    (lambda d: _edit_json(d / "a" / "adapter_config.json", _set("config.scaling", "learned")),
     ["a/pytorch_adapter.bin", "missing parameter 'scaling'"]),
    (lambda d: _edit_json(d / "b" / "adapter_config.json", _set("config.ln_before", False)),
     ["b/pytorch_adapter.bin", "unexpected parameter 'adapter_down.1.weight'", "ln_before=False"]),
    (lambda d: _edit_weights(d / "a" / "pytorch_adapter.bin", _put("bert.encoder.layer.0.output.adapters.a.extra", torch.ones(1))),
     ["a/pytorch_adapter.bin", "unexpected parameter 'extra'"]),
    (lambda d: _edit_weights(d / "a" / "pytorch_adapter.bin", _put("h.0.output_adapters.adapters.a.adapter_up.bias", torch.ones(1))),
     ["a/pytorch_adapter.bin", "h.0.output_adapters", "not an adapter parameter of a bert site"]),
    (lambda d: _edit_weights(d / "a" / "pytorch_adapter.bin",
                             lambda sd: sd.pop("bert.encoder.layer.1.output.adapters.a.adapter_up.weight")),
     ["a/pytorch_adapter.bin", "missing parameter 'adapter_up.weight'", "block 1"]),
    (lambda d: _edit_weights(d / "a" / "pytorch_adapter.bin",
                             _put("bert.encoder.layer.1.output.adapters.a.adapter_up.weight", torch.zeros(32, 7))),
     ["a/pytorch_adapter.bin", "adapter_up.weight", "(32, 7)", "(32, 8)"]),
    (lambda d: os.rename(d / "c", d / "c_moved"), ["c/adapter_config.json", "file not found"]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_malformed_files_raise_before_any_change(case, tmp_path):
    model = _patched("bert", "seq_bn", head=True)
    fa.save_adapterhub(model, str(tmp_path))
    edit, fragments = CASES[case]
    edit(tmp_path)
    target = tiny_model("bert")
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        y0 = last_hidden(target(**inputs))
    names0 = [n for n, _ in target.named_parameters()]
    with pytest.raises(AdapterHubFormatError) as info:
        fa.load_adapterhub(target, str(tmp_path / FUSE))
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert not is_patched(target)
    assert [n for n, _ in target.named_parameters()] == names0
    with torch.no_grad():
        assert torch.equal(last_hidden(target(**inputs)), y0)
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in target.modules())


def test_other_errors(tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        fa.save_adapterhub(tiny_model("bert"), str(tmp_path))
    model = _patched("bert", "seq_bn")
    fa.save_adapterhub(model, str(tmp_path))
    with pytest.raises(ValueError, match="already patched"):
        fa.load_adapterhub(model, str(tmp_path / FUSE))
    import transformers

    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                           num_heads=2))
    with pytest.raises(ValueError, match="not supported; supported architectures: bert"):
        fa.load_adapterhub(t5, str(tmp_path / FUSE))


def test_works_without_adapterhub(tmp_path):
    """In a fresh interpreter where `import adapters` fails, import, patch, save and load all work."""
    code = f"""
import sys
sys.modules["adapters"] = None  # any `import adapters` now raises ImportError
sys.path.insert(0, {os.path.dirname(__file__)!r})
import torch, fusedadapter as fa
from tiny_models import tiny_model, tiny_inputs, last_hidden
m = tiny_model("distilbert")
fa.patch(m, [fa.AdapterConfig(bottleneck_size=4), fa.AdapterConfig(bottleneck_size=3)], placement="double_seq_bn")
fa.save_adapterhub(m, {str(tmp_path)!r})
m2 = fa.load_adapterhub(tiny_model("distilbert"), {str(tmp_path / "0,1")!r})
with torch.no_grad():
    a, b = last_hidden(m(**tiny_inputs("distilbert"))), last_hidden(m2(**tiny_inputs("distilbert")))
assert torch.equal(a, b)
try:
    fa.accelerate(m)
except ImportError as exc:
    assert "adapters" in str(exc)
else:
    raise AssertionError("accelerate without adapters should raise ImportError")
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-3000:]


def test_checkpoint_io_helpers_live_in_their_own_module_and_both_stay_small():
    # issue 14: checkpoint.py is the two entry points; the file reading/checking/writing helpers
    # are fusedadapter.adapterhub_files (below checkpoint and patching in the import graph).
    from pathlib import Path

    from fusedadapter import adapterhub_files, checkpoint

    for name in ("_read_json", "_read_weights", "_check_adapter_config", "_check_adapter_params", "_write"):
        assert getattr(checkpoint, name) is getattr(adapterhub_files, name), name
    for mod in (checkpoint, adapterhub_files):
        lines = len(Path(mod.__file__).read_text().splitlines())
        assert lines <= 450, f"{mod.__name__}: {lines} lines"
