// bnlab CPU batch-norm kernels: tensor plumbing shared by the operators in bn_ops.cpp — which
// layout the loops read, per-channel parameters as float32, dtype and epilogue dispatch, and
// whether outputs are written with streaming stores.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "bn_loops.h"

namespace bnk {

struct Prepared {
  at::Tensor x;
  Shape s;
};

// The layout the loops read: contiguous NCHW (planar), channels-last-like (rows), or a
// contiguous copy for anything else (a channels_last-ordered view: a channels_last copy). Outputs
// take the layout read, so rows are kept only where
// torch's BN keeps them too (channels_last 4-D and 5-D, and (N, C) itself): a (N, L, C)
// transposed to (N, C, L) gets a contiguous output from torch, which code then .view()s.
inline Prepared prepare(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "bnlab kernels: input must have at least 2 dimensions, got ",
              x.dim());
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t S = (N * C) > 0 ? x.numel() / (N * C) : 1;
  if (S == 1) return {x.contiguous(), {N, C, 1, true}};
  if (x.is_contiguous()) return {x, {N, C, S, false}};
  std::vector<int64_t> perm{0};
  for (int64_t d = 2; d < x.dim(); ++d) perm.push_back(d);
  perm.push_back(1);
  if ((x.dim() == 4 || x.dim() == 5) && x.permute(perm).is_contiguous())
    return {x, {N, C, S, true}};
  // A view of a channels_last tensor (a crop, a strided subsample): copied to channels_last,
  // the layout torch's BN gives it (its suggest_memory_format, which follows stride order).
  const auto fmt = x.suggest_memory_format();
  if ((x.dim() == 4 || x.dim() == 5) && fmt != at::MemoryFormat::Contiguous)
    return {x.contiguous(fmt), {N, C, S, true}};
  return {x.contiguous(), {N, C, S, false}};
}

// Whether a pass writes its outputs with streaming stores: when the k tensors it streams
// (x.nbytes() each: x and y forward; x, grad and dx backward) exceed a last-level cache of
// 32 MiB, the output would be evicted before use anyway. Measured on the AMD EPYC VM (Zen 4,
// L3 32 MiB) this was tuned on, for y = a·x + b at 2 threads: 30% faster on 102 MB, 10% on
// 25.7 MB, but 2x slower on cache-resident tensors. (sysconf's L3 size is the host's total
// on these VMs, 384 MiB there and 480 MiB on the Intel Xeon VM since 2026-12-07, so a fixed
// figure is used; on the Xeon the knee lies higher: docs/benchmarks.md, 610b905.)
// Only when every plane (row) is whole vectors: with 7x7 planes most vectors are misaligned
// and stored normally, and a normal store into a line that a streaming store just wrote
// flushes the write-combining buffer — 7x7 backward ran at 6x a copy instead of 3x.
constexpr int64_t LLC = int64_t{32} << 20;
inline bool stream_outputs(const at::Tensor& x, int k, const Shape& s) {
  return x.scalar_type() == at::kFloat && (s.rows ? s.C : s.S) % W == 0 &&
         static_cast<int64_t>(x.nbytes()) * k > LLC;
}
// Whether the k tensors of x's size that a pass touches fit in the LLC together.
inline bool cache_resident(const at::Tensor& x, int k) {
  return static_cast<int64_t>(x.nbytes()) * k <= LLC;
}

// t with ref's sizes, strides and dtype (a copy only when they differ).
// (dtype: ref's by default; the ReLU mask passes kByte.)
inline at::Tensor like(const at::Tensor& t, const at::Tensor& ref,
                c10::optional<at::ScalarType> dtype = c10::nullopt) {
  TORCH_CHECK(t.sizes() == ref.sizes(), "bnlab kernels: expected a tensor of shape ",
              ref.sizes(), ", got ", t.sizes());
  const at::ScalarType want = dtype.value_or(ref.scalar_type());
  if (t.strides() == ref.strides() && t.scalar_type() == want) return t;
  at::Tensor out = at::empty_like(ref, ref.options().dtype(want));
  out.copy_(t);
  return out;
}

