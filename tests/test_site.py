"""One site abstraction (issue 14): the module, the functional form and the AdapterHub integration
are thin subclasses of fusedadapter.site.FusionSite, which alone implements the shared protocol
that fusedadapter.runner.run_site reads (weights in a dtype, the cached folds, the reference)."""

from __future__ import annotations

import pytest
import torch

import fusedadapter as fa
from fusedadapter.functional import _ExplicitSite
from fusedadapter.integrations.adapterhub import _AdapterHubSite  # imports without `adapters`
from fusedadapter.site import FusionSite

SHARED = ("adapter_weights", "fusion_weights", "plain_folded", "reference")


@pytest.mark.parametrize("cls", [fa.FusedAdapterFusion, _ExplicitSite, _AdapterHubSite])
def test_every_site_is_a_thin_fusion_site(cls):
    assert issubclass(cls, FusionSite)
    redefined = [name for name in SHARED if name in vars(cls)]
    assert not redefined, f"{cls.__name__} redefines the shared site methods {redefined}"


def test_explicit_site_folds_every_call_and_the_module_caches():
    torch.manual_seed(0)
    m = fa.FusedAdapterFusion(16, [fa.AdapterConfig(reduction_factor=4)] * 3, backend="torch").eval()
    ws, fus = m.adapter_weights(), m.fusion_weights()
    site = _ExplicitSite(ws, fus, m.residual_before)
    with torch.no_grad():
        assert m.folded(torch.float32) is m.folded(torch.float32)
        assert site.folded(torch.float32) is not site.folded(torch.float32)
        torch.testing.assert_close(site.folded(torch.float32).w_out, m.folded(torch.float32).w_out)
        a, res = torch.randn(5, 16), torch.randn(5, 16)
        for x, y in zip(site.reference(a, res, a, 1.0, 0.0, None), m.reference(a, res, a, 1.0, 0.0, None)):
            torch.testing.assert_close(x, y)
