// Shared by the CPU and CUDA implementations of the fused AdapterFusion op
// (fusedadapter/ops.py: FUSION_SCHEMA). Host and device code: the dropout hash, the activation
// table with its derivatives, and the per-row logic of the epilogue (dropout, adapter mask, softmax
// forward and backward, the logit-shift gradient), each written once here and run serially by the
// CPU backend and warp-parallel by the CUDA kernels. Keep every formula bit-compatible with
// fusedadapter/ops.py (hash_keep_mask) and fusedadapter/activations.py (apply_activation).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline
#endif

namespace fusedadapter {

// Op schema strings. tests/test_native.py checks them against fusedadapter.ops.
#define FA_FUSION_ARGS                                                                                   \
  "(Tensor xd, Tensor? xq, Tensor? residual, Tensor w_down, Tensor? b_down, Tensor w_query, "           \
  "Tensor? b_query, Tensor w_out, int[] segments, int[] activations, float temperature=1.0, "            \
  "float dropout_p=0.0, int seed=0, Tensor? keep_mask=None, Tensor? logit_shift=None, Tensor? adapter_mask=None)"
#define FA_FUSION_SCHEMA_ARGS FA_FUSION_ARGS " -> (Tensor, Tensor)"
#define FA_FUSION_BACKWARD_SCHEMA_ARGS                                                                   \
  "(Tensor grad_out, Tensor? grad_probs, Tensor probs, Tensor xd, Tensor? xq, Tensor w_down, "            \
  "Tensor? b_down, Tensor w_query, Tensor? b_query, Tensor w_out, int[] segments, int[] activations, "  \
  "float temperature, float dropout_p, int seed, Tensor? keep_mask, Tensor? logit_shift, bool[] needs, "  \
  "Tensor? adapter_mask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"

// Activation codes (fusedadapter/activations.py; part of the op schema, never renumber).
enum Act : int {
  kLinear = 0,
  kRelu = 1,
  kGelu = 2,       // erf form
  kGeluNew = 3,    // tanh form
  kSwish = 4,      // silu
  kTanh = 5,
  kSigmoid = 6,
  kLeakyRelu = 7,  // negative slope 0.01
  kQuickGelu = 8,  // x * sigmoid(1.702 x)
};
constexpr int kNumActivations = 9;

// ---------------------------------------------------------------------------------------------
// Dropout: lowbias32 (Chris Wellons), keep[r, k] = u(seed, r*N + k) >= p with
// u = (lowbias32(idx ^ lowbias32(seed)) >> 8) * 2^-24 compared in float32 (as torch does).
// ---------------------------------------------------------------------------------------------
FA_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

FA_HD uint32_t hash_seed_key(int64_t seed) { return lowbias32(static_cast<uint32_t>(static_cast<uint64_t>(seed))); }

FA_HD bool hash_keep(uint32_t key, int64_t idx, float p) {
  const uint32_t x = lowbias32(static_cast<uint32_t>(static_cast<uint64_t>(idx)) ^ key);
  const float u = static_cast<float>(x >> 8) * (1.0f / 16777216.0f);
  return u >= p;
}

// ---------------------------------------------------------------------------------------------
// Scalar math in T (float or double), host or device.
// ---------------------------------------------------------------------------------------------
template <typename T>
FA_HD T fa_exp(T x) {
#if defined(__CUDA_ARCH__)
  return exp(x);
#else
  return std::exp(x);
#endif
}
template <typename T>
FA_HD T fa_tanh(T x) {
#if defined(__CUDA_ARCH__)
  return tanh(x);
#else
  return std::tanh(x);
#endif
}
template <typename T>
FA_HD T fa_erf(T x) {
#if defined(__CUDA_ARCH__)
  return erf(x);
#else
  return std::erf(x);
#endif
}

template <typename T>
FA_HD T fa_sigmoid(T x) {
  return T(1) / (T(1) + fa_exp(-x));
}

constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2 / pi)
constexpr double kSqrtHalf = 0.70710678118654752440;     // 1 / sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1 / sqrt(2 pi)
constexpr double kGeluNewC = 0.044715;
constexpr double kQuickGeluA = 1.702;
constexpr double kLeakySlope = 0.01;

