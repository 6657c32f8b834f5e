// Autograd for the bnlab ops, in C++ so that a training step pays one dispatcher call per BN
// forward and one per backward (a Python autograd.Function costs ~20 µs per call, more than the
// whole kernel on small activations). Also the running-statistics update as one small op.
//
// Backward (Ioffe & Szegedy 2015, Sec. 3) runs the fused `bnlab::bn_bwd` kernel. When the graph
// of the backward itself is wanted (create_graph=True: double backward, gradient penalties),
// the backward is instead written with differentiable ATen ops that recompute μ_B and σ²_B from
// x — the reference path's formula — so second derivatives are exact.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>

#include "bn_tensors.h"

namespace bnk {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using OptT = c10::optional<Tensor>;

namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor> call_train_fwd(const Tensor& x, const OptT& w,
                                                          const OptT& b, double eps,
                                                          const OptT& z, bool relu, bool save) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_train_fwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const OptT&, const OptT&, double, const OptT&, bool,
                           bool)>();
  return op.call(x, w, b, eps, z, relu, save);
}

std::tuple<Tensor, Tensor> call_eval_fwd(const Tensor& x, const Tensor& rm, const Tensor& rv,
                                         const OptT& w, const OptT& b, double eps,
                                         const OptT& z, bool relu, bool save) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_eval_fwd", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                         const Tensor&, const OptT&, const OptT&,
                                                         double, const OptT&, bool, bool)>();
  return op.call(x, rm, rv, w, b, eps, z, relu, save);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> call_bwd(const Tensor& g, const Tensor& x,
                                                    const Tensor& mean, const Tensor& var,
                                                    const OptT& w, double eps, const OptT& mask,
                                                    bool training, bool need_dx, bool need_dz) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_bwd", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                           const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                           const OptT&, double, const OptT&, bool, bool, bool)>();
  return op.call(g, x, mean, var, w, eps, mask, training, need_dx, need_dz);
}

at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kBFloat16 || t == at::kHalf) ? at::kFloat : t;
}

std::vector<int64_t> reduce_dims(const Tensor& x) {
  std::vector<int64_t> d{0};
  for (int64_t i = 2; i < x.dim(); ++i) d.push_back(i);
  return d;
}

Tensor cview(const Tensor& t, const Tensor& x) {  // (C,) -> (1, C, 1, ...)
  std::vector<int64_t> shape(x.dim(), 1);
  shape[1] = -1;
  return t.view(shape);
}

OptT opt(const Tensor& t) { return t.defined() ? OptT(t) : OptT(); }

// The backward with differentiable ops (create_graph=True). Returns dx, dw, db, g' (= dz).
std::tuple<Tensor, Tensor, Tensor, Tensor> reference_backward(
    const Tensor& grad_y, const Tensor& x, const Tensor& weight, const Tensor& mask,
    const Tensor& rm, const Tensor& rv, double eps, bool training) {
  const auto ct = compute_type(x.scalar_type());
  Tensor g = mask.defined() ? grad_y * mask.to(grad_y.scalar_type()) : grad_y;
  Tensor gc = g.to(ct), xc = x.to(ct);
  const auto dims = reduce_dims(x);
  Tensor mean, invstd;
  if (training) {
    auto vm = at::var_mean(xc, dims, /*correction=*/0, /*keepdim=*/false);
    mean = std::get<1>(vm);
    invstd = at::rsqrt(std::get<0>(vm) + eps);
  } else {
    mean = rm.to(ct);
    invstd = at::rsqrt(rv.to(ct) + eps);
  }
  Tensor x_hat = (xc - cview(mean, x)) * cview(invstd, x);
  Tensor gx = gc * x_hat;
  Tensor sum_g = gc.sum(dims), sum_gx = gx.sum(dims);
  Tensor scale = weight.defined() ? invstd * weight.to(ct) : invstd;
  Tensor dx;
  if (training) {  // means, not sums / m: no numel() (symbolic under torch.compile)
    dx = (gc - cview(gc.mean(dims), x) - x_hat * cview(gx.mean(dims), x)) * cview(scale, x);
  } else {
    dx = gc * cview(scale, x);
  }
  return {dx.to(x.scalar_type()), sum_gx, sum_g, g};
}

// Bits of the "flags" entry of saved_data (see save_flags).
constexpr int64_t kRelu = 1, kHasZ = 2, kHasW = 4, kHasB = 8, kTypeShift = 8;

