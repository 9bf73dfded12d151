"""Test setup: the Triton interpreter on machines without CUDA, seeds, shared fixtures."""

import os


def _cuda_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a broken install
        return False


# Must happen before any Triton kernel is defined (i.e. before fusedadapter.kernels is imported),
# and only when no CUDA device is present: on a GPU the kernels run natively.
if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_sessionstart(session):
    """FUSEDADAPTER_REQUIRE_BACKENDS=torch,cpu,triton (.ci/run): a listed backend that cannot run
    here fails the session instead of its tests quietly skipping (tests/backends.py)."""
    from backends import REQUIRE_ENV, missing_required, required_backends

    if not required_backends():
        return
    missing = missing_required()
    if missing:
        raise pytest.UsageError(f"{REQUIRE_ENV}={os.environ[REQUIRE_ENV]}: required backend(s) cannot run here:\n  "
                                + "\n  ".join(missing))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="session")
def cpu_op():
    """The cpu backend's op (fusedadapter::fusion_cpu), built here; a build failure fails the test."""
    import fusedadapter as fa
    from fusedadapter import extension

    try:
        return extension.load_native_op("cpu", "cpu")
    except fa.BackendUnavailable as exc:  # pragma: no cover - CI has a compiler
        pytest.fail(f"the cpu extension must build here: {exc}")


def adapters_available() -> bool:
    try:
        import adapters  # noqa: F401

        return True
    except Exception:
        return False


requires_adapterhub = pytest.mark.skipif(not adapters_available(), reason="needs the `adapters` package (AdapterHub env)")
requires_cuda = pytest.mark.skipif(not _cuda_present(), reason="needs a CUDA device")
