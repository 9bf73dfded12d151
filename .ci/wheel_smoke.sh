#!/usr/bin/env bash
# CI: the package as a user gets it. Builds the sdist and, from it, the wheel (`python -m build`),
# installs the wheel (not editable) into a fresh venv with the pinned CPU torch, and runs a smoke
# test from a temporary folder outside the source tree: the import, the shipped package data
# (dispatch_table.json, the csrc/ sources), and one FusedAdapterFusion forward (and backward) on the
# `torch` backend and on the `cpu` backend, whose C++ extension is compiled just in time from the
# csrc/ sources inside the installed wheel, into a fresh build folder. Checked against the eager
# reference with the oracle of fusedadapter.testing.
#
#   .ci/wheel_smoke.sh                       # called by .ci/run after the main environment's tests
#   WHEEL_SMOKE_TRITON=1 .ci/wheel_smoke.sh  # also the `triton` extra, in the Triton interpreter
#
# Reuses pip's cache (the main environment's install has filled it), so no wheel is downloaded twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-"torch==2.13.0"}   # the CPU wheel, as in .ci/run
TRITON=${WHEEL_SMOKE_TRITON:-0}

start=$(date +%s)
stamp() { echo "== [wheel smoke, $(( $(date +%s) - start ))s] $*"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/fusedadapter-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT

stamp "python -m build (sdist, then the wheel from the sdist)"
"$PY" -m venv "$work/build-env"
"$work/build-env/bin/python" -m pip install -q build
"$work/build-env/bin/python" -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
if grep -iE "deprecat|SetuptoolsWarning" "$work/build.log"; then
  echo "wheel smoke: the build printed warnings (above)"; exit 1
fi
wheel=$(ls "$work"/dist/fusedadapter-*.whl)
ls "$work"/dist/fusedadapter-*.tar.gz > /dev/null
ls -l "$work/dist"

extras="native"   # ninja, for the C++ backend's just-in-time build
[ "$TRITON" = "1" ] && extras="native,triton"
stamp "fresh venv: $TORCH_PIN + the wheel [$extras]"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "$TORCH_PIN" "${wheel}[${extras}]"

stamp "smoke test (outside the source tree; the C++ extension built from the wheel's csrc/)"
mkdir -p "$work/run"
cd "$work/run"
env -u PYTHONPATH FUSEDADAPTER_BUILD_DIR="$work/ext-build" OMP_NUM_THREADS=1 WHEEL_SMOKE_TRITON="$TRITON" \
  TRITON_INTERPRET="$TRITON" "$work/venv/bin/python" - <<'EOF'
import copy
import importlib.metadata
import importlib.resources
import os
import sys
from pathlib import Path

import torch

import fusedadapter as fa
import fusedadapter.csrc
import fusedadapter.kernels
from fusedadapter.testing import assert_oracle, perturb_

here = Path(fa.__file__).resolve().parent
assert Path(sys.prefix).resolve() in here.parents and "site-packages" in here.parts, f"not the installed wheel: {here}"
assert fa.__version__ == importlib.metadata.version("fusedadapter"), (fa.__version__, importlib.metadata.version("fusedadapter"))
assert Path(fusedadapter.kernels.__file__).resolve().parent == here / "kernels"
src = Path(fusedadapter.csrc.SOURCE_DIR)
assert src == here / "csrc", src
for f in fusedadapter.csrc.CPU_SOURCES + fusedadapter.csrc.CUDA_SOURCES + fusedadapter.csrc.HEADERS:
    assert (src / f).is_file(), f"csrc source {f} missing from the wheel"
assert importlib.resources.files("fusedadapter").joinpath("dispatch_table.json").is_file()
print("fusedadapter", fa.__version__, "from", here, "| torch", torch.__version__)

torch.manual_seed(0)
hidden = 64
adapters = {"a": fa.AdapterConfig(reduction_factor=8), "b": fa.AdapterConfig(reduction_factor=16, non_linearity="gelu"),
            "c": fa.AdapterConfig(reduction_factor=4, ln_before=True)}
site = perturb_(fa.FusedAdapterFusion(hidden, adapters, fusion="dynamic", backend="reference")).eval()
site64 = copy.deepcopy(site).double()
h, res = torch.randn(2, 7, hidden), torch.randn(2, 7, hidden)
with torch.no_grad():
    truth, truth_p = site64(h.double(), res.double(), return_probs=True)
    ref, ref_p = site(h, res, return_probs=True)

backends = ["torch", "cpu"] + (["triton"] if os.environ.get("WHEEL_SMOKE_TRITON") == "1" else [])
for name in backends:
    site.backend = name  # by name: a backend that cannot run raises BackendUnavailable, no fallback
    with torch.no_grad():
        out, p = site(h, res, return_probs=True)
    assert_oracle(out, ref, truth, torch.float32, f"{name} output")
    assert_oracle(p, ref_p, truth_p, torch.float32, f"{name} probs")
    hg = h.clone().requires_grad_(True)
    site(hg, res).square().sum().backward()  # the fusion's query/key/value are trained: fold under autograd
    assert hg.grad is not None and torch.isfinite(hg.grad).all()
    site.zero_grad(set_to_none=True)
    print(f"backend {name}: forward + backward ok")
assert fa.available_backends("cpu")["cpu"] is None
print("wheel smoke: ok")
EOF
cd - > /dev/null
rm -rf "$work"
stamp "done"
