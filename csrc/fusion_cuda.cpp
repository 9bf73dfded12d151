// The `cuda` backend: fusedadapter::fusion_cuda and fusion_cuda_backward (schema: fusion_common.h,
// semantics: fusedadapter/ops.py).
//
// Forward: GEMM1 in cuBLAS through ATen, with fp32 (fp64) outputs even for fp16/bf16 activations
// (at::mm's out_dtype form: half inputs, the folded weights rounded to the activation dtype for the
// tensor cores, fp32 accumulation and fp32 results: GEMM1's outputs are never rounded to half
// before the epilogue). w_query, which makes the unscaled logits, is not rounded to one half tile
// but split hi + lo (two GEMMs into one fp32 result), as the Triton kernels do (kernels/fusion.py
// SPLIT_WEIGHTS_QUERY): rounded, the fp16 probabilities were 1.35x over the docs/algorithm.md §4 bound there.
// The epilogue kernel writes probs and w = [p*z | p] in the activation dtype; GEMM2 + residual in
// cuBLAS (fp32 accumulation). Backward: GEMM1 recomputed exactly as the forward ran it (same
// operands, same rounded/split weights, same kernel, same order of the row sums), so it sees the
// forward's p; the rest in the accumulation dtype with the exact weights, one epilogue kernel,
// ATen GEMMs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>

#include "fusion_common.h"
#include "fusion_cuda.h"
#include "fusion_host.h"

