"""fusedadapter: AdapterFusion (Pfeiffer et al., EACL 2021) as cheap as the bare model.

Public API: configs (:class:`AdapterConfig`, :class:`FusionConfig`), the module
(:class:`FusedAdapterFusion`), its functional form (:func:`adapter_fusion`), and
:func:`fusion_regularization_loss`. See README.md.
"""

from .config import AdapterConfig, FusionConfig
from .dispatch import BACKENDS, available_backends
from .errors import BackendUnavailable
from .functional import adapter_fusion, fusion_regularization_loss
from .masking import adapter_mask
from .modules import BottleneckAdapter, FusedAdapterFusion
from .patching import patch, unpatch
from .integrations.adapterhub import accelerate
from .checkpoint import load_adapterhub, save_adapterhub
from .adapterdrop import AdapterDropReport, adapter_drop

# The one place the version is written: pyproject.toml reads it from here ([tool.setuptools.dynamic]).
__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "FusionConfig",
    "FusedAdapterFusion",
    "BottleneckAdapter",
    "adapter_fusion",
    "adapter_mask",
    "fusion_regularization_loss",
    "BACKENDS",
    "BackendUnavailable",
    "available_backends",
    "patch",
    "unpatch",
    "accelerate",
    "load_adapterhub",
    "save_adapterhub",
]
__all__ += ["adapter_drop", "AdapterDropReport"]
from .multitask import MultiFusion, MultiHead, fusion_route  # noqa: E402 (issue 16: multi-task serving)
__all__ += ["MultiFusion", "MultiHead", "fusion_route"]
