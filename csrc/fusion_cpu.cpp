// The `cpu` backend: fusedadapter::fusion_cpu and fusion_cpu_backward (schema: fusion_common.h,
// semantics: fusedadapter/ops.py).
//
// Forward = GEMM1 [xd | xq] -> [zp | t] (fp32 or fp64 out), one fused epilogue pass over the rows
// (activation per segment, segmented dots, dropout, adapter mask, softmax over N, p-scaling), GEMM2 +
// residual.
// GEMMs, by dtype and row count M:
//   fp64                      ATen BLAS (at::addmm)
//   fp32, M <= small_m_max    AVX-512 weight-streaming kernel (cpu_kernels.cpp), else (fp32
//                             activations, M >= onednn_fwd_min_m: off by default) oneDNN's matmul,
//                             else the AVX-512 packed kernel (measured faster than ATen's BLAS
//                             here, as fast as oneDNN), else at::addmm
//   bf16, M >= bf16_min_m     AVX512-BF16 kernels: weights rounded to bf16 (RNE), fp32 accumulation
//                             and fp32 GEMM1 outputs (never rounded before the epilogue), the
//                             GEMM2 input p*z rounded to bf16; else the fp32 path on upcast rows
//   fp16 (and no AVX-512)     the fp32 path through at::addmm on upcast rows
// Backward: fp32/fp64, the softmax recomputed in double from GEMM1's output (the saved probs not
// reused). fusion_cpu_backward recomputes GEMM1 on the weights as the forward's GEMM1 saw them
// (bf16-rounded where the forward took the bf16 GEMMs, so the backward differentiates the forward's
// p, as the CUDA backend does); the training pair fusion_cpu_train / fusion_cpu_train_backward
// (fusedadapter/cpu_train.py: what a training call runs) keeps the forward's GEMM1 output instead.
// The gradients' products use the exact weights; epilogue backward fused in one pass, the rest ATen
// GEMMs (oneDNN's matmul in float32 from onednn_min_m rows; cpu_kernels.h Tuning has the measurements).
// oneDNN (mkldnn::_linear_pointwise, looked up once through the dispatcher; x86 torch builds with
// mkldnn, AVX-512 active, tuning().f32_gemm == kF32Onednn): on x86 torch's float32 mm goes to MKL's
// sgemm, which runs its AVX2 code on AMD CPUs, where oneDNN picks AVX-512 (1.5-2.2x per GEMM at
// H=768, R+N=392 from 16 rows, 1 thread, AMD EPYC Zen 5). Same products, float32 accumulation, a
// different summation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"
#include "fusion_common.h"
#include "fusion_host.h"

namespace fusedadapter {
namespace {

using cpu::Elem;
using cpu::F32Ops;

// ------------------------------------------------------------------------------------ helpers
template <typename T>
struct ScalarMath {
  static void act(int code, const T* in, T* out, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = act_forward<T>(code, in[i]);
  }
  static T dot(const T* a, const T* b, int64_t n) {
    T s = T(0);
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  }
};

inline uint16_t to_bf16_bits(float f) {
  const c10::BFloat16 h(f);
  return h.x;
}

// The dropout / adapter mask / softmax of one row, and its backward: fusion_common.h (row_probs,
// row_softmax_backward, shared with the CUDA kernels), run here by one thread per row. `Dropout<T>`
// is that header's DropParams with the logit_shift storage type attached.
template <typename T>
struct Dropout : DropParams {
  T shift_of(int64_t m) const { return shift_at<T, T>(m); }
};

// ------------------------------------------------------------------------------------ epilogue
// Rows [0, M): z = act(zp) per segment, logits, probs, w = [p_seg * z | p] (W = T or bf16 bits).
template <typename T, typename W>
void epilogue_forward(const SegmentInfo& seg, int64_t M, const T* zp, int64_t ldzp, const T* t, int64_t ldt,
                      T* probs, W* w, int64_t ldw, T temperature, const Dropout<T>& dr, const F32Ops* ops) {
  const int64_t R = seg.r(), N = seg.n();
  const int64_t grain = std::max<int64_t>(1, 8192 / (R + N));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    std::vector<T> z(static_cast<size_t>(R));
    std::vector<T> l(static_cast<size_t>(N));
    for (int64_t m = m0; m < m1; ++m) {
      const T* zr = zp + m * ldzp;
      const T* tr = t + m * ldt;
      for (const auto& run : seg.runs) {
        if constexpr (std::is_same_v<T, float>) {
          if (ops) {
            ops->act_span(run.code, zr + run.lo, z.data() + run.lo, run.hi - run.lo);
            continue;
          }
        }
        ScalarMath<T>::act(run.code, zr + run.lo, z.data() + run.lo, run.hi - run.lo);
      }
      for (int64_t n = 0; n < N; ++n) {
        const int64_t lo = seg.offsets[n], hi = seg.offsets[n + 1];
        T d;
        if constexpr (std::is_same_v<T, float>) {
          d = ops ? ops->dot(tr + lo, z.data() + lo, hi - lo) : ScalarMath<T>::dot(tr + lo, z.data() + lo, hi - lo);
        } else {
          d = ScalarMath<T>::dot(tr + lo, z.data() + lo, hi - lo);
        }
        l[n] = d + tr[R + n];
      }
      row_probs<SerialLanes>(l.data(), m, static_cast<int>(N), dr, dr.shift_of(m), temperature);
      T* pr = probs + m * N;
      W* wr = w + m * ldw;
      for (int64_t n = 0; n < N; ++n) {
        const T p = l[n];
        pr[n] = p;
        const int64_t lo = seg.offsets[n], hi = seg.offsets[n + 1];
        if constexpr (std::is_same_v<W, uint16_t>) {
          if (ops) {
            ops->scale_bf16(p, z.data() + lo, wr + lo, hi - lo);
          } else {
            for (int64_t j = lo; j < hi; ++j) wr[j] = to_bf16_bits(p * z[j]);
          }
          wr[R + n] = to_bf16_bits(p);
        } else {
          if constexpr (std::is_same_v<T, float>) {
            if (ops) {
              ops->scale_f32(p, z.data() + lo, wr + lo, hi - lo);
              wr[R + n] = p;
              continue;
            }
          }
          for (int64_t j = lo; j < hi; ++j) wr[j] = p * z[j];
          wr[R + n] = p;
        }
      }
    }
  });
}

