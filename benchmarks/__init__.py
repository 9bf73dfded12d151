"""fusedadapter's benchmark suites: fused AdapterFusion vs eager vs AdapterHub.

``python -m benchmarks`` (from the repository root) runs the quick CPU sweep; see
:mod:`benchmarks.cli` for the presets (``quick``, ``cpu``, ``gpu``, ``site-768``, ``tiny``), the
model level (``model``), the dispatch-table writer (``table``) and ``report``.

The pieces: :func:`benchmarks.providers.setup_site` (one site, named providers),
:mod:`benchmarks.timing` (interleaved repeats), :mod:`benchmarks.layer` (the layer-level runner),
:mod:`benchmarks.models` (model level), :mod:`benchmarks.results` (the row schema),
:mod:`benchmarks.report` (tables, plots), :mod:`benchmarks.table` (``dispatch_table.json``).
"""

from .providers import MODES, SITE_PROVIDERS, SiteShape, setup_site, site_providers
from .results import SCHEMA

__all__ = ["MODES", "SITE_PROVIDERS", "SCHEMA", "SiteShape", "setup_site", "site_providers"]
