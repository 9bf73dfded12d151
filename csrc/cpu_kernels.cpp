// CPU kernels of the `cpu` backend; see cpu_kernels.h. Every x86 kernel carries its own
// target attribute and runs only after a run-time CPU check, so the file builds with plain
// `-O3` for any x86-64 (and, without the x86 parts, for other architectures).
#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>

#include "fusion_common.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define FA_X86 1
#include <immintrin.h>
#else
#define FA_X86 0
#endif

namespace fusedadapter {
namespace cpu {

// ============================================================================ ISA selection
namespace {

int detect_isa() {
#if FA_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma");
  if (!avx512) return kGeneric;
  return __builtin_cpu_supports("avx512bf16") ? kAvx512Bf16 : kAvx512;
#else
  return kGeneric;
#endif
}

int env_isa_cap() {
  const char* s = std::getenv("FUSEDADAPTER_CPU_ISA");
  if (s == nullptr || *s == '\0') return kAvx512Bf16;
  std::string v(s);
  for (auto& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v == "generic" || v == "0" || v == "none") return kGeneric;
  if (v == "avx512" || v == "1") return kAvx512;
  return kAvx512Bf16;
}

std::atomic<int> g_isa_cap{-1};

}  // namespace

int detected_isa() {
  static const int isa = detect_isa();
  return isa;
}

int active_isa() {
  int cap = g_isa_cap.load(std::memory_order_relaxed);
  if (cap < 0) {
    cap = env_isa_cap();
    g_isa_cap.store(cap, std::memory_order_relaxed);
  }
  return std::min(detected_isa(), cap);
}

void set_isa_cap(int cap) { g_isa_cap.store(cap < 0 ? env_isa_cap() : cap, std::memory_order_relaxed); }

int env_f32_gemm() {
  const char* s = std::getenv("FUSEDADAPTER_CPU_ONEDNN");
  std::string v(s == nullptr ? "" : s);
  v.erase(0, v.find_first_not_of(" \t"));
  v.erase(v.find_last_not_of(" \t") + 1);
  for (auto& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (v == "0" || v == "off" || v == "no" || v == "false") return kF32Packed;
  if (!v.empty() && v != "1" && v != "on" && v != "yes" && v != "true") {
    TORCH_WARN("fusedadapter: FUSEDADAPTER_CPU_ONEDNN=", s, " is not one of 1/on/yes/true or 0/off/no/false; ",
               "using the default (1: the cpu backend's float32 backward products on oneDNN)");
  }
  return kF32Onednn;  // on by default: see cpu_kernels.h
}

Tuning& tuning() {
  static Tuning t = [] {
    Tuning v;
    v.f32_gemm = env_f32_gemm();
    return v;
  }();
  return t;
}

// ============================================================================ bf16 rounding
// Round-to-nearest-even with NaN -> quiet NaN, bit-identical to c10::BFloat16(float).
static inline uint16_t f32_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return 0x7FC0;
  return static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
}
static inline float bf16_bits_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if FA_X86
#define FA_TGT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define FA_TGT_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#define FA_INLINE inline __attribute__((always_inline))

// SLEEF's AVX-512 float functions, which libtorch_cpu exports (ATen's own vectorised math). Weak:
// a torch build without them leaves these null and the epilogue uses scalar libm.
extern "C" {
FA_TGT_AVX512 __m512 Sleef_expf16_u10(__m512) __attribute__((weak));
FA_TGT_AVX512 __m512 Sleef_tanhf16_u10(__m512) __attribute__((weak));
FA_TGT_AVX512 __m512 Sleef_erff16_u10(__m512) __attribute__((weak));
}

typedef int32_t fa_i32_alias __attribute__((may_alias));

FA_TGT_AVX512 static FA_INLINE __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 floats -> 16 bf16 (RNE, NaN -> 0x7FC0), AVX-512F only.
FA_TGT_AVX512 static FA_INLINE __m256i cvt_f32_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i out = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(out);
}

FA_TGT_AVX512 static FA_INLINE __m512 cvt_bf16_f32(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// ---------------------------------------------------------------------------- activations
FA_TGT_AVX512 static FA_INLINE __m512 v_sigmoid_of_neg_exp(__m512 e) {  // 1 / (1 + e)
  return _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

FA_TGT_AVX512 static FA_INLINE __m512 v_act(int code, __m512 x) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 half = _mm512_set1_ps(0.5f);
  switch (code) {
    case kRelu:
      return _mm512_max_ps(zero, x);  // max(0, NaN) = NaN, as torch.relu
    case kGelu:
      return _mm512_mul_ps(_mm512_mul_ps(half, x),
                           _mm512_add_ps(one, Sleef_erff16_u10(_mm512_mul_ps(x, _mm512_set1_ps(float(kSqrtHalf))))));
    case kGeluNew: {
      const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
      const __m512 inner =
          _mm512_mul_ps(_mm512_set1_ps(float(kSqrt2OverPi)), _mm512_fmadd_ps(_mm512_set1_ps(float(kGeluNewC)), x3, x));
      return _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, Sleef_tanhf16_u10(inner)));
    }
    case kSwish:
      return _mm512_div_ps(x, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_sub_ps(zero, x))));
    case kTanh:
      return Sleef_tanhf16_u10(x);
    case kSigmoid:
      return v_sigmoid_of_neg_exp(Sleef_expf16_u10(_mm512_sub_ps(zero, x)));
    case kLeakyRelu: {
      const __mmask16 pos = _mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ);
      return _mm512_mask_mov_ps(_mm512_mul_ps(x, _mm512_set1_ps(float(kLeakySlope))), pos, x);
    }
    case kQuickGelu:
      return _mm512_mul_ps(
          x, v_sigmoid_of_neg_exp(Sleef_expf16_u10(_mm512_mul_ps(_mm512_set1_ps(-float(kQuickGeluA)), x))));
    default:
      return x;
  }
}

