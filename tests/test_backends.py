"""The backend matrix (tests/backends.py): unavailable backends skip with their reason, and
FUSEDADAPTER_REQUIRE_BACKENDS turns an unavailable required backend into a failed session."""

import os
import subprocess
import sys

import torch

import fusedadapter as fa
from backends import REQUIRE_ENV, backend_params, missing_required, required_backends, runnable


def test_unavailable_backends_stay_in_the_matrix_as_skips_naming_the_reason():
    avail = fa.available_backends("cpu")
    params = {p.id: p for p in backend_params(("torch", "cpu", "triton", "cuda"), "cpu")}
    assert list(params) == ["torch", "cpu", "triton", "cuda"]  # nothing vanishes
    for name, p in params.items():
        if avail[name] is None:
            assert not p.marks and name in runnable(device="cpu")
        else:
            (mark,) = p.marks
            assert mark.name == "skip" and avail[name] in mark.kwargs["reason"]
            assert "BackendUnavailable" in mark.kwargs["reason"]
    if not torch.cuda.is_available():
        assert params["cuda"].marks, "the cuda backend cannot run on a CPU-only machine: a skip with its reason"


def test_required_backends_parse_and_report_what_cannot_run():
    env = {REQUIRE_ENV: " torch, no-such-backend ,"}
    assert required_backends(env) == ["torch", "no-such-backend"]
    missing = missing_required(env)
    assert len(missing) == 1 and missing[0].startswith("no-such-backend: ")
    assert missing_required({}) == []


def test_a_required_backend_that_cannot_run_fails_the_session():
    env = dict(os.environ, **{REQUIRE_ENV: "torch,no-such-backend"})
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                        os.path.join(here, "test_backends.py")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    assert "no-such-backend" in r.stdout + r.stderr

