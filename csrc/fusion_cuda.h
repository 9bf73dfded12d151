// The `cuda` backend's epilogue kernels (fusion_cuda_kernels.cu), called by fusion_cuda.cpp.
// GEMMs run in cuBLAS through ATen (at::mm, including its bf16/fp16 -> fp32 `out_dtype` form);
// these kernels do everything between them, one thread block per row (the row logic of
// fusion_common.h on one warp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "fusion_common.h"

namespace fusedadapter {
namespace cuda {

constexpr int kMaxAdapters = 128;

// Segments and activation codes, passed by value as a kernel argument (no host->device copy).
struct SegParams {
  int n;
  int r;
  int offsets[kMaxAdapters + 1];
  int codes[kMaxAdapters];
};

// Dropout and adapter mask: fusedadapter::DropParams (fusion_common.h, shared with the CPU backend).
using DropParams = ::fusedadapter::DropParams;

// Forward: zp (M, R) and t (M, R+N) are GEMM1 outputs without bias (accumulation dtype, row-major,
// any row stride); writes probs (M, N) and w (M, R+N) (w's dtype: the GEMM2 input dtype).
void forward_epilogue(const at::Tensor& zp, const at::Tensor& t, const std::optional<at::Tensor>& b_down,
                      const std::optional<at::Tensor>& b_query, at::Tensor& probs, at::Tensor& w,
                      const SegParams& seg, double temperature, const DropParams& drop);

// Backward: zp, t recomputed GEMM1 outputs without bias, dw = grad_out @ w_out (M, R+N), gp
// (M, N) or undefined; writes dzp (M, R), dt (M, R+N), wmix (M, R+N) if defined, dshift (M,) if
// defined. All in the accumulation dtype, contiguous.
void backward_epilogue(const at::Tensor& zp, const at::Tensor& t, const std::optional<at::Tensor>& b_down,
                       const std::optional<at::Tensor>& b_query, const at::Tensor& dw, const at::Tensor& gp,
                       at::Tensor& dzp, at::Tensor& dt, at::Tensor& wmix, at::Tensor& dshift, const SegParams& seg,
                       double temperature, const DropParams& drop);

}  // namespace cuda
}  // namespace fusedadapter