FA_TGT_AVX512 static void avx512_act_span(int code, const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 x = _mm512_maskz_loadu_ps(m, in + i);
    _mm512_mask_storeu_ps(out + i, m, v_act(code, x));
  }
}

FA_TGT_AVX512 static float avx512_dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

FA_TGT_AVX512 static void avx512_scale_f32(float p, const float* z, float* out, int64_t n) {
  const __m512 vp = _mm512_set1_ps(p);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(vp, _mm512_maskz_loadu_ps(m, z + i)));
  }
}

FA_TGT_AVX512 static void avx512_scale_bf16(float p, const float* z, uint16_t* out, int64_t n) {
  const __m512 vp = _mm512_set1_ps(p);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m256i h = cvt_f32_bf16(_mm512_mul_ps(vp, _mm512_maskz_loadu_ps(m, z + i)));
    _mm256_mask_storeu_epi16(out + i, m, h);
  }
}

static const F32Ops kAvx512Ops = {avx512_act_span, avx512_dot, avx512_scale_f32, avx512_scale_bf16};
#endif  // FA_X86

const F32Ops* f32_ops() {
#if FA_X86
  static const bool sleef = Sleef_expf16_u10 != nullptr && Sleef_tanhf16_u10 != nullptr && Sleef_erff16_u10 != nullptr;
  if (sleef && active_isa() >= kAvx512) return &kAvx512Ops;
#endif
  return nullptr;
}

// ============================================================================ stores
// One output element: v (+ bias) (+ residual) -> C as float or bf16.
static inline void store_scalar(float v, int64_t m, int64_t n, const float* bias, const void* res, Elem res_t,
                                int64_t ldr, void* C, Elem c_t, int64_t ldc) {
  if (bias) v += bias[n];
  if (res_t == Elem::kF32) v += static_cast<const float*>(res)[m * ldr + n];
  if (res_t == Elem::kBF16) v += bf16_bits_to_f32(static_cast<const uint16_t*>(res)[m * ldr + n]);
  if (c_t == Elem::kF32)
    static_cast<float*>(C)[m * ldc + n] = v;
  else
    static_cast<uint16_t*>(C)[m * ldc + n] = f32_to_bf16_bits(v);
}