// Backward epilogue (T = float or double), rows [0, M). Inputs: zp (M, R), t (M, R+N) recomputed,
// dw = grad_out @ w_out (M, R+N), gp (M, N) or null. Outputs: dzp (M, R), dt (M, R+N),
// wmix (M, R+N) or null, dshift (M) or null.
//
// Precision: z and da are computed in T, but everything per row from the logits on (the segmented
// logit and dp dot products, the softmax, dl = p (dp - sum p dp) / T, the dshift sums, p z) is in
// double, then rounded once to T. With fp32 logits the softmax backward lost the accuracy the oracle
// asks for wherever the probabilities saturate (one p_n near 1, the small p_k carrying the fp32
// error of the logit differences, dp_n - sum p dp all cancellation): over 1,200 random fp32 sites
// the fusion-weight gradients were past the docs/algorithm.md §4 bound on up to ~12% of the sites in the tail
// region (1 token, N up to 20, wide adapters at a small H), worst 16x; the double row math costs
// O(R + N) per row next to the O(H (R + N)) GEMMs (benchmarks/grad_tail.py, README Reliability).
template <typename T>
void epilogue_backward(const SegmentInfo& seg, int64_t M, const T* zp, const T* t, const T* dw, const T* gp, T* dzp,
                       T* dt, T* wmix, T* dshift, double temperature, const Dropout<T>& dr) {
  using A = double;
  const int64_t R = seg.r(), N = seg.n(), RN = R + N;
  const int64_t grain = std::max<int64_t>(1, 4096 / RN);
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    std::vector<T> z(static_cast<size_t>(R)), da(static_cast<size_t>(R));
    std::vector<A> p(static_cast<size_t>(N)), dp(static_cast<size_t>(N));
    for (int64_t m = m0; m < m1; ++m) {
      const T* zr = zp + m * R;
      const T* tr = t + m * RN;
      const T* dwr = dw + m * RN;
      for (int64_t n = 0; n < N; ++n) {
        const int code = seg.codes[n];
        A l = A(0);
        for (int64_t j = seg.offsets[n]; j < seg.offsets[n + 1]; ++j) {
          act_forward_grad<T>(code, zr[j], z[j], da[j]);
          l += A(tr[j]) * A(z[j]);
        }
        p[n] = l + A(tr[R + n]);
      }
      row_probs<SerialLanes>(p.data(), m, static_cast<int>(N), dr, A(dr.shift_of(m)), A(temperature));
      for (int64_t n = 0; n < N; ++n) {
        A acc = gp ? A(gp[m * N + n]) : A(0);
        for (int64_t j = seg.offsets[n]; j < seg.offsets[n + 1]; ++j) acc += A(dwr[j]) * A(z[j]);
        dp[n] = acc + A(dwr[R + n]);
      }
      // dp -> dl in place; dshift = sum_n dl without the cancellation of the direct sum
      const A ds = row_softmax_backward<SerialLanes>(p.data(), dp.data(), m, static_cast<int>(N), dr, A(temperature));
      if (dshift) dshift[m] = T(ds);
      T* dzr = dzp + m * R;
      T* dtr = dt + m * RN;
      T* wr = wmix ? wmix + m * RN : nullptr;
      for (int64_t n = 0; n < N; ++n) {
        const A dl = dp[n];
        const A pn = p[n];
        for (int64_t j = seg.offsets[n]; j < seg.offsets[n + 1]; ++j) {
          dtr[j] = T(dl * A(z[j]));
          dzr[j] = T((pn * A(dwr[j]) + dl * A(tr[j])) * A(da[j]));
          if (wr) wr[j] = T(pn * A(z[j]));
        }
        dtr[R + n] = T(dl);
        if (wr) wr[R + n] = T(pn);
      }
    }
  });
}

// ------------------------------------------------------------------------------------ GEMMs
// out (M, Nout, row stride ldo) = x @ w.T (+ b), through ATen BLAS.
void addmm_into(const at::Tensor& out_view, const at::Tensor& x, const at::Tensor& w, const OptTensor& b) {
  at::Tensor o = out_view;
  if (b.has_value()) {
    at::addmm_out(o, *b, x, w.t());
  } else {
    at::mm_out(o, x, w.t());
  }
}

// ------------------------------------------------------------------------------------ oneDNN GEMMs
using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                            c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);
using LinearAddFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const std::optional<at::Tensor>&, c10::string_view);
struct OneDnn {
  c10::TypedOperatorHandle<LinearFn> linear;
  c10::TypedOperatorHandle<LinearAddFn> linear_add;
};

