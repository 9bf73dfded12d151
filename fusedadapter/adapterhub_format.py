"""AdapterHub's file format (``adapters`` 1.3.0): file names, the format version, legacy renames and
the ``BnConfig`` fields with their presets. A leaf module (nothing from fusedadapter), read by
:mod:`fusedadapter.checkpoint` (loading and saving) and :mod:`fusedadapter.patching` (the config
dict a patched model's adapters save as); both re-export what they used to define.
"""

from __future__ import annotations

import re

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "SAFE_WEIGHTS_NAME", "FUSION_CONFIG_NAME", "FUSION_WEIGHTS_NAME",
           "SAFE_FUSION_WEIGHTS_NAME", "AH_FORMAT_VERSION", "LEGACY_ACTIVATION_RENAME", "LEGACY_WEIGHT_RENAME",
           "BN_DEFAULTS", "BN_PRESETS", "ADAPTER_PARAMS_IGNORED", "AdapterHubFormatError", "bn_config_template"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "pytorch_adapter.bin"
SAFE_WEIGHTS_NAME = "adapter.safetensors"
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHTS_NAME = "pytorch_model_adapter_fusion.bin"
SAFE_FUSION_WEIGHTS_NAME = "model_adapter_fusion.safetensors"
AH_FORMAT_VERSION = "adapters.1.3.0"  # the file format written (AdapterHub reads "version" to skip legacy renames)

# AdapterHub's ACTIVATION_RENAME, applied to configs without a "version" (adapter-transformers v1/v2 files)
LEGACY_ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}
LEGACY_WEIGHT_RENAME = {
    "attention_text_task_adapters": "adapters",
    "attention_text_lang_adapters": "adapters",
    "layer_text_task_adapters": "adapters",
    "layer_text_lang_adapters": "adapters",
    "invertible_lang_adapters": "invertible_adapters",
}

# BnConfig 1.3.0: every field and its default; SeqBnConfig / DoubleSeqBnConfig override some.
BN_DEFAULTS = {
    "mh_adapter": None, "output_adapter": None, "reduction_factor": None, "non_linearity": None,
    "original_ln_before": False, "original_ln_after": True, "ln_before": False, "ln_after": False,
    "init_weights": "bert", "init_weights_seed": None, "is_parallel": False, "scaling": 1.0, "use_gating": False,
    "residual_before_ln": True, "adapter_residual_before_ln": False, "inv_adapter": None,
    "inv_adapter_reduction_factor": None, "cross_adapter": False, "leave_out": [], "dropout": 0.0,
    "phm_layer": False, "phm_dim": 4, "factorized_phm_W": True, "shared_W_phm": False, "shared_phm_rule": True,
    "factorized_phm_rule": False, "phm_c_init": "normal", "phm_init_range": 0.0001, "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform", "phm_rank": 1, "phm_bias": True, "stochastic_depth": 0.0,
}
BN_PRESETS = {
    "seq_bn": dict(original_ln_before=True, original_ln_after=True, residual_before_ln=True, mh_adapter=False,
                   output_adapter=True, non_linearity="relu", reduction_factor=16),
    "double_seq_bn": dict(original_ln_before=False, original_ln_after=True, residual_before_ln=True, mh_adapter=True,
                          output_adapter=True, non_linearity="swish", reduction_factor=16),
}
BN_PRESETS["pfeiffer"] = BN_PRESETS["seq_bn"]
BN_PRESETS["houlsby"] = BN_PRESETS["double_seq_bn"]

ADAPTER_PARAMS_IGNORED = re.compile(r"^(adapter_norm_after|gate|adapter_norm_before)\.(weight|bias)$")


class AdapterHubFormatError(ValueError):
    """An AdapterHub file that is missing, malformed or does not fit the model."""


def bn_config_template(preset: str) -> dict:
    """All fields of AdapterHub's ``SeqBnConfig`` / ``DoubleSeqBnConfig`` (1.3.0), as saved."""
    d = dict(BN_DEFAULTS)
    d.update(BN_PRESETS[preset])
    d["leave_out"] = []
    return d