#if FA_X86
// ============================================================================ fp32 small-M GEMM
template <int MR, int NR>
FA_TGT_AVX512 static FA_INLINE void small_block(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                                                float* sums) {
  __m512 acc[MR][NR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 b[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) b[j] = _mm512_loadu_ps(B + j * ldb + k);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_loadu_ps(A + r * lda + k);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
    }
  }
  if (k < K) {
    const __mmask16 m = tail_mask(K - k);
    __m512 b[NR];
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) b[j] = _mm512_maskz_loadu_ps(m, B + j * ldb + k);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_maskz_loadu_ps(m, A + r * lda + k);
#pragma GCC unroll 16
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NR; ++j) sums[r * NR + j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int MR>
FA_TGT_AVX512 static void small_rows(int64_t m0, int64_t n0, int64_t n1, int64_t K, const float* A, int64_t lda,
                                     const float* B, int64_t ldb, const float* bias, const void* res, Elem res_t,
                                     int64_t ldr, void* C, Elem c_t, int64_t ldc) {
  // 16 accumulators (or fewer) of MR rows x NR weight rows; NR weight rows stream once per MR rows.
  constexpr int NR = MR == 1 ? 8 : (MR == 2 ? 8 : (MR == 3 ? 5 : (MR == 4 ? 4 : (MR == 5 ? 3 : 2))));
  float sums[MR * NR];
  const float* a = A + m0 * lda;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    small_block<MR, NR>(K, a, lda, B + n * ldb, ldb, sums);
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) store_scalar(sums[r * NR + j], m0 + r, n + j, bias, res, res_t, ldr, C, c_t, ldc);
  }
  for (; n < n1; ++n) {
    small_block<MR, 1>(K, a, lda, B + n * ldb, ldb, sums);
    for (int r = 0; r < MR; ++r) store_scalar(sums[r], m0 + r, n, bias, res, res_t, ldr, C, c_t, ldc);
  }
}

using SmallRowsFn = void (*)(int64_t, int64_t, int64_t, int64_t, const float*, int64_t, const float*, int64_t,
                             const float*, const void*, Elem, int64_t, void*, Elem, int64_t);
static const SmallRowsFn kSmallRows[8] = {small_rows<1>, small_rows<2>, small_rows<3>, small_rows<4>,
                                          small_rows<5>, small_rows<6>, small_rows<7>, small_rows<8>};
#endif  // FA_X86

bool gemm_small_f32(int64_t M, int64_t Nout, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    const float* bias, const void* res, Elem res_t, int64_t ldr, void* C, Elem c_t, int64_t ldc) {
#if FA_X86
  if (active_isa() < kAvx512) return false;
  if (M <= 0 || Nout <= 0) return true;
  // Split the weight rows across threads: each thread streams its share of B once per 8 rows.
  const int64_t grain = std::max<int64_t>(32, (int64_t{1} << 16) / std::max<int64_t>(K * M, 1));
  at::parallel_for(0, Nout, grain, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mr = std::min<int64_t>(8, M - m0);
      kSmallRows[mr - 1](m0, n0, n1, K, A, lda, B, ldb, bias, res, res_t, ldr, C, c_t, ldc);
    }
  });
  return true;
#else
  return false;
#endif
}

// ============================================================================ packed GEMMs
// B (Nout, K) is packed per call into panels of 32 output columns: fp32 [k][32], bf16 [k pair][32][2].
int64_t packed_b_bf16_elems(int64_t Nout, int64_t K) { return ((Nout + 31) / 32) * ((K + 1) / 2) * 64; }
int64_t packed_b_f32_elems(int64_t Nout, int64_t K) { return ((Nout + 31) / 32) * K * 32; }