// Gradients for the op inputs; flags say which are wanted.
variable_list finish(AutogradContext* ctx, const Tensor& grad_y, bool training) {
  auto saved = ctx->get_saved_variables();
  const Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &var = saved[3];
  const int64_t flags = ctx->saved_data["flags"].toInt();
  const bool relu = flags & kRelu, has_z = flags & kHasZ;
  const bool has_w = flags & kHasW, has_b = flags & kHasB;
  const auto bias_type = static_cast<at::ScalarType>(flags >> kTypeShift);
  const double eps = ctx->saved_data["eps"].toDouble();
  Tensor mask = relu ? saved[4] : Tensor();
  TORCH_CHECK(!relu || mask.dim() == x.dim(),
              "bnlab: the fused BN+ReLU ran without saving its ReLU mask (save_mask=False), so "
              "it cannot be differentiated");
  // Argument positions: train (x, w, b, eps, z, ...), eval (x, rm, rv, w, b, eps, z, ...).
  // needs_input_grad counts only the tensors that were given (absent optionals are skipped).
  const int iw = training ? 1 : 3, ib = iw + 1, iz = training ? 4 : 6;
  const int vw = training ? 1 : 3, vb = vw + has_w, vz = vb + has_b;
  const bool need_x = ctx->needs_input_grad(0);
  const bool need_w = has_w && ctx->needs_input_grad(vw);
  const bool need_b = has_b && ctx->needs_input_grad(vb);
  const bool need_z = has_z && ctx->needs_input_grad(vz);
  Tensor dx, dw, db, dz;
  Tensor g = grad_y.defined() ? grad_y : at::zeros_like(x);
  if (at::GradMode::is_enabled()) {
    std::tie(dx, dw, db, dz) = reference_backward(g, x, weight, mask, mean, var, eps, training);
  } else {
    // Below autograd: with grad mode off the autograd fallback of an op without an Autograd
    // kernel still walks its arguments on every call.
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(dx, dw, db, dz) =
        call_bwd(g, x, mean, var, opt(weight), eps, opt(mask), training, need_x, need_z);
  }
  // (Tensor::to is a dispatcher call even when the dtype already matches.)
  auto as = [](const Tensor& t, at::ScalarType st) {
    return t.scalar_type() == st ? t : t.to(st);
  };
  variable_list out(training ? 7 : 9);
  if (need_x) out[0] = dx;
  if (need_w) out[iw] = as(dw, weight.scalar_type());
  if (need_b) out[ib] = as(db, bias_type);
  if (need_z) out[iz] = dz;
  return out;
}

// What `finish` needs besides the saved tensors, shared by the training and eval functions:
// eps and one bit field (two hash-map entries per layer and step instead of six).
void save_flags(AutogradContext* ctx, double eps, bool relu, const OptT& w, const OptT& b,
                const OptT& z) {
  const bool has_b = b.has_value() && b->defined();
  const int64_t bias_type = static_cast<int64_t>(has_b ? b->scalar_type() : at::kFloat);
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["flags"] = (relu ? kRelu : 0) | (z.has_value() && z->defined() ? kHasZ : 0) |
                             (w.has_value() && w->defined() ? kHasW : 0) |
                             (has_b ? kHasB : 0) | (bias_type << kTypeShift);
}

class TrainFn : public torch::autograd::Function<TrainFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const OptT& w,
                               const OptT& b, double eps, const OptT& z, bool relu, bool save) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, var, mask] = call_train_fwd(x, w, b, eps, z, relu, save);
    save_flags(ctx, eps, relu, w, b, z);
    ctx->save_for_backward({x, w.has_value() ? *w : Tensor(), mean, var, mask});
    ctx->mark_non_differentiable({mean, var, mask});
    // Only y's gradient is used: without this, autograd fills zero gradients for mean, var and
    // the mask on every backward (3 allocations + fills per layer, ~0.7 ms of an Inception step).
    ctx->set_materialize_grads(false);
    return {y, mean, var, mask};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return finish(ctx, grads[0], /*training=*/true);
  }
};

class EvalFn : public torch::autograd::Function<EvalFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& rm,
                               const Tensor& rv, const OptT& w, const OptT& b, double eps,
                               const OptT& z, bool relu, bool save) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mask] = call_eval_fwd(x, rm, rv, w, b, eps, z, relu, save);
    save_flags(ctx, eps, relu, w, b, z);
    // Copies of the running statistics (C values each), not the buffers: a training forward
    // of the same layer before this backward updates them in place, which failed autograd's
    // version check (the reference path saves its derived scale; torch's BN silently uses the
    // updated buffers).
    ctx->save_for_backward({x, w.has_value() ? *w : Tensor(), rm.clone(), rv.clone(), mask});
    ctx->mark_non_differentiable({mask});
    ctx->set_materialize_grads(false);  // as in TrainFn
    return {y, mask};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return finish(ctx, grads[0], /*training=*/false);
  }
};