// The op handles, or null: not x86, torch without mkldnn, or the private op missing / changed.
const OneDnn* onednn_ops() {
  static const std::optional<OneDnn> ops = []() -> std::optional<OneDnn> {
#if defined(__x86_64__) || defined(_M_X64)
    try {
      if (!at::hasMKLDNN()) return std::nullopt;
      auto& disp = c10::Dispatcher::singleton();
      auto a = disp.findOp({"mkldnn::_linear_pointwise", ""});
      auto b = disp.findOp({"mkldnn::_linear_pointwise", "binary"});
      if (!a || !b || !a->hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
          !b->hasKernelForDispatchKey(c10::DispatchKey::CPU))
        return std::nullopt;
      return OneDnn{a->typed<LinearFn>(), b->typed<LinearAddFn>()};
    } catch (const std::exception&) {  // a schema that no longer matches the signatures above
      return std::nullopt;
    }
#else
    return std::nullopt;
#endif
  }();
  return ops ? &*ops : nullptr;
}

// float32 GEMMs of M rows on oneDNN (min_m: tuning's onednn_min_m or onednn_fwd_min_m)?
bool uses_onednn(int64_t M, int64_t min_m) {
  const auto& tune = cpu::tuning();
  return tune.f32_gemm == cpu::kF32Onednn && M >= min_m && cpu::active_isa() >= cpu::kAvx512 &&
         onednn_ops() != nullptr;
}

// a @ w.T (+ b), w (Nout, K); a and w may be transposed views.
at::Tensor dnn_linear(const at::Tensor& a, const at::Tensor& w, const OptTensor& b = std::nullopt) {
  at::AutoDispatchBelowADInplaceOrView guard;  // plain products (the op has no autograd formula)
  const OptTensor bc = b.has_value() ? OptTensor(b->contiguous()) : OptTensor();
  return onednn_ops()->linear.call(a, w, bc, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt).contiguous();
}

// a @ w.T + other (oneDNN's sum post-op), other (M, Nout) contiguous.
at::Tensor dnn_linear_add(const at::Tensor& a, const at::Tensor& other, const at::Tensor& w) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return onednn_ops()->linear_add.call(a, other.contiguous(), w, std::nullopt, "add").contiguous();
}

// assemble_grads' products on oneDNN.
struct OnednnGemm {
  at::Tensor mm(const at::Tensor& a, const at::Tensor& b) const { return dnn_linear(a, b.t()); }
  void addmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) const { c = dnn_linear_add(a, c, b.t()); }
};

// The dropout scale stays the exact double 1 / (1 - p): the forward rounds it to float (as the
// kernels always did), the backward's double row math uses it as the float64 reference has it.
template <typename T>
Dropout<T> make_dropout(double dropout_p, int64_t seed, const at::Tensor& keep, const at::Tensor& shift,
                        const at::Tensor& allow) {
  Dropout<T> dr;
  dr.p = dropout_p;
  dr.allow = allow.defined() ? allow.data_ptr<bool>() : nullptr;
  if (dropout_p > 0.0) {
    dr.keep = keep.defined() ? keep.data_ptr<bool>() : nullptr;
    dr.shift = shift.defined() ? shift.data_ptr<T>() : nullptr;
    dr.key = hash_seed_key(seed);
    dr.scale = 1.0 / (1.0 - dropout_p);
  }
  return dr;
}

at::Tensor padded_even_bf16(const at::Tensor& x) {
  // The bf16 kernel reads A in k pairs: an odd K gets a zero column.
  if (x.size(1) % 2 == 0) return x.contiguous();
  auto out = at::zeros({x.size(0), x.size(1) + 1}, x.options());
  out.narrow(1, 0, x.size(1)).copy_(x);
  return out;
}

const uint16_t* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }

// Does fusion_cpu run its GEMMs in bf16 (weights rounded to bf16 per call) for these activations?
// One predicate for the forward and for the backward's GEMM1 recompute.
bool uses_bf16_gemms(at::ScalarType adt, int64_t M) {
  return adt == at::kBFloat16 && cpu::active_isa() >= cpu::kAvx512Bf16 && M >= cpu::tuning().bf16_min_m;
}