// When the gradient is a channel slice of a bigger NCHW tensor (what torch.cat's backward
// hands to a BN, or BN+ReLU, whose output was concatenated: every sample's C·S values
// contiguous, samples further apart than C·S) and x takes the fused planar path, the elements
// between samples of g beyond x's (> 0); 0 when g must be made like x. Reading the slice in
// place saves a copy of g: ~2 ms of a 180 ms training step of the Inception-style net.
inline int64_t planar_grad_gap(const at::Tensor& g, const at::Tensor& x, const Shape& s) {
  if (s.rows || s.N < 2 || !channel_parallel(s) || g.scalar_type() != x.scalar_type() ||
      g.sizes() != x.sizes() || g.strides() == x.strides())
    return 0;
  int64_t expect = 1;
  for (int64_t d = g.dim() - 1; d >= 1; --d) {
    if (g.size(d) != 1 && g.stride(d) != expect) return 0;
    expect *= g.size(d);
  }
  const int64_t gap = g.stride(0) - s.C * s.S;
  return gap > 0 ? gap : 0;
}

// t as contiguous float32, with no aten call when it already is (inside the Autograd kernel,
// under a dispatch mode, an op returning its input is flagged as aliasing; and each call
// costs a dispatch).
inline at::Tensor as_float32(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

inline at::Tensor per_channel(const c10::optional<at::Tensor>& t, int64_t C, float fill,
                       const char* name) {
  if (!t.has_value() || !t->defined()) return at::full({C}, fill, at::dtype(at::kFloat));
  TORCH_CHECK(t->numel() == C, "bnlab kernels: ", name, " must have ", C, " elements, got ",
              t->numel());
  TORCH_CHECK(t->device().is_cpu(), "bnlab kernels: ", name, " must be on the CPU, got ",
              t->device());
  return as_float32(*t);
}

inline void check_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "bnlab kernels: dtype must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "bnlab kernels: CPU tensors only, got ", x.device());
}

// float32 -> float, bfloat16 -> c10::BFloat16 (the only two dtypes the loops implement).
template <class F>
inline void dispatch(const at::Tensor& x, const F& f) {
  if (x.scalar_type() == at::kFloat) f(float{});
  else f(bf16{});
}

inline at::Tensor empty_bytes(const at::Tensor& x) {
  return at::empty({0}, x.options().dtype(at::kByte));
}

// Calls f(epilogue) with the Epilogue type of this (residual, relu, mask) combination.
template <typename T, class F>
void with_epilogue(const at::Tensor& z, bool relu, const at::Tensor& mask, const F& f) {
  const T* zp = z.defined() ? z.data_ptr<T>() : nullptr;
  uint8_t* mp = mask.numel() > 0 ? mask.data_ptr<uint8_t>() : nullptr;
  if (!relu) {
    if (zp) f(Epilogue<T, true, false, false>{zp, nullptr});
    else f(Epilogue<T, false, false, false>{nullptr, nullptr});
  } else if (zp) {
    if (mp) f(Epilogue<T, true, true, true>{zp, mp});
    else f(Epilogue<T, true, true, false>{zp, nullptr});
  } else {
    if (mp) f(Epilogue<T, false, true, true>{nullptr, mp});
    else f(Epilogue<T, false, true, false>{nullptr, nullptr});
  }
}

// Calls f(op) with the DxOp type of this (mask, dz, dx) combination.
template <typename T, class F>
void with_dx_op(const T* x, const T* g, const uint8_t* mask, T* dx, T* dz, bool nt,
                const F& f) {
  auto pick_dx = [&](auto m, auto z) {
    constexpr bool M = decltype(m)::value, Z = decltype(z)::value;
    if (dx) f(DxOp<T, M, Z, true>{x, g, mask, dx, dz, nt});
    else f(DxOp<T, M, Z, false>{x, g, mask, dx, dz, nt});
  };
  auto pick_dz = [&](auto m) {
    if (dz) pick_dx(m, std::true_type{});
    else pick_dx(m, std::false_type{});
  };
  if (mask) pick_dz(std::true_type{});
  else pick_dz(std::false_type{});
}

}  // namespace bnk
