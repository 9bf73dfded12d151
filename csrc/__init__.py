"""C++/CUDA sources of the ``cpu`` and ``cuda`` backends (built just in time by
:mod:`fusedadapter.extension`). Shipped as package data so an installed wheel can build them."""

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent

CPU_SOURCES = ("fusion_cpu.cpp", "cpu_kernels.cpp")
CUDA_SOURCES = ("fusion_cuda.cpp", "fusion_cuda_kernels.cu")
HEADERS = ("fusion_common.h", "fusion_host.h", "cpu_kernels.h", "fusion_cuda.h")