#if FA_X86
// In-register transpose of a 16 x 16 matrix of 32-bit elements (rows r[0..15] -> columns r[0..15]).
FA_TGT_AVX512 static FA_INLINE void transpose16(__m512i r[16]) {
  __m512i t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // r[4i + c], lane L: column 4L + c of rows 4i..4i+3
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  __m512i out[16];
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    const __m512i x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    const __m512i x2 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i x3 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    out[c] = _mm512_shuffle_i32x4(x0, x2, 0x88);
    out[8 + c] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
    out[4 + c] = _mm512_shuffle_i32x4(x1, x3, 0x88);
    out[12 + c] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
  }
#pragma GCC unroll 16
  for (int c = 0; c < 16; ++c) r[c] = out[c];
}

// 16 weight rows n0.. (fewer at the end: zero rows) x 16 k (fp32) or 16 k pairs (bf16) -> 16 vectors,
// one per k (pair), holding the 16 rows; stored at panel offset j (0 or 16).
template <bool BF16>
FA_TGT_AVX512 static void pack_tile(const float* B, int64_t ldb, int64_t rows, int64_t K, int64_t k0, int32_t* dst,
                                    int64_t j) {
  __m512i r[16];
  const int64_t width = BF16 ? 32 : 16;  // B elements per row of the tile
  const int64_t rem = K - k0;
  const int64_t cols = std::min<int64_t>(width, rem);  // valid k
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i >= rows) {
      r[i] = _mm512_setzero_si512();
      continue;
    }
    const float* row = B + i * ldb + k0;
    if constexpr (BF16) {
      const __mmask16 m0 = tail_mask(cols), m1 = cols > 16 ? tail_mask(cols - 16) : static_cast<__mmask16>(0);
      const __m256i lo = cvt_f32_bf16(_mm512_maskz_loadu_ps(m0, row));
      const __m256i hi = cvt_f32_bf16(_mm512_maskz_loadu_ps(m1, row + 16));
      r[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    } else {
      r[i] = _mm512_castps_si512(_mm512_maskz_loadu_ps(tail_mask(cols), row));
    }
  }
  transpose16(r);
  const int64_t n_out = BF16 ? (cols + 1) / 2 : cols;  // k (pairs) present in this tile
  for (int64_t c = 0; c < n_out; ++c) _mm512_storeu_si512(dst + c * 32 + j, r[c]);
}

template <bool BF16>
static void pack_b(const float* B, int64_t ldb, int64_t Nout, int64_t K, void* out) {
  const int64_t kk = BF16 ? (K + 1) / 2 : K;  // k (pairs) per panel
  const int64_t panels = (Nout + 31) / 32;
  const int64_t step = BF16 ? 32 : 16;
  at::parallel_for(0, panels * 2, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {  // half panels: 16 weight rows
      const int64_t panel = h / 2, j = (h % 2) * 16, n0 = panel * 32 + j;
      int32_t* dst = static_cast<int32_t*>(out) + panel * kk * 32;
      const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(16, Nout - n0));
      for (int64_t k0 = 0; k0 < K; k0 += step) {
        pack_tile<BF16>(B + n0 * ldb, ldb, rows, K, k0, dst + (k0 / (BF16 ? 2 : 1)) * 32, j);
      }
    }
  });
}

