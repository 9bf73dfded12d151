"""pytest-benchmark suite over the same setup function as the CLI (not part of the test run).

    python -m pytest benchmarks/test_site_benchmark.py --benchmark-group-by=param:tokens,param:mode

Each provider and mode is its own benchmark (pytest-benchmark times them one after another, not
interleaved: for the committed numbers use ``python -m benchmarks``, which interleaves).
Providers that do not run here are skipped with the reason.
"""

import pytest
import torch

from benchmarks.providers import MODES, SITE_PROVIDERS, SiteShape, setup_site, site_providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = "bfloat16" if DEVICE == "cuda" else "float32"
RUNNABLE, SKIPPED = site_providers(DEVICE)
_CASES = {}


def _case(tokens: int):
    if tokens not in _CASES:
        _CASES.clear()
        _CASES[tokens] = setup_site(SiteShape(tokens=tokens, hidden=768, n=8, reduction=16, dtype=DTYPE), DEVICE)
    return _CASES[tokens]


@pytest.mark.parametrize("tokens", [16, 256, 1024])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", SITE_PROVIDERS)
def test_site(benchmark, provider, mode, tokens):
    if provider not in RUNNABLE:
        pytest.skip(SKIPPED.get(provider, "not runnable here"))
    step = _case(tokens).step(provider, mode)

    def run():
        step.run()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    def setup():  # untimed: zero the gradients; for backward, run the forward
        if step.prep is not None:
            step.prep()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(provider=provider, mode=mode, tokens=tokens, dtype=DTYPE, device=DEVICE)
    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1, iterations=1)