// act(x) for one activation code.
template <typename T>
FA_HD T act_forward(int code, T x) {
  switch (code) {
    case kRelu:
      return x > T(0) ? x : T(0);
    case kGelu:
      return T(0.5) * x * (T(1) + fa_erf(x * T(kSqrtHalf)));
    case kGeluNew:
      return T(0.5) * x * (T(1) + fa_tanh(T(kSqrt2OverPi) * (x + T(kGeluNewC) * (x * x * x))));
    case kSwish:
      return x / (T(1) + fa_exp(-x));
    case kTanh:
      return fa_tanh(x);
    case kSigmoid:
      return fa_sigmoid(x);
    case kLeakyRelu:
      return x > T(0) ? x : x * T(kLeakySlope);
    case kQuickGelu:
      return x * fa_sigmoid(T(kQuickGeluA) * x);
    default:
      return x;
  }
}

// act(x) and d act / dx together (the backward needs both: z for the weight gradients, act' for
// the chain rule).
template <typename T>
FA_HD void act_forward_grad(int code, T x, T& y, T& dy) {
  switch (code) {
    case kRelu:
      y = x > T(0) ? x : T(0);
      dy = x > T(0) ? T(1) : T(0);
      return;
    case kGelu: {
      const T cdf = T(0.5) * (T(1) + fa_erf(x * T(kSqrtHalf)));
      y = x * cdf;
      dy = cdf + x * T(kInvSqrt2Pi) * fa_exp(T(-0.5) * x * x);
      return;
    }
    case kGeluNew: {
      const T inner = T(kSqrt2OverPi) * (x + T(kGeluNewC) * (x * x * x));
      const T th = fa_tanh(inner);
      y = T(0.5) * x * (T(1) + th);
      dy = T(0.5) * (T(1) + th) +
           T(0.5) * x * (T(1) - th * th) * T(kSqrt2OverPi) * (T(1) + T(3 * kGeluNewC) * x * x);
      return;
    }
    case kSwish: {
      const T s = fa_sigmoid(x);
      y = x * s;
      dy = s * (T(1) + x * (T(1) - s));
      return;
    }
    case kTanh: {
      const T th = fa_tanh(x);
      y = th;
      dy = T(1) - th * th;
      return;
    }
    case kSigmoid: {
      const T s = fa_sigmoid(x);
      y = s;
      dy = s * (T(1) - s);
      return;
    }
    case kLeakyRelu:
      y = x > T(0) ? x : x * T(kLeakySlope);
      dy = x > T(0) ? T(1) : T(kLeakySlope);
      return;
    case kQuickGelu: {
      const T s = fa_sigmoid(T(kQuickGeluA) * x);
      y = x * s;
      dy = s + T(kQuickGeluA) * x * s * (T(1) - s);
      return;
    }
    default:
      y = x;
      dy = T(1);
      return;
  }
}


// ---------------------------------------------------------------------------------------------
// Per-row epilogue logic, written once for both backends.
//
// A row holds the N adapter logits (or probabilities) of one token. `Lanes` says who works on it:
// SerialLanes (the CPU: one thread, every n, reductions are the identity) or, in
// fusion_cuda_kernels.cu, WarpLanes (the 32 lanes of one warp, n = lane, lane + 32, ...;
// reductions by warp shuffles). Each lane reads and writes only its own entries, so the row
// arrays need no synchronisation beyond the reductions. Lanes provides first(), stride(),
// max(x), sum(x) and any(b) (the last three reduce the lanes' partial values and return the
// result to every lane).
// ---------------------------------------------------------------------------------------------
struct SerialLanes {
  static FA_HD int first() { return 0; }
  static FA_HD int stride() { return 1; }
  template <typename T>
  static FA_HD T max(T x) { return x; }
  template <typename T>
  static FA_HD T sum(T x) { return x; }
  static FA_HD bool any(bool b) { return b; }
};

// Dropout on the fusion logits and the adapter mask for one op call (plain data: a kernel
// argument on CUDA). scale = 1 / (1 - p) in double; each backend rounds it to its compute type.
struct DropParams {
  double p = 0.0;              // 0: no dropout
  double scale = 1.0;          // 1 / (1 - p)
  uint32_t key = 0;            // hash_seed_key(seed)
  const bool* keep = nullptr;  // (M, N) contiguous, or null: the hash decides
  const void* shift = nullptr; // logit_shift (M,) in the accumulation dtype, or null
  const bool* allow = nullptr; // adapter_mask (M, N) contiguous, applied after the dropout, or null
  FA_HD bool on() const { return p > 0.0; }
  // Is logit (m, n) kept (an N-column row-major layout)?
  FA_HD bool kept(int64_t m, int64_t n, int64_t N) const {
    return keep ? keep[m * N + n] : hash_keep(key, m * N + n, static_cast<float>(p));
  }
  // logit_shift[m] as T (S: its storage type, the accumulation dtype), 0 without one.
  template <typename S, typename T>
  FA_HD T shift_at(int64_t m) const {
    return shift ? static_cast<T>(static_cast<const S*>(shift)[m]) : T(0);
  }
};

