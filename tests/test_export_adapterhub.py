"""Export in the AdapterHub environment (adapters 1.3.0, transformers 4.57): runs in .venv-ah.

* an AdapterHub model after ``fa.accelerate`` exports with the standard call
  (``torch.onnx.export(..., dynamo=True)``) and ONNX Runtime matches AdapterHub's eager model
  (docs/algorithm.md §4 oracle, several sizes through one file); no custom-domain node;
* tests/fixtures/adapterhub_bert (the AdapterHub-trained fusion that tests/test_export.py loads
  with ``load_adapterhub`` on transformers 5.x) is what tests/fixtures/make_adapterhub_fixture.py
  makes today.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import pytest
import torch

import fusedadapter as fa
from conftest import requires_adapterhub
from fusedadapter.export import custom_domain_ops
from fusedadapter.testing import assert_oracle
from tiny_models import last_hidden, one_thread, tiny_inputs  # noqa: F401 (autouse fixture)

pytestmark = [requires_adapterhub, pytest.mark.adapterhub,
              pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")]
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

F32, F64 = torch.float32, torch.float64
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))


class Hidden(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return last_hidden(self.model(input_ids=input_ids, attention_mask=attention_mask))


def test_accelerated_adapterhub_model_exports_and_matches_adapterhub(tmp_path):
    from test_adapterhub_integration import make_ah

    model, _ = make_ah("bert", "seq_bn", dropout=False)  # mixed widths, activations, ln_before, scalings
    ah32, ah64 = Hidden(copy.deepcopy(model)).eval(), Hidden(copy.deepcopy(model).double()).eval()
    fa.accelerate(model)
    wrapped = Hidden(model).eval()
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=40)
    dims = {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}}
    path = str(tmp_path / "ah.onnx")
    torch.onnx.export(wrapped, (), path, kwargs=tiny_inputs("bert", batch=2, seq=6), dynamo=True,
                      dynamic_shapes=dims, verbose=False)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert custom_domain_ops(proto) == []
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    for bs, sq in [(1, 4), (3, 13)]:
        x = tiny_inputs("bert", batch=bs, seq=sq, seed=sq)
        got = torch.from_numpy(sess.run(None, {k: v.numpy() for k, v in x.items()})[0])
        with torch.no_grad():
            ref, truth = ah32(**x), ah64(**x)
        assert_oracle(got, ref, truth, F32, what=f"accelerated AdapterHub BERT in ONNX Runtime {(bs, sq)}")


def test_adapterhub_fixture_is_current():
    import make_adapterhub_fixture as fixture

    with tempfile.TemporaryDirectory() as tmp:
        fixture.build(tmp)
        problems = fixture.compare(tmp, fixture.FIXTURE) + fixture.compare(fixture.FIXTURE, tmp)
    assert problems == [], ("tests/fixtures/adapterhub_bert is stale; regenerate it with "
                            "`.venv-ah/bin/python tests/fixtures/make_adapterhub_fixture.py`: " + "; ".join(problems))