// ------------------------------------------------------------------------------------ forward
// The forward into `out` (M, H), contiguous rows: fusion_cpu allocates it, fusion_cpu_out (below)
// takes the caller's buffer (a MultiFusion writes each row group's output into its rows of one
// batch output, with no concatenation afterwards).
// gemm1_out (training, fusion_cpu_train): when given, receives GEMM1's output [zp | t] (M, 2R+N) in the
// accumulation dtype, for the backward to differentiate instead of recomputing it (as the epilogue read
// it; on the small-M kernel's rows as ATen's GEMM computes it, see there).
std::tuple<at::Tensor, at::Tensor> fusion_cpu_into(at::Tensor out, const FusionDims& d, const at::Tensor& xd,
                                                   const OptTensor& xq, const OptTensor& residual,
                                                   const at::Tensor& w_down, const OptTensor& b_down,
                                                   const at::Tensor& w_query, const OptTensor& b_query,
                                                   const at::Tensor& w_out, c10::IntArrayRef segments,
                                                   c10::IntArrayRef activations, double temperature, double dropout_p,
                                                   int64_t seed, const OptTensor& keep_mask,
                                                   const OptTensor& logit_shift, const OptTensor& adapter_mask,
                                                   at::Tensor* gemm1_out = nullptr) {
  const SegmentInfo seg(segments, activations);
  const int64_t M = d.M, R = d.R, N = d.N, H = d.H, RN = R + N;
  const auto adt = xd.scalar_type();
  const auto acc = acc_type_of(adt);
  // oneDNN: fp32 activations past the small-M kernel (GEMM2 then returns its own output tensor)
  const bool dnn = adt == at::kFloat && M > cpu::tuning().small_m_max && uses_onednn(M, cpu::tuning().onednn_fwd_min_m);
  if (!out.defined() && !dnn) out = at::empty({M, H}, xd.options());  // fusion_cpu: no buffer given
  auto probs = at::empty({M, N}, xd.options().dtype(acc));
  if (M == 0) {
    if (gemm1_out != nullptr) *gemm1_out = at::empty({0, 2 * R + N}, xd.options().dtype(acc));
    return {out, probs};
  }
  const at::Tensor keep = (dropout_p > 0.0 && keep_mask.has_value()) ? keep_mask->contiguous() : at::Tensor();
  const at::Tensor shift = (dropout_p > 0.0 && logit_shift.has_value()) ? logit_shift->contiguous() : at::Tensor();
  const at::Tensor allow = adapter_mask.has_value() ? adapter_mask->contiguous() : at::Tensor();
  const at::Tensor wd = w_down.contiguous(), wq = w_query.contiguous(), wo = w_out.contiguous();
  const OptTensor bd = b_down.has_value() ? OptTensor(b_down->contiguous()) : OptTensor();
  const OptTensor bq = b_query.has_value() ? OptTensor(b_query->contiguous()) : OptTensor();

  if (acc == at::kDouble) {
    const at::Tensor xdc = xd.contiguous();
    const at::Tensor xqc = xq.has_value() ? xq->contiguous() : xdc;
    auto buf = at::empty({M, 2 * R + N}, xd.options());
    addmm_into(buf.narrow(1, 0, R), xdc, wd, bd);
    addmm_into(buf.narrow(1, R, RN), xqc, wq, bq);
    auto w = at::empty({M, RN}, xd.options());
    const auto dr = make_dropout<double>(dropout_p, seed, keep, shift, allow);
    double* b = buf.data_ptr<double>();
    epilogue_forward<double, double>(seg, M, b, 2 * R + N, b + R, 2 * R + N, probs.data_ptr<double>(),
                                     w.data_ptr<double>(), RN, temperature, dr, nullptr);
    if (gemm1_out != nullptr) *gemm1_out = buf;
    if (residual.has_value()) {
      at::addmm_out(out, *residual, w, wo.t());
    } else {
      at::mm_out(out, w, wo.t());
    }
    return {out, probs};
  }

  const int isa = cpu::active_isa();
  const auto& tune = cpu::tuning();
  const F32Ops* ops = cpu::f32_ops();
  const auto dr = make_dropout<float>(dropout_p, seed, keep, shift, allow);
  const int64_t ldb1 = 2 * R + N;

  if (uses_bf16_gemms(adt, M)) {
    // bf16 x bf16 -> fp32 GEMMs (weights rounded to bf16 per call).
    const at::Tensor xdp = padded_even_bf16(xd);
    const at::Tensor xqp = xq.has_value() ? padded_even_bf16(*xq) : xdp;
    auto wd_p = at::empty({cpu::packed_b_bf16_elems(R, d.Kd)}, xd.options());
    auto wq_p = at::empty({cpu::packed_b_bf16_elems(RN, d.Kq)}, xd.options());
    auto wo_p = at::empty({cpu::packed_b_bf16_elems(H, RN)}, xd.options());
    auto u16 = [](at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    cpu::pack_b_bf16(wd.data_ptr<float>(), d.Kd, R, d.Kd, u16(wd_p));
    cpu::pack_b_bf16(wq.data_ptr<float>(), d.Kq, RN, d.Kq, u16(wq_p));
    cpu::pack_b_bf16(wo.data_ptr<float>(), RN, H, RN, u16(wo_p));
    auto buf = at::empty({M, ldb1}, xd.options().dtype(at::kFloat));
    float* b = buf.data_ptr<float>();
    cpu::gemm_bf16_packed(M, R, d.Kd, bf16_ptr(xdp), xdp.size(1), u16(wd_p), bd ? bd->data_ptr<float>() : nullptr,
                          nullptr, Elem::kNone, 0, b, Elem::kF32, ldb1);
    cpu::gemm_bf16_packed(M, RN, d.Kq, bf16_ptr(xqp), xqp.size(1), u16(wq_p), bq ? bq->data_ptr<float>() : nullptr,
                          nullptr, Elem::kNone, 0, b + R, Elem::kF32, ldb1);
    const int64_t ldw = RN + (RN % 2);
    auto w = at::empty({M, ldw}, xd.options());
    if (ldw != RN) w.narrow(1, RN, 1).zero_();
    epilogue_forward<float, uint16_t>(seg, M, b, ldb1, b + R, ldb1, probs.data_ptr<float>(), u16(w), ldw,
                                      static_cast<float>(temperature), dr, ops);
    if (gemm1_out != nullptr) *gemm1_out = buf;
    const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
    cpu::gemm_bf16_packed(M, H, RN, bf16_ptr(w), ldw, u16(wo_p), nullptr, res.defined() ? bf16_ptr(res) : nullptr,
                          res.defined() ? Elem::kBF16 : Elem::kNone, H, u16(out), Elem::kBF16, H);
    return {out, probs};
  }

  // fp32 compute (fp32 activations, or half activations upcast).
  enum class Gemm { kSmall, kPacked, kBlas, kOnednn };
  const Gemm kind = isa < cpu::kAvx512 ? Gemm::kBlas
                    : M <= tune.small_m_max ? Gemm::kSmall
                    : dnn ? Gemm::kOnednn
                    : tune.f32_gemm == cpu::kF32Blas ? Gemm::kBlas
                                                     : Gemm::kPacked;
  const at::Tensor xd32 = xd.to(at::kFloat).contiguous();
  const at::Tensor xq32 = xq.has_value() ? xq->to(at::kFloat).contiguous() : xd32;
  const float* bdp = bd ? bd->data_ptr<float>() : nullptr;
  const float* bqp = bq ? bq->data_ptr<float>() : nullptr;
  if (kind == Gemm::kOnednn) {
    const at::Tensor zp = dnn_linear(xd32, wd, bd), t = dnn_linear(xq32, wq, bq);
    auto w = at::empty({M, RN}, xd.options());
    epilogue_forward<float, float>(seg, M, zp.data_ptr<float>(), R, t.data_ptr<float>(), RN, probs.data_ptr<float>(),
                                   w.data_ptr<float>(), RN, static_cast<float>(temperature), dr, ops);
    if (gemm1_out != nullptr) *gemm1_out = at::cat({zp, t}, 1);
    at::Tensor o = residual.has_value() ? dnn_linear_add(w, *residual, wo) : dnn_linear(w, wo);
    if (out.defined()) {
      out.copy_(o);
    } else {
      out = o;
    }
    return {out, probs};
  }
  auto buf = at::empty({M, ldb1}, xd.options().dtype(at::kFloat));
  float* b = buf.data_ptr<float>();
  at::Tensor wo_p;
  if (kind == Gemm::kSmall) {
    cpu::gemm_small_f32(M, R, d.Kd, xd32.data_ptr<float>(), d.Kd, wd.data_ptr<float>(), d.Kd, bdp, nullptr,
                        Elem::kNone, 0, b, Elem::kF32, ldb1);
    cpu::gemm_small_f32(M, RN, d.Kq, xq32.data_ptr<float>(), d.Kq, wq.data_ptr<float>(), d.Kq, bqp, nullptr,
                        Elem::kNone, 0, b + R, Elem::kF32, ldb1);
  } else if (kind == Gemm::kPacked) {
    const auto fopts = xd.options().dtype(at::kFloat);
    auto wd_p = at::empty({cpu::packed_b_f32_elems(R, d.Kd)}, fopts);
    auto wq_p = at::empty({cpu::packed_b_f32_elems(RN, d.Kq)}, fopts);
    wo_p = at::empty({cpu::packed_b_f32_elems(H, RN)}, fopts);
    cpu::pack_b_f32(wd.data_ptr<float>(), d.Kd, R, d.Kd, wd_p.data_ptr<float>());
    cpu::pack_b_f32(wq.data_ptr<float>(), d.Kq, RN, d.Kq, wq_p.data_ptr<float>());
    cpu::pack_b_f32(wo.data_ptr<float>(), RN, H, RN, wo_p.data_ptr<float>());
    cpu::gemm_f32_packed(M, R, d.Kd, xd32.data_ptr<float>(), d.Kd, wd_p.data_ptr<float>(), bdp, nullptr, Elem::kNone, 0,
                         b, Elem::kF32, ldb1);
    cpu::gemm_f32_packed(M, RN, d.Kq, xq32.data_ptr<float>(), d.Kq, wq_p.data_ptr<float>(), bqp, nullptr,
                         Elem::kNone, 0, b + R, Elem::kF32, ldb1);
  } else {
    addmm_into(buf.narrow(1, 0, R), xd32, wd, bd);
    addmm_into(buf.narrow(1, R, RN), xq32, wq, bq);
  }
  auto w = at::empty({M, RN}, xd.options().dtype(at::kFloat));
  epilogue_forward<float, float>(seg, M, b, ldb1, b + R, ldb1, probs.data_ptr<float>(), w.data_ptr<float>(), RN,
                                 static_cast<float>(temperature), dr, ops);
  if (gemm1_out != nullptr && kind == Gemm::kSmall) {
    // On the small-M kernel's rows the backward gets GEMM1 as ATen's GEMM computes it, as the
    // recomputing backward had it: the small kernel's own rounding put a site of
    // tests/test_native.py's fp32 tail (H=17, N=20, one token) at 1.17x the §4 bound, where ATen's
    // coincides with the reference's own F.linear; oneDNN's (at 16 rows ~100 us less per call at
    // H=768, N=8, r=48) put one site of train_fold_precision's 275 over the bound that ATen's hold.
    auto g = at::empty({M, ldb1}, xd.options().dtype(at::kFloat));
    addmm_into(g.narrow(1, 0, R), xd32, wd, bd);
    addmm_into(g.narrow(1, R, RN), xq32, wq, bq);
    *gemm1_out = g;
  } else if (gemm1_out != nullptr) {
    *gemm1_out = buf;
  }
  const bool direct_out = adt == at::kFloat || adt == at::kBFloat16;  // the kernels store float or bf16
  if (kind != Gemm::kBlas && direct_out) {
    const at::Tensor res = residual.has_value() ? residual->contiguous() : at::Tensor();
    const Elem et = adt == at::kFloat ? Elem::kF32 : Elem::kBF16;
    const void* rp = res.defined() ? res.data_ptr() : nullptr;
    const Elem rt = res.defined() ? et : Elem::kNone;
    if (kind == Gemm::kSmall) {
      cpu::gemm_small_f32(M, H, RN, w.data_ptr<float>(), RN, wo.data_ptr<float>(), RN, nullptr, rp, rt, H,
                          out.data_ptr(), et, H);
    } else {
      cpu::gemm_f32_packed(M, H, RN, w.data_ptr<float>(), RN, wo_p.data_ptr<float>(), nullptr, rp, rt, H,
                           out.data_ptr(), et, H);
    }
    return {out, probs};
  }
  if (adt == at::kFloat) {
    if (residual.has_value()) {
      at::addmm_out(out, *residual, w, wo.t());
    } else {
      at::mm_out(out, w, wo.t());
    }
  } else {
    at::Tensor o32 = residual.has_value() ? at::addmm(residual->to(at::kFloat), w, wo.t()) : at::mm(w, wo.t());
    out.copy_(o32);
  }
  return {out, probs};
}

std::tuple<at::Tensor, at::Tensor> fusion_cpu(const at::Tensor& xd, const OptTensor& xq, const OptTensor& residual,
                                              const at::Tensor& w_down, const OptTensor& b_down,
                                              const at::Tensor& w_query, const OptTensor& b_query,
                                              const at::Tensor& w_out, c10::IntArrayRef segments,
                                              c10::IntArrayRef activations, double temperature, double dropout_p,
                                              int64_t seed, const OptTensor& keep_mask, const OptTensor& logit_shift,
                                              const OptTensor& adapter_mask) {
  const FusionDims d = check_fusion_args("fusion_cpu", c10::DeviceType::CPU, xd, xq, residual, w_down, b_down, w_query,
                                         b_query, w_out, segments, activations, temperature, dropout_p, keep_mask,
                                         logit_shift, adapter_mask);
  return fusion_cpu_into(at::Tensor(), d, xd, xq, residual, w_down, b_down, w_query, b_query,
                         w_out, segments, activations, temperature, dropout_p, seed, keep_mask, logit_shift,
                         adapter_mask);
}

// fusion_cpu writing its output into `out` (M, H), the activations' dtype, contiguous (e.g. a run of
// rows of a larger contiguous tensor); returns the probabilities. No autograd formula (inference).
at::Tensor fusion_cpu_out(const at::Tensor& out, const at::Tensor& xd, const OptTensor& xq, const OptTensor& residual,
                          const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_query,
                          const OptTensor& b_query, const at::Tensor& w_out, c10::IntArrayRef segments,
                          c10::IntArrayRef activations, double temperature, double dropout_p, int64_t seed,
                          const OptTensor& keep_mask, const OptTensor& logit_shift, const OptTensor& adapter_mask) {
  const FusionDims d = check_fusion_args("fusion_cpu_out", c10::DeviceType::CPU, xd, xq, residual, w_down, b_down,
                                         w_query, b_query, w_out, segments, activations, temperature, dropout_p,
                                         keep_mask, logit_shift, adapter_mask);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == xd.scalar_type() && out.dim() == 2 &&
                  out.size(0) == d.M && out.size(1) == d.H && out.is_contiguous(),
              "fusion_cpu_out: out must be a contiguous CPU (", d.M, ", ", d.H, ") tensor of ", xd.scalar_type(),
              ", got ", out.scalar_type(), " ", out.sizes(), out.is_contiguous() ? "" : " (not contiguous)");
  return std::get<1>(fusion_cpu_into(out, d, xd, xq, residual, w_down, b_down, w_query, b_query, w_out, segments,
                                     activations, temperature, dropout_p, seed, keep_mask, logit_shift, adapter_mask));
}

