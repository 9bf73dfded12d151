"""Case lists shared by the test files: activations and fusion flag sets (one home, not copies)."""

# Every activation the adapters support (fusedadapter.config), in the order the tests cycle through.
ACTIVATIONS = ("relu", "gelu", "gelu_new", "swish", "tanh", "sigmoid", "leakyrelu", "linear", "quick_gelu")
NONLINEAR = tuple(a for a in ACTIVATIONS if a != "linear")
# The ones tests/test_reference_adapterhub.py compares with AdapterHub's own adapters.
ADAPTERHUB_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a not in ("linear", "quick_gelu"))

# Fusion flag sets (FusionConfig overrides on a preset), one switch at a time.
PRESET = {}
NO_QUERY, NO_KEY, NO_VALUE = {"query": False}, {"key": False}, {"value": False}
NO_QKV = {"query": False, "key": False, "value": False}
RESIDUAL_BEFORE = {"residual_before": True}
QUERY_BEFORE_LN = {"query_before_ln": True}
VALUE_AFTER_SOFTMAX = {"value_before_softmax": False}
VALUE_NOT_INITIALIZED = {"value_initialized": False}
TEMPERATURE = {"temperature": True}
DROPOUT = {"dropout_prob": 0.3}
DROPOUT_ZERO = {"dropout_prob": 0.0}  # falls back to the attention dropout, as AdapterHub's `or`

# The structural switches (which projections exist, where the residual and query come from).
CORE_FLAG_SETS = [PRESET, NO_QKV, RESIDUAL_BEFORE, QUERY_BEFORE_LN]
# Every switch a fused kernel sees.
KERNEL_FLAG_SETS = [PRESET, NO_QUERY, NO_KEY, NO_VALUE, NO_QKV, RESIDUAL_BEFORE, QUERY_BEFORE_LN,
                    VALUE_AFTER_SOFTMAX, VALUE_NOT_INITIALIZED]
# Every switch AdapterHub's BertFusion has, for the eager reference against it.
ADAPTERHUB_FLAG_SETS = [PRESET, NO_QUERY, NO_KEY, NO_VALUE, RESIDUAL_BEFORE, QUERY_BEFORE_LN, VALUE_AFTER_SOFTMAX,
                        VALUE_NOT_INITIALIZED, TEMPERATURE, DROPOUT, DROPOUT_ZERO]


def flags_id(flags: dict) -> str:
    """A flag set's test id: ``key=value,...``, or ``preset`` for no overrides."""
    return ",".join(f"{k}={v}" for k, v in flags.items()) or "preset"


# The vector ISA ATen's CPU kernels dispatch on ("AVX512", "AVX2", ...). A few fp32 gradients sit at the oracle's
# edge and cross it only where the GEMMs round the AVX2 way; those tests name this flag where they say so.
import torch as _torch  # noqa: E402

HAS_AVX512 = _torch.backends.cpu.get_cpu_capability().startswith("AVX512")
