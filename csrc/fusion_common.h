// Shared by the CPU and CUDA implementations of the fused AdapterFusion op
// (fusedadapter/ops.py: FUSION_SCHEMA). Host and device code: the dropout hash and the
// activation table with its derivatives. Keep every formula bit-compatible with
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
#define FA_FUSION_SCHEMA_ARGS                                                                            \
  "(Tensor xd, Tensor? xq, Tensor? residual, Tensor w_down, Tensor? b_down, Tensor w_query, "           \
  "Tensor? b_query, Tensor w_out, int[] segments, int[] activations, float temperature=1.0, "            \
  "float dropout_p=0.0, int seed=0, Tensor? keep_mask=None, Tensor? logit_shift=None, Tensor? adapter_mask=None) " \
  "-> (Tensor, Tensor)"
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

}  // namespace fusedadapter