// Whether autograd has anything to record: grad mode on and some input requiring grad. When
// not (inference, torch.no_grad), the ops skip the autograd::Function machinery (~2 µs a call,
// a sizeable part of a BN on a (60, 100) activation).
bool wants_grad(std::initializer_list<const Tensor*> ts, std::initializer_list<const OptT*> os) {
  if (!at::GradMode::is_enabled()) return false;
  for (const Tensor* t : ts)
    if (t->requires_grad()) return true;
  for (const OptT* o : os)
    if (o->has_value() && (*o)->defined() && (*o)->requires_grad()) return true;
  return false;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> train_fwd_autograd(const Tensor& x, const OptT& w,
                                                              const OptT& b, double eps,
                                                              const OptT& z, bool relu,
                                                              bool save) {
  if (!wants_grad({&x}, {&w, &b, &z})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_train_fwd(x, w, b, eps, z, relu, save);
  }
  auto r = TrainFn::apply(x, w, b, eps, z, relu, save);
  return {r[0], r[1], r[2], r[3]};
}

std::tuple<Tensor, Tensor> eval_fwd_autograd(const Tensor& x, const Tensor& rm, const Tensor& rv,
                                             const OptT& w, const OptT& b, double eps,
                                             const OptT& z, bool relu, bool save) {
  if (!wants_grad({&x}, {&w, &b, &z})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_eval_fwd(x, rm, rv, w, b, eps, z, relu, save);
  }
  auto r = EvalFn::apply(x, rm, rv, w, b, eps, z, relu, save);
  return {r[0], r[1]};
}

// r ← lerp(r, k·s, w) over n values with torch.lerp's formula (ATen's vectorized lerp: two
// FMAs chosen by |w| < 0.5), in loops the compiler vectorizes: restrict parameters, the choice
// outside the loop. (Written with the choice inside the loop, and all_finite as a short-circuit
// &&, both ran scalar: the layers' training forward took 1.36-1.51x the time on (2, 16384) in
// two A/B runs, 1.15-1.23x on (2, 1024).)
bool all_finite(const float* __restrict__ a, const float* __restrict__ b, int64_t n);
void lerp_into(float* __restrict__ r, const float* __restrict__ s, float k, float w, int64_t n) {
  if (!all_finite(r, r, n)) {
    // A buffer holding ±inf (a float16 one that overflowed, a checkpoint's): r + w·(s − r)
    // is NaN there, torch's (1 − w)·r + w·s keeps it (BN's eval then gives β, not NaN). Rare:
    // one scalar pass, the finite values as below.
    for (int64_t c = 0; c < n; ++c) {
      const float b = s[c] * k;
      r[c] = !std::isfinite(r[c])     ? (1.0f - w) * r[c] + w * b
             : std::abs(w) < 0.5f     ? std::fma(w, b - r[c], r[c])
                                      : std::fma(w - 1.0f, b - r[c], b);
    }
    return;
  }
  if (std::abs(w) < 0.5f) {
    for (int64_t c = 0; c < n; ++c) r[c] = std::fma(w, s[c] * k - r[c], r[c]);
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const float b = s[c] * k;
      r[c] = std::fma(w - 1.0f, b - r[c], b);
    }
  }
}

// Whether all n values of a and b are finite (one vectorizable pass, no early exit).
bool all_finite(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  int bad = 0;
  for (int64_t c = 0; c < n; ++c) bad |= !std::isfinite(a[c]) | !std::isfinite(b[c]);
  return bad == 0;
}

// r ← lerp(r, s, momentum) for μ_B and the unbiased m/(m−1)·σ²_B, skipped (both) when a
// statistic is not finite — `bnlab.functional.update_running_stats` as one op, float32 buffers.
Tensor update_running(const OptT& rm, const OptT& rv, const Tensor& mean_in, const Tensor& var_in,
                      int64_t count, double momentum, const OptT& momentum_t) {
  const Tensor mean = as_float32(mean_in), var = as_float32(var_in);  // (runs in Autograd too)
  const int64_t C = mean.numel();
  const float* mp = mean.data_ptr<float>();
  const float* vp = var.data_ptr<float>();
  const bool finite = all_finite(mp, vp, C);
  const float w = (momentum_t.has_value() && momentum_t->defined())
                      ? static_cast<float>(momentum_t->item<double>())
                      : static_cast<float>(momentum);
  const float ratio = count > 1 ? static_cast<float>(static_cast<double>(count) / (count - 1))
                                : 1.0f;
  auto upd = [&](const OptT& buf, const float* s, float k) {
    if (!finite || !buf.has_value() || !buf->defined()) return;
    TORCH_CHECK(buf->scalar_type() == at::kFloat && buf->is_contiguous() && buf->numel() == C,
                "bnlab: bn_update_running needs contiguous float32 buffers of ", C,
                " elements, as many as the statistics; got ", buf->scalar_type(), " of ",
                buf->numel(), buf->is_contiguous() ? "" : ", not contiguous");
    lerp_into(buf->data_ptr<float>(), s, k, w, C);
  };
  upd(rm, mp, 1.0f);  // (mean·1 is mean)
  upd(rv, vp, ratio);
  return at::scalar_tensor(finite, mean.options().dtype(at::kBool));
}

