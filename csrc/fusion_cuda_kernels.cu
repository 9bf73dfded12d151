// Epilogue kernels of the `cuda` backend (see fusion_cuda.h). One thread block per row (grid-stride
// over rows): threads sweep the R bottleneck columns, segment sums go through shared-memory atomics,
// one thread does the N-way dropout + softmax (N <= 128), then the threads sweep the columns again
// (the activation is recomputed rather than stored). Math in the accumulation dtype T (float, or
// double for float64 inputs); semantics of fusedadapter/ops.py.
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

template <typename T>
__device__ __forceinline__ bool keep_at(const DropParams& d, int64_t m, int n, int N) {
  return d.keep ? d.keep[m * N + n] : hash_keep(d.key, m * N + n, static_cast<float>(d.p));
}

// Row logits (in s_l) -> probabilities in place, by one thread. Masked adapters (d.allow) get
// probability 0; a row that masks every adapter gets all 0 (no softmax: it would be 0/0).
template <typename T>
__device__ void row_softmax(T* s_l, int64_t m, int N, const DropParams& d, T temperature) {
  if (d.p > 0.0) {
    const T shift = d.shift ? static_cast<const T*>(d.shift)[m] : T(0);
    const T scale = static_cast<T>(d.scale);
    for (int n = 0; n < N; ++n) s_l[n] = keep_at<T>(d, m, n, N) ? (s_l[n] + shift) * scale : T(0);
  }
  if (d.allow) {
    const bool* a = d.allow + m * N;
    bool any = false;
    for (int n = 0; n < N; ++n) {
      if (a[n]) {
        any = true;
      } else {
        s_l[n] = -INFINITY;  // exp(-inf - max) = 0 below
      }
    }
    if (!any) {
      for (int n = 0; n < N; ++n) s_l[n] = T(0);
      return;
    }
  }
  T mx = s_l[0] / temperature;
  for (int n = 0; n < N; ++n) {
    s_l[n] = s_l[n] / temperature;
    mx = s_l[n] > mx ? s_l[n] : mx;
  }
  T sum = T(0);
  for (int n = 0; n < N; ++n) {
    s_l[n] = fa_exp(s_l[n] - mx);
    sum += s_l[n];
  }
  const T inv = T(1) / sum;
  for (int n = 0; n < N; ++n) s_l[n] *= inv;
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
    forward_epilogue_kernel(const T* __restrict__ zp, int64_t ldzp, const T* __restrict__ t, int64_t ldt,
                            const T* __restrict__ b_down, const T* __restrict__ b_query, T* __restrict__ probs,
                            W* __restrict__ w, int64_t ldw, int64_t M, const SegParams seg, T temperature,
                            const DropParams drop) {
  __shared__ T s_l[kMaxAdapters];
  const int R = seg.r, N = seg.n;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    for (int n = threadIdx.x; n < N; n += blockDim.x) s_l[n] = T(0);
    __syncthreads();
    const T* zr = zp + m * ldzp;
    const T* tr = t + m * ldt;
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      const int n = segment_of(seg, j);
      const T x = zr[j] + (b_down ? b_down[j] : T(0));
      const T y = tr[j] + (b_query ? b_query[j] : T(0));
      atomicAdd(&s_l[n], y * act_forward<T>(seg.codes[n], x));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int n = 0; n < N; ++n) s_l[n] += tr[R + n] + (b_query ? b_query[R + n] : T(0));
      row_softmax<T>(s_l, m, N, drop, temperature);
    }
    __syncthreads();
    W* wr = w + m * ldw;
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      const int n = segment_of(seg, j);
      const T x = zr[j] + (b_down ? b_down[j] : T(0));
      wr[j] = static_cast<W>(s_l[n] * act_forward<T>(seg.codes[n], x));
    }
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
      wr[R + n] = static_cast<W>(s_l[n]);
      probs[m * N + n] = s_l[n];
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_epilogue_kernel(const T* __restrict__ zp, const T* __restrict__ t, const T* __restrict__ b_down,
                             const T* __restrict__ b_query, const T* __restrict__ dw, const T* __restrict__ gp,
                             T* __restrict__ dzp, T* __restrict__ dt, T* __restrict__ wmix, T* __restrict__ dshift,
                             int64_t M, const SegParams seg, T temperature, const DropParams drop) {
  __shared__ T s_p[kMaxAdapters];   // logits, then probabilities
  __shared__ T s_dp[kMaxAdapters];  // d loss / d p, then d loss / d logit (dl)
  const int R = seg.r, N = seg.n, RN = seg.r + seg.n;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {
    for (int n = threadIdx.x; n < N; n += blockDim.x) s_p[n] = s_dp[n] = T(0);
    __syncthreads();
    const T* zr = zp + m * R;
    const T* tr = t + m * RN;
    const T* dwr = dw + m * RN;
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      const int n = segment_of(seg, j);
      const T z = act_forward<T>(seg.codes[n], zr[j] + (b_down ? b_down[j] : T(0)));
      atomicAdd(&s_p[n], (tr[j] + (b_query ? b_query[j] : T(0))) * z);
      atomicAdd(&s_dp[n], dwr[j] * z);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int n = 0; n < N; ++n) s_p[n] += tr[R + n] + (b_query ? b_query[R + n] : T(0));
      row_softmax<T>(s_p, m, N, drop, temperature);
      T sdp = T(0);
      for (int n = 0; n < N; ++n) {
        s_dp[n] += dwr[R + n] + (gp ? gp[m * N + n] : T(0));
        sdp += s_p[n] * s_dp[n];
      }
      const bool on = drop.p > 0.0;
      const T scale = static_cast<T>(drop.scale);
      T p_keep = T(0), p_drop = T(0), s_keep = T(0), s_drop = T(0);
      for (int n = 0; n < N; ++n) {
        const bool kept = !on || keep_at<T>(drop, m, n, N);
        if (kept) {
          p_keep += s_p[n];
          s_keep += s_p[n] * s_dp[n];
        } else {
          p_drop += s_p[n];
          s_drop += s_p[n] * s_dp[n];
        }
        T dl = s_p[n] * (s_dp[n] - sdp) / temperature;
        if (on) dl = kept ? dl * scale : T(0);
        s_dp[n] = dl;
        dt[m * RN + R + n] = dl;
        if (wmix) wmix[m * RN + R + n] = s_p[n];
      }
      // sum_n dl_n without the cancellation of the direct sum (see fusion_cpu.cpp)
      if (dshift) dshift[m] = on ? scale * (p_drop * s_keep - p_keep * s_drop) / temperature : T(0);
    }
    __syncthreads();
    for (int j = threadIdx.x; j < R; j += blockDim.x) {
      const int n = segment_of(seg, j);
      T z, da;
      act_forward_grad<T>(seg.codes[n], zr[j] + (b_down ? b_down[j] : T(0)), z, da);
      const T y = tr[j] + (b_query ? b_query[j] : T(0));
      const T dl = s_dp[n], p = s_p[n];
      dt[m * RN + j] = dl * z;
      dzp[m * R + j] = (p * dwr[j] + dl * y) * da;
      if (wmix) wmix[m * RN + j] = p * z;
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
          probs.data_ptr<T>(), w.data_ptr<W>(), w.stride(0), M, seg, static_cast<T>(temperature), drop);
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
        static_cast<T>(temperature), drop);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace fusedadapter