// ------------------------------------------------------------------------------------ backward
// The backward, from GEMM1's forward output `gemm1` ([zp | t], fusion_cpu_train) or, without it
// (fusion_cpu_backward), from GEMM1 recomputed.
Grads backward_impl(const char* op, const at::Tensor& grad_out, const OptTensor& grad_probs, const at::Tensor& probs,
                    const at::Tensor& xd, const OptTensor& xq, const at::Tensor& w_down, const OptTensor& b_down,
                    const at::Tensor& w_query, const OptTensor& b_query, const at::Tensor& w_out,
                    c10::IntArrayRef segments, c10::IntArrayRef activations, double temperature, double dropout_p,
                    int64_t seed, const OptTensor& keep_mask, const OptTensor& logit_shift,
                    const c10::List<bool>& needs_list, const OptTensor& adapter_mask, const OptTensor& gemm1) {
  const FusionDims d = check_fusion_args(op, c10::DeviceType::CPU, xd, xq, std::nullopt, w_down, b_down, w_query,
                                         b_query, w_out, segments, activations, temperature, dropout_p, keep_mask,
                                         logit_shift, adapter_mask);
  const auto needs = check_backward_args(op, d, grad_out, grad_probs, needs_list);
  const int64_t M = d.M, R = d.R, N = d.N, RN = R + N;
  const auto acc = acc_type_of(xd.scalar_type());
  const bool dnn = acc == at::kFloat && uses_onednn(M, cpu::tuning().onednn_min_m);
  (void)probs;  // recomputed from GEMM1's output in double, see the file comment
  const bool saved = gemm1.has_value();
  if (saved) {
    TORCH_CHECK_VALUE(gemm1->dim() == 2 && gemm1->size(0) == M && gemm1->size(1) == 2 * R + N &&
                          gemm1->scalar_type() == acc && gemm1->device().is_cpu(),
                      op, ": gemm1 must be the forward's (", M, ", ", 2 * R + N, ") ", acc, " GEMM1 output, got ",
                      shape_str(*gemm1), " ", gemm1->scalar_type());
  }
  const SegmentInfo seg(segments, activations);
  const auto opts = xd.options().dtype(acc);
  const at::Tensor xdc = xd.to(acc).contiguous();
  const at::Tensor xqc = xq.has_value() ? xq->to(acc).contiguous() : xdc;
  const at::Tensor wd = w_down.contiguous(), wq = w_query.contiguous(), wo = w_out.contiguous();
  const bool fresh = dnn && M > 0 && !saved;  // dnn_linear returns its own tensors
  auto zp = saved ? gemm1->narrow(1, 0, R).contiguous() : fresh ? at::Tensor() : at::empty({M, R}, opts);
  auto t = saved ? gemm1->narrow(1, R, RN).contiguous() : fresh ? at::Tensor() : at::empty({M, RN}, opts);
  auto dzp = at::empty({M, R}, opts);
  auto dt = at::empty({M, RN}, opts);
  at::Tensor go = grad_out.to(acc).contiguous();
  at::Tensor dw = dnn && M > 0 ? at::Tensor() : at::empty({M, RN}, opts);
  at::Tensor wmix = needs[kGradWOut] ? at::empty({M, RN}, opts) : at::Tensor();
  at::Tensor dshift = (needs[kGradLogitShift] && logit_shift.has_value()) ? at::empty({M}, opts) : at::Tensor();
  const at::Tensor gp = grad_probs.has_value() ? grad_probs->to(acc).contiguous() : at::Tensor();
  const at::Tensor keep = (dropout_p > 0.0 && keep_mask.has_value()) ? keep_mask->contiguous() : at::Tensor();
  const at::Tensor shift = (dropout_p > 0.0 && logit_shift.has_value()) ? logit_shift->contiguous() : at::Tensor();
  const at::Tensor allow = adapter_mask.has_value() ? adapter_mask->contiguous() : at::Tensor();
  if (M > 0) {
    if (!saved) {
      // GEMM1 on the weights the forward's GEMM1 used: rounded to bf16 (RNE, as pack_b_bf16) on the
      // bf16 path, so the recomputed p is the forward's; the gradients' own products use the exact ones.
      const bool rounded = uses_bf16_gemms(xd.scalar_type(), M);
      const at::Tensor wd1 = rounded ? wd.to(at::kBFloat16).to(acc) : wd;
      const at::Tensor wq1 = rounded ? wq.to(at::kBFloat16).to(acc) : wq;
      if (dnn) {
        zp = dnn_linear(xdc, wd1, b_down);
        t = dnn_linear(xqc, wq1, b_query);
      } else {
        addmm_into(zp, xdc, wd1, b_down);
        addmm_into(t, xqc, wq1, b_query);
      }
    }
    if (dnn) {
      dw = dnn_linear(go, wo.t());
    } else {
      at::mm_out(dw, go, wo);
    }
    AT_DISPATCH_FLOATING_TYPES(acc, "fusion_cpu_backward", [&] {
      const auto dr = make_dropout<scalar_t>(dropout_p, seed, keep, shift, allow);
      epilogue_backward<scalar_t>(seg, M, zp.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                                  gp.defined() ? gp.data_ptr<scalar_t>() : nullptr, dzp.data_ptr<scalar_t>(),
                                  dt.data_ptr<scalar_t>(), wmix.defined() ? wmix.data_ptr<scalar_t>() : nullptr,
                                  dshift.defined() ? dshift.data_ptr<scalar_t>() : nullptr,
                                  temperature, dr);
    });
  } else {
    zp.zero_(), t.zero_(), dzp.zero_(), dt.zero_();
    if (wmix.defined()) wmix.zero_();
  }
  if (dnn) {
    return assemble_grads(needs, grad_out, go, xd, xq, xdc, xqc, wd, b_down, wq, b_query, logit_shift, dzp, dt, wmix,
                          dshift, OnednnGemm());
  }
  return assemble_grads(needs, grad_out, go, xd, xq, xdc, xqc, wd, b_down, wq, b_query, logit_shift, dzp, dt, wmix,
                        dshift);
}

