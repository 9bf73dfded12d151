// Host-side helpers shared by the CPU and CUDA ops: argument checks (the C++ twin of
// fusedadapter.ops.check_fusion_args, with the same messages and exception types) and the
// static segment/activation description.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "fusion_common.h"

namespace fusedadapter {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

struct FusionDims {
  int64_t M = 0, R = 0, N = 0, H = 0, Kd = 0, Kq = 0;
};

// Segments and activation codes, plus runs of adjacent segments with the same code (one
// vectorised activation call per run).
struct SegmentInfo {
  std::vector<int64_t> offsets;  // N + 1
  std::vector<int> codes;        // N
  struct Run {
    int64_t lo, hi;
    int code;
  };
  std::vector<Run> runs;
  std::vector<int32_t> seg_of;   // R: segment of each bottleneck column

  SegmentInfo(c10::IntArrayRef segments, c10::IntArrayRef activations) {
    offsets.assign(segments.begin(), segments.end());
    for (auto a : activations) codes.push_back(static_cast<int>(a));
    const int64_t n = static_cast<int64_t>(codes.size());
    for (int64_t k = 0; k < n; ++k) {
      if (!runs.empty() && runs.back().code == codes[k]) {
        runs.back().hi = offsets[k + 1];
      } else {
        runs.push_back({offsets[k], offsets[k + 1], codes[k]});
      }
    }
    seg_of.resize(static_cast<size_t>(offsets.back()));
    for (int64_t k = 0; k < n; ++k)
      for (int64_t j = offsets[k]; j < offsets[k + 1]; ++j) seg_of[j] = static_cast<int32_t>(k);
  }
  int64_t n() const { return static_cast<int64_t>(codes.size()); }
  int64_t r() const { return offsets.back(); }
};

inline std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  if (t.dim() == 1) s += ",";
  return s + ")";
}