// The update through the dispatcher, not as a C++ call, so fake tensors (torch.compile,
// opcheck) reach the fake kernel.
Tensor call_update(const OptT& rm, const OptT& rv, const Tensor& mean, const Tensor& var,
                   int64_t count, double momentum, const OptT& momentum_t) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_update_running", "")
                       .typed<Tensor(const OptT&, const OptT&, const Tensor&, const Tensor&,
                                     int64_t, double, const OptT&)>();
  return op.call(rm, rv, mean, var, count, momentum, momentum_t);
}

// Training forward and running-statistics update in one call from Python (the layers' eager
// path; ~10 µs less per BN layer than two calls, which matters for (N, C) = (60, 100)).
std::tuple<Tensor, Tensor, Tensor, Tensor> train_fwd_update(
    const Tensor& x, const OptT& w, const OptT& b, double eps, const OptT& rm, const OptT& rv,
    int64_t count, double momentum, const OptT& momentum_t) {
  auto [y, mean, var, mask] = call_train_fwd(x, w, b, eps, OptT(), false, false);
  Tensor finite = update_running(rm, rv, mean, var, count, momentum, momentum_t);
  return {y, mean, var, finite};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> train_fwd_update_autograd(
    const Tensor& x, const OptT& w, const OptT& b, double eps, const OptT& rm, const OptT& rv,
    int64_t count, double momentum, const OptT& momentum_t) {
  Tensor y, mean, var;
  if (!wants_grad({&x}, {&w, &b})) {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(y, mean, var, std::ignore) = call_train_fwd(x, w, b, eps, OptT(), false, false);
  } else {
    auto r = TrainFn::apply(x, w, b, eps, OptT(), false, false);
    y = r[0], mean = r[1], var = r[2];
  }
  Tensor finite = call_update(rm, rv, mean, var, count, momentum, momentum_t);  // (bumps)
  return {y, mean, var, finite};
}

// The update's Autograd kernel: the CPU kernel, then what an ADInplaceOrView kernel does for
// in-place ops (custom ops get none): the buffers' version counters move, so a graph that
// saved them (a user's product with running_var) refuses to backward through the changed
// values instead of using them silently. Every caller goes through it: the layers' update,
// the fused BN+ReLU's and `bnlab.kernels.update_running_stats`.
// (count stays a SymInt: an int64_t here made torch.compile specialize every batch size.)
Tensor update_running_autograd(const OptT& rm, const OptT& rv, const Tensor& mean,
                               const Tensor& var, c10::SymInt count, double momentum,
                               const OptT& momentum_t) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("bnlab::bn_update_running", "")
                       .typed<Tensor(const OptT&, const OptT&, const Tensor&, const Tensor&,
                                     c10::SymInt, double, const OptT&)>();
  Tensor finite;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    finite = op.call(rm, rv, mean, var, std::move(count), momentum, momentum_t);
  }
  for (const OptT* buf : {&rm, &rv})
    if (buf->has_value() && (*buf)->defined()) torch::autograd::impl::bump_version(**buf);
  return finite;
}

}  // namespace
}  // namespace bnk

TORCH_LIBRARY_FRAGMENT(bnlab, m) {
  m.def(
      "bn_train_fwd_update(Tensor input, Tensor? weight, Tensor? bias, float eps, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, SymInt count, float momentum, "
      "Tensor? momentum_tensor) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_update_running(Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor mean, "
      "Tensor var, SymInt count, float momentum, Tensor? momentum_tensor) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("bn_update_running", &bnk::update_running);
  m.impl("bn_train_fwd_update", &bnk::train_fwd_update);
}

TORCH_LIBRARY_IMPL(bnlab, Autograd, m) {
  m.impl("bn_train_fwd", &bnk::train_fwd_autograd);
  m.impl("bn_train_fwd_update", &bnk::train_fwd_update_autograd);
  m.impl("bn_update_running", &bnk::update_running_autograd);
  m.impl("bn_eval_fwd", &bnk::eval_fwd_autograd);
}
