"""Hypothesis-driven parity over every backend that runs here, against the eager reference.

Profiles (env FUSEDADAPTER_FUZZ_PROFILE): "ci" (default: fixed seed, bounded examples, printed
with the test's statistics) and "long" (many more examples, for local runs):

    FUSEDADAPTER_FUZZ_PROFILE=long python -m pytest tests/test_fuzz.py -q --hypothesis-show-statistics
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusedadapter as fa
from parity import check_parity, make_site

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("FUSEDADAPTER_FUZZ_PROFILE", "ci")
settings.load_profile(PROFILE)

ACTS = ["relu", "gelu", "gelu_new", "swish", "tanh", "sigmoid", "leakyrelu", "linear", "quick_gelu"]

# Per backend: dtypes it supports here, and a scale factor on the example budget (the Triton
# interpreter runs kernels element by element in Python).
BACKEND_DTYPES = {
    "torch": ([torch.float64, torch.float32, torch.bfloat16], 1.0),
    "cpu": ([torch.float64, torch.float32, torch.bfloat16], 1.0),
    "triton": ([torch.float32, torch.float16] if not torch.cuda.is_available() else
               [torch.float32, torch.float16, torch.bfloat16], 0.25),
    "cuda": ([torch.float32, torch.float16, torch.bfloat16], 1.0),
}


def _runnable():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    avail = fa.available_backends(device)
    return [b for b in BACKEND_DTYPES if avail.get(b) is None]


RUNNABLE = _runnable()


@st.composite
def site_specs(draw, small=False):
    n = draw(st.integers(1, 6 if small else 32))
    width = st.sampled_from([1, 2, 3, 5, 8, 16, 17] if small else [1, 2, 3, 5, 8, 16, 17, 33, 64, 128, 256])
    widths = draw(st.lists(width, min_size=n, max_size=n))
    acts = draw(st.lists(st.sampled_from(ACTS), min_size=n, max_size=n))
    hidden = draw(st.sampled_from([8, 13, 16, 31, 40] if small else [8, 13, 16, 31, 40, 64, 97]))
    preset = draw(st.sampled_from(["dynamic", "static"]))
    flags = {
        "query": draw(st.booleans()),
        "key": draw(st.booleans()),
        "value": draw(st.booleans()),
        "residual_before": draw(st.booleans()),
        "query_before_ln": draw(st.booleans()),
        "temperature": draw(st.booleans()),
    }
    ln_before = tuple(i for i in range(n) if draw(st.booleans()) and i % 3 == 0)
    tokens = draw(st.sampled_from([0, 1, 2, 7, 13, 31] if small else [0, 1, 2, 7, 13, 31, 97, 257]))
    lead = draw(st.sampled_from([(tokens,), (1, tokens), (tokens, 1)]))
    train = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return dict(widths=widths, acts=acts, hidden=hidden, preset=preset, flags=flags, ln_before=ln_before,
                lead=lead, train=train, seed=seed)


def _check(backend, spec, dtype):
    site = make_site(spec["hidden"], spec["widths"], spec["acts"], spec["preset"], ln_before=spec["ln_before"],
                     seed=spec["seed"], **spec["flags"])
    if spec["flags"]["temperature"]:
        site.T = 1.0 + (spec["seed"] % 40)  # somewhere on AdapterHub's schedule (50 -> 1)
    check_parity(backend, site, dtype, lead=spec["lead"], separate_query=spec["flags"]["query_before_ln"],
                 train=spec["train"], seed=spec["seed"] % 1000)


def _budget(backend):
    return max(3, int(settings().max_examples * BACKEND_DTYPES[backend][1]))


@pytest.mark.parametrize("backend", RUNNABLE)
def test_fuzz_parity(backend):
    dtypes = BACKEND_DTYPES[backend][0]
    small = backend == "triton" and not torch.cuda.is_available()

    @settings(max_examples=_budget(backend))
    @given(spec=site_specs(small=small), dtype=st.sampled_from(dtypes))
    def run(spec, dtype):
        _check(backend, spec, dtype)

    run()
    print(f"fuzz[{backend}]: {_budget(backend)} examples, profile {PROFILE!r}")
