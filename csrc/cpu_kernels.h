// Raw-pointer CPU kernels behind the `cpu` backend (fusion_cpu.cpp).
//
// x86-64 kernels are compiled with per-function target attributes (AVX-512F, AVX512-BF16) and
// chosen at run time, so the extension needs no -march flag and runs on any x86-64 CPU (the
// generic paths use ATen's BLAS instead). Nothing here allocates or throws.
#pragma once

#include <cstdint>

namespace fusedadapter {
namespace cpu {

// Instruction-set levels, in order. The active level is min(detected, cap); the cap comes from
// FUSEDADAPTER_CPU_ISA at load time or `fusedadapter::_cpu_config` (tests).
enum Isa : int { kGeneric = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

int detected_isa();
int active_isa();
void set_isa_cap(int cap);

// Tuning: the fp32 small-M GEMM runs up to `small_m_max` rows; the bf16 GEMMs from `bf16_min_m`
// rows (fewer rows take the fp32 path on upcast activations: packing the weights costs more).
// fp32 GEMMs beyond small_m_max (forward) and the backward's fp32 products: `f32_gemm` picks the
// packed kernel, ATen BLAS, or oneDNN's matmul (mkldnn::_linear_pointwise, x86 torch builds with
// mkldnn only): the backward's products from `onednn_min_m` rows (fewer: ATen), the forward's GEMMs
// (fp32 activations) from `onednn_fwd_min_m` rows (fewer: the packed kernel). Default kF32Onednn
// (where the op and AVX-512 exist; else the packed kernel and ATen); FUSEDADAPTER_CPU_ONEDNN=0 at
// load time makes it kF32Packed (ATen's products). Precision, train_fold_precision over 440 sites
// (benchmarks/results/cpu-amd-epyc-avx512-2core/train-precision-default/; saturated sites apart):
// with the training pair (GEMM1's output saved, fusion_cpu_train) oneDNN's products and ATen's put
// the same sites over the §4 bound (8 of 275 fp32, 0 bf16, as shipped; the ratios differ on 45
// sites, none crosses), and 1.03x-1.05x the torch backend's training speed where ATen's give
// 0.85x-0.97x. (It was off by default while a count that included saturated sites, whose float64
// truth is not accurate, had 3 cells more.)
// Measured on an AMD EPYC Zen 5 (1 thread, H=768, R+N=392, one op call forward + backward, oneDNN
// vs ATen): 0.59x at 8 rows, 1.22x at 16, 1.4-1.55x from 17 to 1024. The forward's packed kernel
// is as fast as oneDNN there (0.88-1.06x at 32-4096 rows, GEMM1, GEMM2 or both on oneDNN), so the
// forward keeps it (onednn_fwd_min_m: never; tests and other CPUs can lower it).
enum F32Gemm : int { kF32Packed = 0, kF32Blas = 1, kF32Onednn = 2 };
struct Tuning {
  int64_t small_m_max = 16;
  int64_t bf16_min_m = 16;
  int f32_gemm = kF32Packed;
  int64_t onednn_min_m = 16;
  int64_t onednn_fwd_min_m = int64_t(1) << 62;
};
// The default f32_gemm: FUSEDADAPTER_CPU_ONEDNN ("0", "off", "no", "false": kF32Packed; unset, "1",
// "on", "yes", "true": kF32Onednn; anything else warns and keeps kF32Onednn).
int env_f32_gemm();
Tuning& tuning();

// Vectorised math used by the epilogue (AVX-512 when active, else nullptr: use the scalar code).
// act_span: out[i] = act(code, in[i]); dot: sum a[i] b[i]; axpy-like scale: out[i] = p * z[i].
struct F32Ops {
  void (*act_span)(int code, const float* in, float* out, int64_t n);
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*scale_f32)(float p, const float* z, float* out, int64_t n);
  void (*scale_bf16)(float p, const float* z, uint16_t* out, int64_t n);  // RNE to bf16
};
// nullptr when the active ISA has no vector implementation.
const F32Ops* f32_ops();

// ------------------------------------------------------------------ fp32 small-M GEMM (AVX-512)
// C[m, n] = sum_k A[m, k] B[n, k] (+ bias[n]) (+ res[m, n]) for m < M, n < Nout: a weight-streaming
// kernel for few rows (each weight row read once per 8 rows of A), B row-major (Nout, K) as
// torch's Linear weights are. Residual and output are float or bf16 (uint16 bits).
// Returns false (and does nothing) when the AVX-512 kernel is not active.
enum class Elem : int { kNone = 0, kF32 = 1, kBF16 = 2 };
bool gemm_small_f32(int64_t M, int64_t Nout, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    const float* bias, const void* res, Elem res_t, int64_t ldr, void* C, Elem c_t, int64_t ldc);

// ------------------------------------------------------------------ bf16 GEMM (AVX512-BF16)
// B (Nout, K) float rows rounded to bf16 (RNE) and packed into panels of 32 columns, k in pairs
// (the vdpbf16ps layout). K is rounded up to even (zero pad); Nout to a multiple of 32.
int64_t packed_b_bf16_elems(int64_t Nout, int64_t K);
bool pack_b_bf16(const float* B, int64_t ldb, int64_t Nout, int64_t K, uint16_t* out);
// C[m, n] = sum_k A[m, k] Bp[k, n] (+ bias[n]) (+ res[m, n]), fp32 accumulation. A bf16 (M, K)
// with lda >= K rounded up to even and, for odd K, a zero in column K. Output float or bf16.
bool gemm_bf16_packed(int64_t M, int64_t Nout, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* Bp,
                      const float* bias, const void* res, Elem res_t, int64_t ldr, void* C, Elem c_t, int64_t ldc);

// ------------------------------------------------------------------ fp32 packed GEMM (AVX-512)
// The same blocking in fp32 (panels [k][32]) for many rows, where ATen's BLAS was measured slower.
int64_t packed_b_f32_elems(int64_t Nout, int64_t K);
bool pack_b_f32(const float* B, int64_t ldb, int64_t Nout, int64_t K, float* out);
bool gemm_f32_packed(int64_t M, int64_t Nout, int64_t K, const float* A, int64_t lda, const float* Bp,
                     const float* bias, const void* res, Elem res_t, int64_t ldr, void* C, Elem c_t, int64_t ldc);

}  // namespace cpu
}  // namespace fusedadapter