// Store an MR x 32 tile: + bias, + residual, as float or bf16, columns masked at Nout.
template <int MR>
FA_TGT_AVX512 static FA_INLINE void store_tile(const __m512 (&acc0)[MR], const __m512 (&acc1)[MR], int64_t m0,
                                               int64_t n0, int64_t Nout, const float* bias, const void* res,
                                               Elem res_t, int64_t ldr, void* C, Elem c_t, int64_t ldc) {
  const __mmask16 k0 = tail_mask(Nout - n0), k1 = Nout - n0 > 16 ? tail_mask(Nout - n0 - 16) : 0;
  __m512 bias0 = _mm512_setzero_ps(), bias1 = _mm512_setzero_ps();
  if (bias) {
    bias0 = _mm512_maskz_loadu_ps(k0, bias + n0);
    bias1 = _mm512_maskz_loadu_ps(k1, bias + n0 + 16);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    __m512 v0 = _mm512_add_ps(acc0[r], bias0), v1 = _mm512_add_ps(acc1[r], bias1);
    const int64_t m = m0 + r;
    if (res_t == Elem::kF32) {
      const float* rr = static_cast<const float*>(res) + m * ldr + n0;
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, rr));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, rr + 16));
    } else if (res_t == Elem::kBF16) {
      const uint16_t* rr = static_cast<const uint16_t*>(res) + m * ldr + n0;
      v0 = _mm512_add_ps(v0, cvt_bf16_f32(_mm256_maskz_loadu_epi16(k0, rr)));
      v1 = _mm512_add_ps(v1, cvt_bf16_f32(_mm256_maskz_loadu_epi16(k1, rr + 16)));
    }
    if (c_t == Elem::kF32) {
      float* cc = static_cast<float*>(C) + m * ldc + n0;
      _mm512_mask_storeu_ps(cc, k0, v0);
      _mm512_mask_storeu_ps(cc + 16, k1, v1);
    } else {
      uint16_t* cc = static_cast<uint16_t*>(C) + m * ldc + n0;
      _mm256_mask_storeu_epi16(cc, k0, cvt_f32_bf16(v0));
      _mm256_mask_storeu_epi16(cc + 16, k1, cvt_f32_bf16(v1));
    }
  }
}

// MR rows x 32 columns over the whole K. bf16: one vdpbf16ps per (row, 16 columns, k pair).
template <int MR>
FA_TGT_BF16 static void bf16_block(int64_t K, const void* Av, int64_t lda, const void* Bpv, int64_t m0, int64_t n0,
                                   int64_t Nout, const float* bias, const void* res, Elem res_t, int64_t ldr, void* C,
                                   Elem c_t, int64_t ldc) {
  const uint16_t* A = static_cast<const uint16_t*>(Av);
  const int64_t Kp = (K + 1) / 2;
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  const fa_i32_alias* arow[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) arow[r] = reinterpret_cast<const fa_i32_alias*>(A + (m0 + r) * lda);
  const __m512i* bp = static_cast<const __m512i*>(Bpv);
  for (int64_t p = 0; p < Kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + 2 * p);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 2 * p + 1);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(arow[r][p]);
      acc0[r] = _mm512_dpbf16_ps(acc0[r], a, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], a, b1);
    }
  }
  store_tile<MR>(acc0, acc1, m0, n0, Nout, bias, res, res_t, ldr, C, c_t, ldc);
}

// fp32: one FMA per (row, 16 columns, k), A broadcast from memory.
template <int MR>
FA_TGT_AVX512 static void f32_block(int64_t K, const void* Av, int64_t lda, const void* Bpv, int64_t m0, int64_t n0,
                                    int64_t Nout, const float* bias, const void* res, Elem res_t, int64_t ldr, void* C,
                                    Elem c_t, int64_t ldc) {
  const float* A = static_cast<const float*>(Av) + m0 * lda;
  const float* bp = static_cast<const float*>(Bpv);
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_loadu_ps(bp + 32 * k);
    const __m512 b1 = _mm512_loadu_ps(bp + 32 * k + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * lda + k]);
      acc0[r] = _mm512_fmadd_ps(a, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(a, b1, acc1[r]);
    }
  }
  store_tile<MR>(acc0, acc1, m0, n0, Nout, bias, res, res_t, ldr, C, c_t, ldc);
}

using BlockFn = void (*)(int64_t, const void*, int64_t, const void*, int64_t, int64_t, int64_t, const float*,
                         const void*, Elem, int64_t, void*, Elem, int64_t);