Grads fusion_cpu_backward(const at::Tensor& grad_out, const OptTensor& grad_probs, const at::Tensor& probs,
                          const at::Tensor& xd, const OptTensor& xq, const at::Tensor& w_down, const OptTensor& b_down,
                          const at::Tensor& w_query, const OptTensor& b_query, const at::Tensor& w_out,
                          c10::IntArrayRef segments, c10::IntArrayRef activations, double temperature,
                          double dropout_p, int64_t seed, const OptTensor& keep_mask, const OptTensor& logit_shift,
                          c10::List<bool> needs_list, const OptTensor& adapter_mask) {
  return backward_impl("fusion_cpu_backward", grad_out, grad_probs, probs, xd, xq, w_down, b_down, w_query, b_query,
                       w_out, segments, activations, temperature, dropout_p, seed, keep_mask, logit_shift, needs_list,
                       adapter_mask, std::nullopt);
}

// The training pair (fusedadapter/cpu_train.py): the forward also returns GEMM1's output, which the
// backward differentiates instead of recomputing GEMM1 (M x H x (2R+N) multiply-adds, ~1/4 of the
// backward's arithmetic), at M x (2R+N) accumulation-dtype elements saved.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fusion_cpu_train(
    const at::Tensor& xd, const OptTensor& xq, const OptTensor& residual, const at::Tensor& w_down,
    const OptTensor& b_down, const at::Tensor& w_query, const OptTensor& b_query, const at::Tensor& w_out,
    c10::IntArrayRef segments, c10::IntArrayRef activations, double temperature, double dropout_p, int64_t seed,
    const OptTensor& keep_mask, const OptTensor& logit_shift, const OptTensor& adapter_mask) {
  const FusionDims d = check_fusion_args("fusion_cpu_train", c10::DeviceType::CPU, xd, xq, residual, w_down, b_down,
                                         w_query, b_query, w_out, segments, activations, temperature, dropout_p,
                                         keep_mask, logit_shift, adapter_mask);
  at::Tensor gemm1;
  auto [out, probs] = fusion_cpu_into(at::Tensor(), d, xd, xq, residual, w_down, b_down, w_query, b_query, w_out,
                                      segments, activations, temperature, dropout_p, seed, keep_mask, logit_shift,
                                      adapter_mask, &gemm1);
  return {out, probs, gemm1};
}