inline at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Mirrors fusedadapter.ops.check_fusion_args; TORCH_CHECK_VALUE raises ValueError, TORCH_CHECK_TYPE
// TypeError in Python. `device_type` is the device the backend runs on.
inline FusionDims check_fusion_args(const char* op, c10::DeviceType device_type, const Tensor& xd,
                                    const OptTensor& xq, const OptTensor& residual, const Tensor& w_down,
                                    const OptTensor& b_down, const Tensor& w_query, const OptTensor& b_query,
                                    const Tensor& w_out, c10::IntArrayRef segments,
                                    c10::IntArrayRef activations, double temperature, double dropout_p,
                                    const OptTensor& keep_mask, const OptTensor& logit_shift,
                                    const OptTensor& adapter_mask) {
  TORCH_CHECK_VALUE(xd.dim() == 2, op, ": xd must be 2-D (tokens, features), got shape ", shape_str(xd));
  TORCH_CHECK_TYPE(at::isFloatingType(xd.scalar_type()), op, ": xd must be floating point, got ",
                   xd.scalar_type());
  TORCH_CHECK_VALUE(xd.device().type() == device_type, op, ": runs on ", c10::DeviceTypeName(device_type),
                    " tensors, got xd on ", xd.device());
  const int64_t n = static_cast<int64_t>(activations.size());
  TORCH_CHECK_VALUE(n >= 1 && static_cast<int64_t>(segments.size()) == n + 1, op,
                    ": expected len(segments) == len(activations) + 1 >= 2, got ", segments.size(), " and ", n);
  bool ok = segments[0] == 0;
  for (int64_t k = 0; k < n && ok; ++k) ok = segments[k + 1] > segments[k];
  TORCH_CHECK_VALUE(ok, op, ": segments must start at 0 and strictly increase, got ", segments);
  FusionDims d;
  d.N = n;
  d.R = segments[n];
  d.M = xd.size(0);
  d.Kd = xd.size(1);
  d.Kq = xq.has_value() ? xq->size(-1) : d.Kd;
  if (xq.has_value()) {
    TORCH_CHECK_VALUE(xq->dim() == 2 && xq->size(0) == d.M, op, ": xq must have shape (", d.M, ", K), got ",
                      shape_str(*xq));
  }
  TORCH_CHECK_VALUE(w_down.dim() == 2 && w_down.size(0) == d.R && w_down.size(1) == d.Kd, op,
                    ": w_down must have shape (", d.R, ", ", d.Kd, "), got ", shape_str(w_down));
  if (b_down.has_value()) {
    TORCH_CHECK_VALUE(b_down->dim() == 1 && b_down->size(0) == d.R, op, ": b_down must have shape (", d.R,
                      ",), got ", shape_str(*b_down));
  }
  TORCH_CHECK_VALUE(w_query.dim() == 2 && w_query.size(0) == d.R + n && w_query.size(1) == d.Kq, op,
                    ": w_query must have shape (", d.R + n, ", ", d.Kq, "), got ", shape_str(w_query));
  if (b_query.has_value()) {
    TORCH_CHECK_VALUE(b_query->dim() == 1 && b_query->size(0) == d.R + n, op, ": b_query must have shape (",
                      d.R + n, ",), got ", shape_str(*b_query));
  }
  TORCH_CHECK_VALUE(w_out.dim() == 2 && w_out.size(1) == d.R + n, op, ": w_out must have shape (H, ", d.R + n,
                    "), got ", shape_str(w_out));
  d.H = w_out.size(0);
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->dim() == 2 && residual->size(0) == d.M && residual->size(1) == d.H, op,
                      ": residual must have shape (", d.M, ", ", d.H, "), got ", shape_str(*residual));
  }
  const auto act = xd.scalar_type();
  const auto acc = acc_type_of(act);
  struct Item {
    const char* name;
    const Tensor* t;
    at::ScalarType want;
  };
  const Item items[] = {{"xq", xq ? &*xq : nullptr, act},
                        {"residual", residual ? &*residual : nullptr, act},
                        {"w_down", &w_down, acc},
                        {"b_down", b_down ? &*b_down : nullptr, acc},
                        {"w_query", &w_query, acc},
                        {"b_query", b_query ? &*b_query : nullptr, acc},
                        {"w_out", &w_out, acc},
                        {"logit_shift", logit_shift ? &*logit_shift : nullptr, acc}};
  for (const auto& it : items) {
    if (it.t == nullptr) continue;
    TORCH_CHECK_TYPE(it.t->scalar_type() == it.want, op, ": ", it.name, " has dtype ", it.t->scalar_type(),
                     ", expected ", it.want, " (activations share xd's dtype ", act,
                     "; weights and logit_shift are in its accumulation dtype ", acc, ")");
    TORCH_CHECK_VALUE(it.t->device() == xd.device(), op, ": ", it.name, " is on ", it.t->device(), ", expected ",
                      xd.device(), " (the device of xd)");
  }
  TORCH_CHECK_VALUE(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  // keep_mask and adapter_mask: bool (M, N) on xd's device
  auto check_row_mask = [&](const char* name, const OptTensor& mask) {
    if (!mask.has_value()) return;
    TORCH_CHECK_VALUE(mask->dim() == 2 && mask->size(0) == d.M && mask->size(1) == n &&
                          mask->scalar_type() == at::kBool,
                      op, ": ", name, " must be a bool tensor of shape (", d.M, ", ", n, "), got ",
                      mask->scalar_type(), " ", shape_str(*mask));
    TORCH_CHECK_VALUE(mask->device() == xd.device(), op, ": ", name, " is on ", mask->device(), ", expected ",
                      xd.device(), " (the device of xd)");
  };
  check_row_mask("keep_mask", keep_mask);
  if (logit_shift.has_value()) {
    TORCH_CHECK_VALUE(logit_shift->dim() == 1 && logit_shift->size(0) == d.M, op,
                      ": logit_shift must have shape (", d.M, ",), got ", shape_str(*logit_shift));
  }
  check_row_mask("adapter_mask", adapter_mask);
  for (auto code : activations) {
    TORCH_CHECK_VALUE(code >= 0 && code < kNumActivations, op, ": unknown activation code ", code,
                      "; expected 0..8");
  }
  return d;
}

// ------------------------------------------------------------------------------ backward glue
// The backward op's gradient slots: its outputs and its `needs` flags, in FUSION_BACKWARD_SCHEMA's
// order (fusedadapter.ops.FUSION_GRADS, derived there from the schema; tests/test_native.py checks
// kGradNames against it). Never renumber: the order is part of the schema.
enum Grad : int {
  kGradXd = 0,
  kGradXq,
  kGradResidual,
  kGradWDown,
  kGradBDown,
  kGradWQuery,
  kGradBQuery,
  kGradWOut,
  kGradLogitShift,
  kNumGrads,
};
constexpr const char* kGradNames[kNumGrads] = {"xd",      "xq",      "residual", "w_down",     "b_down",
                                               "w_query", "b_query", "w_out",    "logit_shift"};

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
static_assert(std::tuple_size<Grads>::value == kNumGrads, "one Grads element per gradient slot");
using Needs = std::array<bool, kNumGrads>;