namespace fusedadapter {
namespace {

cuda::SegParams make_seg(c10::IntArrayRef segments, c10::IntArrayRef activations, const char* op) {
  const int64_t n = static_cast<int64_t>(activations.size());
  TORCH_CHECK_VALUE(n <= cuda::kMaxAdapters, op, ": at most ", cuda::kMaxAdapters, " adapters, got ", n);
  TORCH_CHECK_VALUE(segments.back() < (int64_t{1} << 31), op, ": bottleneck too large");
  cuda::SegParams s{};
  s.n = static_cast<int>(n);
  s.r = static_cast<int>(segments.back());
  for (int64_t k = 0; k <= n; ++k) s.offsets[k] = static_cast<int>(segments[k]);
  for (int64_t k = 0; k < n; ++k) s.codes[k] = static_cast<int>(activations[k]);
  return s;
}

cuda::DropParams make_drop(double dropout_p, int64_t seed, const at::Tensor& keep, const at::Tensor& shift,
                           const at::Tensor& allow) {
  cuda::DropParams d{};
  d.allow = allow.defined() ? allow.data_ptr<bool>() : nullptr;
  d.p = dropout_p;
  d.scale = dropout_p > 0.0 ? 1.0 / (1.0 - dropout_p) : 1.0;
  d.key = hash_seed_key(seed);
  d.keep = keep.defined() ? keep.data_ptr<bool>() : nullptr;
  d.shift = shift.defined() ? shift.data_ptr() : nullptr;
  return d;
}

// x @ w.T with the result in `acc`: half/bf16 x (weights rounded to x's dtype) -> fp32 via cuBLAS.
at::Tensor gemm_acc(const at::Tensor& x, const at::Tensor& w, at::ScalarType acc) {
  if (x.scalar_type() == acc) return at::mm(x, w.t());
  return at::mm(x, w.to(x.scalar_type()).t(), acc);
}

// x @ w.T with w split into hi = half(w) and lo = half(w - hi): w keeps ~22 of fp32's 24 mantissa
// bits (x is exact in its half dtype), at twice GEMM1's query FLOPs.
at::Tensor gemm_acc_split(const at::Tensor& x, const at::Tensor& w, at::ScalarType acc) {
  const at::Tensor hi = w.to(x.scalar_type());
  const at::Tensor lo = (w - hi.to(w.scalar_type())).to(x.scalar_type());
  at::Tensor out = at::mm(x, hi.t(), acc);
  out.add_(at::mm(x, lo.t(), acc));
  return out;
}

// Is w_query hi/lo split for activations of dtype `adt`? fp16 always; bf16 unless
// FUSEDADAPTER_CUDA_SPLIT_BF16=0 (the Triton kernels' FUSEDADAPTER_TRITON_SPLIT_BF16 twin: the
// split at bf16 is unmeasured on a GPU, the device check can time both).
bool split_query(at::ScalarType adt) {
  if (adt == at::kHalf) return true;
  if (adt != at::kBFloat16) return false;
  const char* v = std::getenv("FUSEDADAPTER_CUDA_SPLIT_BF16");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

// GEMM1 without bias, results in `acc`: zp = xd @ w_down.T, t = xq @ w_query.T. The forward and the
// backward both call this with the activations in their own dtype, so the backward recomputes the
// forward's GEMM1 outputs (and, through the same epilogue row code, its p) instead of a p from
// unrounded weights.
std::pair<at::Tensor, at::Tensor> gemm1(const at::Tensor& xd, const at::Tensor& xq, const at::Tensor& w_down,
                                        const at::Tensor& w_query, at::ScalarType acc) {
  at::Tensor zp = gemm_acc(xd, w_down, acc);
  at::Tensor t = split_query(xq.scalar_type()) ? gemm_acc_split(xq, w_query, acc) : gemm_acc(xq, w_query, acc);
  return {std::move(zp), std::move(t)};
}

std::tuple<at::Tensor, at::Tensor> fusion_cuda(const at::Tensor& xd, const OptTensor& xq, const OptTensor& residual,
                                               const at::Tensor& w_down, const OptTensor& b_down,
                                               const at::Tensor& w_query, const OptTensor& b_query,
                                               const at::Tensor& w_out, c10::IntArrayRef segments,
                                               c10::IntArrayRef activations, double temperature, double dropout_p,
                                               int64_t seed, const OptTensor& keep_mask,
                                               const OptTensor& logit_shift, const OptTensor& adapter_mask) {
  const FusionDims d = check_fusion_args("fusion_cuda", c10::DeviceType::CUDA, xd, xq, residual, w_down, b_down,
                                         w_query, b_query, w_out, segments, activations, temperature, dropout_p,
                                         keep_mask, logit_shift, adapter_mask);
  const c10::cuda::CUDAGuard guard(xd.device());
  const auto seg = make_seg(segments, activations, "fusion_cuda");
  const auto adt = xd.scalar_type();
  const auto acc = acc_type_of(adt);
  const int64_t M = d.M, N = d.N, RN = d.R + d.N;
  auto probs = at::empty({M, N}, xd.options().dtype(acc));
  if (M == 0) return {at::empty({0, d.H}, xd.options()), probs};
  const at::Tensor xdc = xd.contiguous();
  const at::Tensor xqc = xq.has_value() ? xq->contiguous() : xdc;
  const auto [zp, t] = gemm1(xdc, xqc, w_down, w_query, acc);
  const at::Tensor keep = (dropout_p > 0.0 && keep_mask.has_value()) ? keep_mask->contiguous() : at::Tensor();
  const at::Tensor shift = (dropout_p > 0.0 && logit_shift.has_value()) ? logit_shift->contiguous() : at::Tensor();
  const at::Tensor allow = adapter_mask.has_value() ? adapter_mask->contiguous() : at::Tensor();
  const OptTensor bd = b_down.has_value() ? OptTensor(b_down->contiguous()) : OptTensor();
  const OptTensor bq = b_query.has_value() ? OptTensor(b_query->contiguous()) : OptTensor();
  auto w = at::empty({M, RN}, xd.options());
  cuda::forward_epilogue(zp, t, bd, bq, probs, w, seg, temperature, make_drop(dropout_p, seed, keep, shift, allow));
  const at::Tensor wo = w_out.scalar_type() == adt ? w_out : w_out.to(adt);
  at::Tensor out = residual.has_value() ? at::addmm(*residual, w, wo.t()) : at::mm(w, wo.t());
  return {out, probs};
}

Grads fusion_cuda_backward(const at::Tensor& grad_out, const OptTensor& grad_probs, const at::Tensor& probs,
                           const at::Tensor& xd, const OptTensor& xq, const at::Tensor& w_down,
                           const OptTensor& b_down, const at::Tensor& w_query, const OptTensor& b_query,
                           const at::Tensor& w_out, c10::IntArrayRef segments, c10::IntArrayRef activations,
                           double temperature, double dropout_p, int64_t seed, const OptTensor& keep_mask,
                           const OptTensor& logit_shift, c10::List<bool> needs_list,
                           const OptTensor& adapter_mask) {
  const FusionDims d = check_fusion_args("fusion_cuda_backward", c10::DeviceType::CUDA, xd, xq, std::nullopt, w_down,
                                         b_down, w_query, b_query, w_out, segments, activations, temperature,
                                         dropout_p, keep_mask, logit_shift, adapter_mask);
  const auto needs = check_backward_args("fusion_cuda_backward", d, grad_out, grad_probs, needs_list);
  const int64_t M = d.M, R = d.R, RN = d.R + d.N;
  (void)probs;  // recomputed, as the forward computed it (gemm1 and the same epilogue row code)
  const c10::cuda::CUDAGuard guard(xd.device());
  const auto seg = make_seg(segments, activations, "fusion_cuda_backward");
  const auto acc = acc_type_of(xd.scalar_type());
  const auto opts = xd.options().dtype(acc);
  const at::Tensor xdc = xd.to(acc).contiguous();
  const at::Tensor xqc = xq.has_value() ? xq->to(acc).contiguous() : xdc;
  // GEMM1 as the forward ran it (activation dtype, rounded/split weights), not from xdc.
  const at::Tensor xd_in = xd.contiguous();
  const auto [zp, t] = gemm1(xd_in, xq.has_value() ? xq->contiguous() : xd_in, w_down, w_query, acc);
  const at::Tensor go = grad_out.to(acc).contiguous();
  const at::Tensor dw = at::mm(go, w_out);
  const at::Tensor gp = grad_probs.has_value() ? grad_probs->to(acc).contiguous() : at::Tensor();
  const at::Tensor keep = (dropout_p > 0.0 && keep_mask.has_value()) ? keep_mask->contiguous() : at::Tensor();
  const at::Tensor shift = (dropout_p > 0.0 && logit_shift.has_value()) ? logit_shift->contiguous() : at::Tensor();
  const at::Tensor allow = adapter_mask.has_value() ? adapter_mask->contiguous() : at::Tensor();
  const OptTensor bd = b_down.has_value() ? OptTensor(b_down->contiguous()) : OptTensor();
  const OptTensor bq = b_query.has_value() ? OptTensor(b_query->contiguous()) : OptTensor();
  at::Tensor dzp = at::zeros({M, R}, opts), dt = at::zeros({M, RN}, opts);
  at::Tensor wmix = needs[kGradWOut] ? at::zeros({M, RN}, opts) : at::Tensor();
  at::Tensor dshift = (needs[kGradLogitShift] && logit_shift.has_value()) ? at::zeros({M}, opts) : at::Tensor();
  cuda::backward_epilogue(zp, t, bd, bq, dw, gp, dzp, dt, wmix, dshift, seg, temperature,
                          make_drop(dropout_p, seed, keep, shift, allow));
  return assemble_grads(needs, grad_out, go, xd, xq, xdc, xqc, w_down, b_down, w_query, b_query, logit_shift, dzp,
                        dt, wmix, dshift);
}

}  // namespace
}  // namespace fusedadapter

TORCH_LIBRARY_FRAGMENT(fusedadapter, m) {
  m.def("fusion_cuda" FA_FUSION_SCHEMA_ARGS);
  m.def("fusion_cuda_backward" FA_FUSION_BACKWARD_SCHEMA_ARGS);
}

TORCH_LIBRARY_IMPL(fusedadapter, CUDA, m) {
  m.impl("fusion_cuda", &fusedadapter::fusion_cuda);
  m.impl("fusion_cuda_backward", &fusedadapter::fusion_cuda_backward);
}