Grads fusion_cpu_train_backward(const at::Tensor& grad_out, const OptTensor& grad_probs, const at::Tensor& probs,
                                const at::Tensor& gemm1, const at::Tensor& xd, const OptTensor& xq,
                                const at::Tensor& w_down, const OptTensor& b_down, const at::Tensor& w_query,
                                const OptTensor& b_query, const at::Tensor& w_out, c10::IntArrayRef segments,
                                c10::IntArrayRef activations, double temperature, double dropout_p, int64_t seed,
                                const OptTensor& keep_mask, const OptTensor& logit_shift, c10::List<bool> needs_list,
                                const OptTensor& adapter_mask) {
  return backward_impl("fusion_cpu_train_backward", grad_out, grad_probs, probs, xd, xq, w_down, b_down, w_query,
                       b_query, w_out, segments, activations, temperature, dropout_p, seed, keep_mask, logit_shift,
                       needs_list, adapter_mask, gemm1);
}

// Test and tuning hook: cap the instruction set (0 generic, 1 AVX-512, 2 AVX512-BF16; -1: back to
// FUSEDADAPTER_CPU_ISA; -2: unchanged), the GEMM row thresholds and the fp32 GEMM switch f32_gemm
// (0 packed kernel, 1 ATen BLAS, 2 oneDNN from onednn_min_m rows backward, onednn_fwd_min_m rows
// forward; -1: unchanged; -3: back to FUSEDADAPTER_CPU_ONEDNN's default). Returns [detected isa,
// active isa, small_m_max, bf16_min_m, SLEEF vector math available, f32_gemm, onednn_min_m, oneDNN
// op available, onednn_fwd_min_m].
std::vector<int64_t> cpu_config(int64_t isa, int64_t small_m_max, int64_t bf16_min_m, int64_t f32_gemm,
                                int64_t onednn_min_m, int64_t onednn_fwd_min_m) {
  auto& tune = cpu::tuning();
  if (isa != -2) cpu::set_isa_cap(static_cast<int>(isa));
  if (small_m_max >= 0) tune.small_m_max = small_m_max;
  if (bf16_min_m >= 0) tune.bf16_min_m = bf16_min_m;
  if (f32_gemm >= 0) tune.f32_gemm = static_cast<int>(std::min<int64_t>(f32_gemm, cpu::kF32Onednn));
  if (f32_gemm == -3) tune.f32_gemm = cpu::env_f32_gemm();
  if (onednn_min_m >= 0) tune.onednn_min_m = onednn_min_m;
  if (onednn_fwd_min_m >= 0) tune.onednn_fwd_min_m = onednn_fwd_min_m;
  return {cpu::detected_isa(), cpu::active_isa(), tune.small_m_max, tune.bf16_min_m,
          cpu::f32_ops() != nullptr ? 1 : 0, tune.f32_gemm, tune.onednn_min_m, onednn_ops() != nullptr ? 1 : 0,
          tune.onednn_fwd_min_m};
}

}  // namespace
}  // namespace fusedadapter