// The backward's `needs` flags (one per gradient slot) and shape checks.
inline Needs check_backward_args(const char* op, const FusionDims& d, const Tensor& grad_out,
                                 const OptTensor& grad_probs, const c10::List<bool>& needs_list) {
  TORCH_CHECK_VALUE(needs_list.size() == kNumGrads, op, ": needs must have ", static_cast<int>(kNumGrads),
                    " flags, got ", needs_list.size());
  Needs needs{};
  for (size_t i = 0; i < kNumGrads; ++i) needs[i] = needs_list.get(i);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == d.M && grad_out.size(1) == d.H, op,
                    ": grad_out must have shape (", d.M, ", ", d.H, "), got ", shape_str(grad_out));
  if (grad_probs.has_value()) {
    TORCH_CHECK_VALUE(grad_probs->dim() == 2 && grad_probs->size(0) == d.M && grad_probs->size(1) == d.N, op,
                      ": grad_probs must have shape (", d.M, ", ", d.N, "), got ", shape_str(*grad_probs));
  }
  return needs;
}

// The gradients from the epilogue's outputs (accumulation dtype): dzp = dL/d(xd W_d^T + b_d) (M, R),
// dt = dL/d(xq W_q^T + b_q) (M, R+N), wmix = [p*z | p] (M, R+N), dshift (M,). xdc/xqc are the
// activations in the accumulation dtype, go = grad_out in it. A gradient not needed is empty.
// `gemm` runs the products: mm(a, b) = a @ b, addmm_(c, a, b): c += a @ b (ATen by default; the
// cpu backend passes oneDNN's matmul for float32 from a row threshold).
struct AtenGemm {
  Tensor mm(const Tensor& a, const Tensor& b) const { return at::mm(a, b); }
  void addmm_(Tensor& c, const Tensor& a, const Tensor& b) const { c.addmm_(a, b); }
};

template <typename Gemm = AtenGemm>
inline Grads assemble_grads(const Needs& needs, const Tensor& grad_out, const Tensor& go, const Tensor& xd,
                            const OptTensor& xq, const Tensor& xdc, const Tensor& xqc, const Tensor& w_down,
                            const OptTensor& b_down, const Tensor& w_query, const OptTensor& b_query,
                            const OptTensor& logit_shift, const Tensor& dzp, const Tensor& dt, const Tensor& wmix,
                            const Tensor& dshift, const Gemm& gemm = Gemm()) {
  std::array<Tensor, kNumGrads> g;
  for (auto& t : g) t = at::empty({0}, xd.options());  // not needed: empty (distinct, outputs must not alias)
  if (needs[kGradXd]) {
    Tensor gx = gemm.mm(dzp, w_down);
    if (!xq.has_value()) gemm.addmm_(gx, dt, w_query);
    g[kGradXd] = gx.to(xd.scalar_type());
  }
  if (needs[kGradXq] && xq.has_value()) g[kGradXq] = gemm.mm(dt, w_query).to(xq->scalar_type());
  if (needs[kGradResidual]) g[kGradResidual] = grad_out.clone(at::MemoryFormat::Contiguous);
  if (needs[kGradWDown]) g[kGradWDown] = gemm.mm(dzp.t(), xdc);
  if (needs[kGradBDown] && b_down.has_value()) g[kGradBDown] = dzp.sum(0);
  if (needs[kGradWQuery]) g[kGradWQuery] = gemm.mm(dt.t(), xqc);
  if (needs[kGradBQuery] && b_query.has_value()) g[kGradBQuery] = dt.sum(0);
  if (needs[kGradWOut]) g[kGradWOut] = gemm.mm(go.t(), wmix);
  if (needs[kGradLogitShift] && logit_shift.has_value()) g[kGradLogitShift] = dshift;
  return {g[kGradXd],    g[kGradXq],      g[kGradResidual], g[kGradWDown],     g[kGradBDown],
          g[kGradWQuery], g[kGradBQuery], g[kGradWOut],     g[kGradLogitShift]};
}

}  // namespace fusedadapter