// Row m's logits l[0..N) -> probabilities, in place (T: the compute type):
//   dropout   l = kept ? (l + shift) * scale : 0      (shift: logit_shift[m], 0 without one)
//   mask      l = -inf where adapter_mask[m] is false; a row masking every adapter -> all p = 0
//   softmax   p = softmax(l / temperature) (max subtracted)
template <typename Lanes, typename T>
FA_HD void row_probs(T* l, int64_t m, int N, const DropParams& d, T shift, T temperature) {
  if (d.on()) {
    const T scale = static_cast<T>(d.scale);
    for (int n = Lanes::first(); n < N; n += Lanes::stride()) l[n] = d.kept(m, n, N) ? (l[n] + shift) * scale : T(0);
  }
  if (d.allow) {
    const bool* a = d.allow + m * N;
    bool any = false;
    for (int n = Lanes::first(); n < N; n += Lanes::stride()) {
      if (a[n]) {
        any = true;
      } else {
        l[n] = -static_cast<T>(INFINITY);  // exp(-inf - max) = 0 below
      }
    }
    if (!Lanes::any(any)) {  // softmax would be 0/0
      for (int n = Lanes::first(); n < N; n += Lanes::stride()) l[n] = T(0);
      return;
    }
  }
  T mx = -static_cast<T>(INFINITY);
  for (int n = Lanes::first(); n < N; n += Lanes::stride()) {
    l[n] = l[n] / temperature;
    mx = l[n] > mx ? l[n] : mx;
  }
  mx = Lanes::max(mx);
  T sum = T(0);
  for (int n = Lanes::first(); n < N; n += Lanes::stride()) {
    l[n] = fa_exp(l[n] - mx);
    sum += l[n];
  }
  const T inv = T(1) / Lanes::sum(sum);
  for (int n = Lanes::first(); n < N; n += Lanes::stride()) l[n] *= inv;
}

// Softmax backward of row m, through the dropout: p[0..N) the probabilities (row_probs), g[0..N)
// d loss / d p on entry, d loss / d l (the logits before the dropout) on return:
//   dl = p (dp - sum_k p_k dp_k) / temperature,  times scale where kept and 0 where dropped.
// Returns d loss / d logit_shift[m] = sum_n dl_n, computed as
//   (scale / temperature) (P_drop S_kept - P_kept S_drop),  P = sum p, S = sum p dp over the kept
// and the dropped adapters: the direct sum is all cancellation (exactly 0 without dropout, where
// the shift cancels in the softmax; that case returns 0). Masked adapters have p = 0, hence dl = 0.
template <typename Lanes, typename T>
FA_HD T row_softmax_backward(const T* p, T* g, int64_t m, int N, const DropParams& d, T temperature) {
  const bool on = d.on();
  T sdp = T(0), p_keep = T(0), p_drop = T(0), s_keep = T(0), s_drop = T(0);
  for (int n = Lanes::first(); n < N; n += Lanes::stride()) {
    const T pd = p[n] * g[n];
    sdp += pd;
    if (on) {
      if (d.kept(m, n, N)) {
        p_keep += p[n];
        s_keep += pd;
      } else {
        p_drop += p[n];
        s_drop += pd;
      }
    }
  }
  sdp = Lanes::sum(sdp);
  const T scale = static_cast<T>(d.scale);
  for (int n = Lanes::first(); n < N; n += Lanes::stride()) {
    const T dl = p[n] * (g[n] - sdp) / temperature;
    g[n] = on ? (d.kept(m, n, N) ? dl * scale : T(0)) : dl;
  }
  if (!on) return T(0);
  p_keep = Lanes::sum(p_keep), p_drop = Lanes::sum(p_drop), s_keep = Lanes::sum(s_keep), s_drop = Lanes::sum(s_drop);
  return scale * (p_drop * s_keep - p_keep * s_drop) / temperature;
}

}  // namespace fusedadapter