constexpr int kMR = 12;
static const BlockFn kBf16Blocks[kMR] = {bf16_block<1>, bf16_block<2>,  bf16_block<3>,  bf16_block<4>,
                                         bf16_block<5>, bf16_block<6>,  bf16_block<7>,  bf16_block<8>,
                                         bf16_block<9>, bf16_block<10>, bf16_block<11>, bf16_block<12>};
static const BlockFn kF32Blocks[kMR] = {f32_block<1>, f32_block<2>,  f32_block<3>,  f32_block<4>,
                                        f32_block<5>, f32_block<6>,  f32_block<7>,  f32_block<8>,
                                        f32_block<9>, f32_block<10>, f32_block<11>, f32_block<12>};

static void gemm_packed(const BlockFn* blocks, int64_t panel_elems, size_t elem_size, int64_t M, int64_t Nout,
                        int64_t K, const void* A, int64_t lda, const void* Bp, const float* bias, const void* res,
                        Elem res_t, int64_t ldr, void* C, Elem c_t, int64_t ldc) {
  const int64_t panels = (Nout + 31) / 32;
  const int64_t row_blocks = (M + kMR - 1) / kMR;
  auto run = [&](int64_t rb0, int64_t rb1, int64_t p0, int64_t p1) {
    // Groups of 4 row blocks share each weight panel while it is in cache.
    for (int64_t g = rb0; g < rb1; g += 4) {
      const int64_t g1 = std::min(g + 4, rb1);
      for (int64_t p = p0; p < p1; ++p) {
        const void* panel = static_cast<const char*>(Bp) + p * panel_elems * elem_size;
        for (int64_t rb = g; rb < g1; ++rb) {
          const int64_t m0 = rb * kMR;
          const int64_t mr = std::min<int64_t>(kMR, M - m0);
          blocks[mr - 1](K, A, lda, panel, m0, p * 32, Nout, bias, res, res_t, ldr, C, c_t, ldc);
        }
      }
    }
  };
  if (row_blocks >= 2 * at::get_num_threads()) {
    at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) { run(b0, b1, 0, panels); });
  } else {
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) { run(0, row_blocks, p0, p1); });
  }
}
#endif  // FA_X86

bool pack_b_bf16(const float* B, int64_t ldb, int64_t Nout, int64_t K, uint16_t* out) {
#if FA_X86
  if (active_isa() < kAvx512Bf16) return false;
  pack_b<true>(B, ldb, Nout, K, out);
  return true;
#else
  return false;
#endif
}

bool pack_b_f32(const float* B, int64_t ldb, int64_t Nout, int64_t K, float* out) {
#if FA_X86
  if (active_isa() < kAvx512) return false;
  pack_b<false>(B, ldb, Nout, K, out);
  return true;
#else
  return false;
#endif
}

bool gemm_bf16_packed(int64_t M, int64_t Nout, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* Bp,
                      const float* bias, const void* res, Elem res_t, int64_t ldr, void* C, Elem c_t, int64_t ldc) {
#if FA_X86
  if (active_isa() < kAvx512Bf16) return false;
  if (M > 0 && Nout > 0)
    gemm_packed(kBf16Blocks, ((K + 1) / 2) * 64, sizeof(uint16_t), M, Nout, K, A, lda, Bp, bias, res, res_t, ldr, C,
                c_t, ldc);
  return true;
#else
  return false;
#endif
}

bool gemm_f32_packed(int64_t M, int64_t Nout, int64_t K, const float* A, int64_t lda, const float* Bp,
                     const float* bias, const void* res, Elem res_t, int64_t ldr, void* C, Elem c_t, int64_t ldc) {
#if FA_X86
  if (active_isa() < kAvx512) return false;
  if (M > 0 && Nout > 0)
    gemm_packed(kF32Blocks, K * 32, sizeof(float), M, Nout, K, A, lda, Bp, bias, res, res_t, ldr, C, c_t, ldc);
  return true;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fusedadapter