TORCH_LIBRARY_FRAGMENT(fusedadapter, m) {
  m.def("fusion_cpu" FA_FUSION_SCHEMA_ARGS);
  m.def("fusion_cpu_backward" FA_FUSION_BACKWARD_SCHEMA_ARGS);
  // The training pair: the forward's schema returning GEMM1's output too; the backward's with it
  // after probs (fakes and the autograd function: fusedadapter/cpu_train.py).
  m.def("fusion_cpu_train" FA_FUSION_ARGS " -> (Tensor, Tensor, Tensor)");
  m.def("fusion_cpu_train_backward(Tensor grad_out, Tensor? grad_probs, Tensor probs, Tensor gemm1, Tensor xd, "
        "Tensor? xq, Tensor w_down, Tensor? b_down, Tensor w_query, Tensor? b_query, Tensor w_out, int[] segments, "
        "int[] activations, float temperature, float dropout_p, int seed, Tensor? keep_mask, Tensor? logit_shift, "
        "bool[] needs, Tensor? adapter_mask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("fusion_cpu_out(Tensor(a!) out, Tensor xd, Tensor? xq, Tensor? residual, Tensor w_down, Tensor? b_down, "
        "Tensor w_query, Tensor? b_query, Tensor w_out, int[] segments, int[] activations, float temperature=1.0, "
        "float dropout_p=0.0, int seed=0, Tensor? keep_mask=None, Tensor? logit_shift=None, "
        "Tensor? adapter_mask=None) -> Tensor");
  m.def("_cpu_config(int isa=-2, int small_m_max=-1, int bf16_min_m=-1, int f32_gemm=-1, int onednn_min_m=-1, "
        "int onednn_fwd_min_m=-1) -> int[]",
        &fusedadapter::cpu_config);
}

TORCH_LIBRARY_IMPL(fusedadapter, CPU, m) {
  m.impl("fusion_cpu", &fusedadapter::fusion_cpu);
  m.impl("fusion_cpu_backward", &fusedadapter::fusion_cpu_backward);
  m.impl("fusion_cpu_train", &fusedadapter::fusion_cpu_train);
  m.impl("fusion_cpu_train_backward", &fusedadapter::fusion_cpu_train_backward);
  m.impl("fusion_cpu_out", &fusedadapter::fusion_cpu_out);
}
