"""docs/multitask.md's snippets run as written (issue 16), on tiny models, and give each row its task's result.

* The recipe (``fa.patch(bert, pool, fusions=...)``, ``fa.MultiHead``, one routed forward): ``bert``
  is a small BERT of hidden size 768 (the snippet's heads are ``Linear(768, ...)``), ``batch`` four
  rows; each row's logits equal that row run alone through its own fusion and head.
* Serving AdapterHub fusions (``fa.load_adapterhub`` of two fusion directories, routed, saved):
  ``saved/`` is tests/fixtures/adapterhub_bert_multi (files AdapterHub wrote), ``AutoModel.from_pretrained``
  its tiny base model; each row matches AdapterHub's own output for its fusion (docs/algorithm.md
  §4 oracle, the fixture's float32 and float64 outputs), and ``out/`` holds what the text says.
* The accelerated ``MultiTask`` snippet and the AdapterHub heads recipe (AdapterHub environment
  only): each row's hidden states, and each row's logits through its own task's AdapterHub head,
  match AdapterHub run once per setup (§4 oracle).

The export snippet is a sketch (``Hidden`` comes from docs/export.md, ``...`` stands for inputs);
tests/test_export_multitask.py runs that path.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import fusedadapter as fa
from conftest import requires_adapterhub
from fusedadapter.testing import assert_oracle
from tiny_models import last_hidden, one_thread, tiny_inputs, tiny_model  # noqa: F401 (autouse fixture)

DOC = Path(__file__).resolve().parent.parent / "docs" / "multitask.md"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "adapterhub_bert_multi"
F32, F64 = torch.float32, torch.float64


def snippet(marker: str) -> str:
    """The one ```python block of docs/multitask.md that contains ``marker``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if marker in b]
    assert len(blocks) == 1, f"docs/multitask.md: {len(blocks)} python blocks contain {marker!r}"
    return blocks[0]


def run(code: str, **names) -> dict:
    ns = dict(names)
    exec(compile(code, str(DOC), "exec"), ns)
    return ns


def test_recipe_runs_and_each_row_gets_its_task_output():
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                                     intermediate_size=64, vocab_size=100, max_position_embeddings=16)
    bert = transformers.BertModel(config).eval()
    batch = tiny_inputs("bert", batch=4, seq=5)
    ns = run(snippet("fa.patch(bert,"), bert=bert, batch=batch)
    model, heads, route, logits = ns["model"], ns["heads"], ns["route"], ns["logits"]
    assert route == ["sst", "mnli", "sst", "mnli"]
    assert isinstance(logits, list) and [t.shape for t in logits] == [(2,), (3,), (2,), (3,)]
    for i, task in enumerate(route):  # the row alone, through its own fusion and head
        row = {k: v[i:i + 1] for k, v in batch.items()}
        with fa.fusion_route(task), torch.inference_mode():
            alone = heads.heads[task](model(**row).last_hidden_state[:, 0])[0]
        torch.testing.assert_close(logits[i], alone, rtol=1e-5, atol=1e-5)


def test_serving_adapterhub_fusions_runs_on_adapterhub_files(tmp_path, monkeypatch):
    sys.path.insert(0, str(FIXTURE.parent))
    from make_adapterhub_fixture import base_model
    from safetensors.torch import load_file

    expected = load_file(str(FIXTURE / "expected.safetensors"))
    batch = {"input_ids": expected["input_ids"], "attention_mask": expected["attention_mask"]}
    assert batch["input_ids"].shape[0] == 3  # the snippet's route has three rows

    import transformers

    def from_pretrained(name, *args, **kwargs):  # the snippet's bert-base-uncased: the fixture's tiny base model
        assert name == "bert-base-uncased" and not args and not kwargs
        return base_model()

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "saved").symlink_to(FIXTURE, target_is_directory=True)
    ns = run(snippet("fa.load_adapterhub("), batch=batch)
    hidden = ns["hidden"]
    for i, name in enumerate(["pair", "a,b,c", "pair"]):  # the snippet's route
        ref, truth = expected[f"last_hidden_state.{name}.f32"][i], expected[f"last_hidden_state.{name}.f64"][i]
        assert_oracle(hidden[i], ref, truth, F32, what=f"docs row {i} ({name})")
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["a", "b", "c", "a,b,c", "pair"])
    back = fa.load_adapterhub(base_model(), [str(tmp_path / "out" / f) for f in ("a,b,c", "pair")])
    with fa.fusion_route(["pair", "a,b,c", "pair"]), torch.inference_mode():
        assert torch.equal(back(**batch).last_hidden_state, hidden)


@requires_adapterhub
@pytest.mark.adapterhub
def test_accelerated_multitask_snippet_matches_adapterhub_per_setup():
    import adapters
    from adapters.composition import Fuse

    model = tiny_model("bert", dropout=False, seed=2)
    adapters.init(model)
    for name, rf in (("a", 4), ("b", 8), ("c", 16)):
        model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=rf))
    model.eval()
    batch = tiny_inputs("bert", batch=3, seq=6)
    ns = run(snippet("model.add_adapter_fusion("), model=model, batch=batch)
    by_names = last_hidden(ns["out"])  # the snippet's last call (fusion_route)
    with torch.no_grad():
        by_ids = last_hidden(model(**batch, task_ids=torch.tensor([1, 0, 1])))
    fa.unpatch(model)  # AdapterHub's own forward again, one Fuse setup at a time
    m64 = copy.deepcopy(model).double()
    for k, fuse in enumerate((Fuse("a", "b", "c"), Fuse("c", "a", name="pair"))):
        model.active_adapters = m64.active_adapters = fuse
        with torch.no_grad():
            ref, truth = last_hidden(model(**batch)), last_hidden(m64(**batch))
        idx = [i for i, t in enumerate([1, 0, 1]) if t == k]
        for y in (by_ids, by_names):
            assert_oracle(y[idx], ref[idx], truth[idx], F32, what=f"docs MultiTask rows of {fuse.name}")


@requires_adapterhub
@pytest.mark.adapterhub
def test_adapterhub_heads_recipe_gives_each_row_its_task_head():
    """The AdapterHub heads recipe: each row's logits equal AdapterHub run once per setup with that
    setup's own head (§4 oracle); AdapterHub's own forward of the MultiTask batch applies one head."""
    import adapters
    from adapters import BertAdapterModel
    from adapters.composition import Fuse, MultiTask

    from tiny_models import tiny_config

    torch.manual_seed(3)
    model = BertAdapterModel(tiny_config("bert", dropout=False)).eval()
    for name, rf in (("a", 4), ("b", 8), ("c", 16)):
        model.add_adapter(name, config=adapters.SeqBnConfig(reduction_factor=rf))
    fuses = (Fuse("a", "b", "c"), Fuse("c", "a", name="pair"))
    for f in fuses:
        model.add_adapter_fusion(f)
    model.add_classification_head("a,b,c", num_labels=2)
    model.add_classification_head("pair", num_labels=3)
    model.eval()
    batch = tiny_inputs("bert", batch=3, seq=6)
    per_setup = {}
    m64 = copy.deepcopy(model).double()
    for f in fuses:
        model.active_adapters = m64.active_adapters = f
        with torch.no_grad():
            per_setup[f.name] = (model(**batch, head=f.name).logits, m64(**batch, head=f.name).logits)
    model.active_adapters = MultiTask(*fuses)
    fa.accelerate(model)
    with torch.no_grad():  # AdapterHub's head selection: one head for every row
        assert model(**batch, task_ids=torch.tensor([1, 0, 1])).logits.shape == (3, 3)
    ns = run(snippet("model.heads["), model=model, batch=batch)
    logits = ns["logits"]
    assert [t.shape for t in logits] == [(3,), (2,), (3,)]
    for i, name in enumerate(["pair", "a,b,c", "pair"]):
        ref, truth = per_setup[name]
        assert_oracle(logits[i], ref[i], truth[i], F32, what=f"docs heads row {i} ({name})")
