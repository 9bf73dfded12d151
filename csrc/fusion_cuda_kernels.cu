// Epilogue kernels of the `cuda` backend (see fusion_cuda.h). One thread block per row (grid-stride
// over rows): each warp takes whole segments (adapters) and reduces their dot products with a
// fixed shuffle tree (no atomics: the order is the same in every run, so the backward recomputes
// bit for bit the logits, hence the probabilities, the forward had); warp 0 runs the row's dropout,
// adapter mask and softmax (and its backward) from fusion_common.h lane-parallel (N <= 128, up to
// 4 adapters a lane); then every thread sweeps the R bottleneck columns (the activation is
// recomputed rather than stored). Semantics of fusedadapter/ops.py. Precision as the cpu backend's
// backward: GEMM1 outputs and activations in the accumulation dtype T (float, or double for float64
// inputs), everything per row from the logits on (segment dots, softmax and its backward, dshift,
// p z) in double (RowT), rounded once to T; the forward does the same, so the backward's p is the
// forward's p before rounding. fp32 row math lost the docs/algorithm.md §4 bound where the probabilities
// saturate (see fusion_cpu.cpp); the double work is O(R + N) per row next to O(H (R + N)) GEMMs.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include "fusion_common.h"
#include "fusion_cuda.h"

namespace fusedadapter {
namespace cuda {
namespace {

constexpr int kThreads = 128;

__device__ __forceinline__ int segment_of(const SegParams& seg, int j) {
  int lo = 0, hi = seg.n - 1;  // offsets[lo] <= j < offsets[hi + 1]
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (seg.offsets[mid] <= j) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

constexpr int kWarps = kThreads / 32;
// At least 8 blocks (32 warps) an SM, so at most 64 registers a thread: without the minimum, ptxas
// held the float forward kernel to 48 registers and spilled 40 B (sm_90, CUDA 13.0); with it no
// kernel spills (csrc/compile_check.py reports ptxas -v).
constexpr int kMinBlocks = 8;
constexpr unsigned kFullMask = 0xffffffffu;

// fusion_common.h's row functions on the 32 lanes of one warp: lane l owns adapters l, l+32, ...;
// the reductions are butterfly shuffles (every lane gets the result, in a fixed order).
struct WarpLanes {
  static __device__ __forceinline__ int first() { return static_cast<int>(threadIdx.x & 31u); }
  static __device__ __forceinline__ int stride() { return 32; }
  template <typename T>
  static __device__ __forceinline__ T max(T x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const T y = __shfl_xor_sync(kFullMask, x, o);
      x = y > x ? y : x;
    }
    return x;
  }
  template <typename T>
  static __device__ __forceinline__ T sum(T x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
    return x;
  }
  static __device__ __forceinline__ bool any(bool b) { return __any_sync(kFullMask, b) != 0; }
};

using RowT = double;

// Row m's segment dot products (in double), one warp per adapter (warp w takes adapters w, w + kWarps, ...):
//   s_l[n]  = sum_{j in segment n} (t[j] + b_query[j]) * act_n(zp[j] + b_down[j]) + t[R+n] + b_query[R+n]
//   s_dp[n] = sum_{j in segment n} dw[j] * act_n(zp[j] + b_down[j]) + dw[R+n] + gp[n]   (WITH_DP only)
// The forward and the backward both call this, so their logits agree bit for bit.
template <typename T, bool WITH_DP>
__device__ __forceinline__ void segment_dots(RowT* s_l, RowT* s_dp, const T* zr, const T* tr, const T* b_down,
                                             const T* b_query, const T* dwr, const T* gpr, const SegParams& seg) {
  const int lane = static_cast<int>(threadIdx.x & 31u), warp = static_cast<int>(threadIdx.x >> 5);
  const int R = seg.r;
  for (int n = warp; n < seg.n; n += kWarps) {
    const int code = seg.codes[n];
    RowT acc = 0.0, acc_dp = 0.0;
    for (int j = seg.offsets[n] + lane; j < seg.offsets[n + 1]; j += 32) {
      const RowT z = act_forward<T>(code, zr[j] + (b_down ? b_down[j] : T(0)));
      acc += RowT(tr[j] + (b_query ? b_query[j] : T(0))) * z;
      if (WITH_DP) acc_dp += RowT(dwr[j]) * z;
    }
    acc = WarpLanes::sum(acc);
    if (WITH_DP) acc_dp = WarpLanes::sum(acc_dp);
    if (lane == 0) {
      s_l[n] = acc + RowT(tr[R + n] + (b_query ? b_query[R + n] : T(0)));
      if (WITH_DP) s_dp[n] = (gpr ? RowT(gpr[n]) : 0.0) + acc_dp + RowT(dwr[R + n]);
    }
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    forward_epilogue_kernel(const T* __restrict__ zp, int64_t ldzp, const T* __restrict__ t, int64_t ldt,
                            const T* __restrict__ b_down, const T* __restrict__ b_query, T* __restrict__ probs,
                            W* __restrict__ w, int64_t ldw, int64_t M, const SegParams seg, double temperature,
                            const DropParams drop) {
  __shared__ RowT s_l[kMaxAdapters];
  const int R = seg.r, N = seg.n;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const T* zr = zp + m * ldzp;
    const T* tr = t + m * ldt;
    segment_dots<T, false>(s_l, nullptr, zr, tr, b_down, b_query, nullptr, nullptr, seg);
    __syncthreads();
    if (threadIdx.x < 32) row_probs<WarpLanes>(s_l, m, N, drop, drop.shift_at<T, RowT>(m), RowT(temperature));
    __syncthreads();
    W* wr = w + m * ldw;
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      const int n = segment_of(seg, j);
      const T x = zr[j] + (b_down ? b_down[j] : T(0));
      wr[j] = static_cast<W>(static_cast<T>(s_l[n] * RowT(act_forward<T>(seg.codes[n], x))));
    }
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
      const T p = static_cast<T>(s_l[n]);
      wr[R + n] = static_cast<W>(p);
      probs[m * N + n] = p;
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    backward_epilogue_kernel(const T* __restrict__ zp, const T* __restrict__ t, const T* __restrict__ b_down,
                             const T* __restrict__ b_query, const T* __restrict__ dw, const T* __restrict__ gp,
                             T* __restrict__ dzp, T* __restrict__ dt, T* __restrict__ wmix, T* __restrict__ dshift,
                             int64_t M, const SegParams seg, double temperature, const DropParams drop) {
  __shared__ RowT s_p[kMaxAdapters];   // logits, then probabilities
  __shared__ RowT s_dp[kMaxAdapters];  // d loss / d p, then d loss / d logit (dl)
  const int R = seg.r, N = seg.n, RN = seg.r + seg.n;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    const T* zr = zp + m * R;
    const T* tr = t + m * RN;
    const T* dwr = dw + m * RN;
    segment_dots<T, true>(s_p, s_dp, zr, tr, b_down, b_query, dwr, gp ? gp + m * N : nullptr, seg);
    __syncthreads();
    if (threadIdx.x < 32) {
      row_probs<WarpLanes>(s_p, m, N, drop, drop.shift_at<T, RowT>(m), RowT(temperature));
      // s_dp: d loss / d p -> d loss / d logit; dshift without the cancellation of the direct sum
      const RowT ds = row_softmax_backward<WarpLanes>(s_p, s_dp, m, N, drop, RowT(temperature));
      for (int n = WarpLanes::first(); n < N; n += WarpLanes::stride()) {
        dt[m * RN + R + n] = static_cast<T>(s_dp[n]);
        if (wmix) wmix[m * RN + R + n] = static_cast<T>(s_p[n]);
      }
      if (dshift && threadIdx.x == 0) dshift[m] = static_cast<T>(ds);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      const int n = segment_of(seg, j);
      T z, da;
      act_forward_grad<T>(seg.codes[n], zr[j] + (b_down ? b_down[j] : T(0)), z, da);
      const RowT y = tr[j] + (b_query ? b_query[j] : T(0));
      const RowT dl = s_dp[n], p = s_p[n];
      dt[m * RN + j] = static_cast<T>(dl * RowT(z));
      dzp[m * R + j] = static_cast<T>((p * RowT(dwr[j]) + dl * y) * RowT(da));
      if (wmix) wmix[m * RN + j] = static_cast<T>(p * RowT(z));
    }
    __syncthreads();
  }
}

int grid_for(int64_t M) {
  return static_cast<int>(M < 65535 * 8 ? (M > 0 ? M : 1) : 65535 * 8);
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace

void forward_epilogue(const at::Tensor& zp, const at::Tensor& t, const std::optional<at::Tensor>& b_down,
                      const std::optional<at::Tensor>& b_query, at::Tensor& probs, at::Tensor& w,
                      const SegParams& seg, double temperature, const DropParams& drop) {
  const int64_t M = zp.size(0);
  if (M == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(zp.scalar_type(), "fusion_cuda_forward_epilogue", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "fusion_cuda_forward_w", [&] {
      using W = scalar_t;
      forward_epilogue_kernel<T, W><<<grid_for(M), kThreads, 0, stream>>>(
          zp.data_ptr<T>(), zp.stride(0), t.data_ptr<T>(), t.stride(0), opt_ptr<T>(b_down), opt_ptr<T>(b_query),
          probs.data_ptr<T>(), w.data_ptr<W>(), w.stride(0), M, seg, temperature, drop);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void backward_epilogue(const at::Tensor& zp, const at::Tensor& t, const std::optional<at::Tensor>& b_down,
                       const std::optional<at::Tensor>& b_query, const at::Tensor& dw, const at::Tensor& gp,
                       at::Tensor& dzp, at::Tensor& dt, at::Tensor& wmix, at::Tensor& dshift, const SegParams& seg,
                       double temperature, const DropParams& drop) {
  const int64_t M = zp.size(0);
  if (M == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(zp.scalar_type(), "fusion_cuda_backward_epilogue", [&] {
    using T = scalar_t;
    backward_epilogue_kernel<T><<<grid_for(M), kThreads, 0, stream>>>(
        zp.data_ptr<T>(), t.data_ptr<T>(), opt_ptr<T>(b_down), opt_ptr<T>(b_query), dw.data_ptr<T>(),
        gp.defined() ? gp.data_ptr<T>() : nullptr, dzp.data_ptr<T>(), dt.data_ptr<T>(),
        wmix.defined() ? wmix.data_ptr<T>() : nullptr, dshift.defined() ? dshift.data_ptr<T>() : nullptr, M, seg,
        temperature, drop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace fusedadapter
