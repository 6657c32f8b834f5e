// bnlab CPU batch-norm operators: the drivers (which pass runs where) and their registration as
// torch.library ops `bnlab::bn_train_fwd`, `bnlab::bn_bwd`, `bnlab::bn_eval_fwd` (CPU kernels;
// autograd is registered in bn_autograd.cpp, fake kernels from Python in bnlab/kernels/ops.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "bn_loops.h"
#include "bn_tensors.h"

namespace bnk {

// ---- training forward: μ_B, σ²_B (biased), y = γ(x − μ_B)/√(σ²_B + ε) + β ----------------
// μ and σ² of n channels from sums about a shift K[j] close to each channel's mean (a sample
// mean of its first values) and, where the shift lost precision (from_shifted_n), the exact
// Σ(x − μ)². reduce(shift, use, s1, s2) adds into s1[j], s2[j] the sums about shift[j] of the
// channels j with use[j] (all of them when use is null); on the rows layout shift is read as
// whole vectors, so K and mean are padded there.
template <class Reduce>
void stats_about(int64_t n, double m, const float* K, float* mean, double* var,
                 const Reduce& reduce) {
  std::vector<double> s1(n, 0.0), s2(n, 0.0);
  reduce(K, nullptr, s1.data(), s2.data());
  std::vector<char> exact(n);
  if (!from_shifted_n(n, K, s1.data(), s2.data(), m, mean, var, exact.data())) return;
  // rare: the sample shift was poor for some channel
  for (int64_t j = 0; j < n; ++j)
    if (exact[j]) s1[j] = s2[j] = 0.0;
  reduce(mean, exact.data(), s1.data(), s2.data());
  for (int64_t j = 0; j < n; ++j)
    if (exact[j]) from_centered(s1[j], s2[j], m, mean[j], var[j]);
}

// stats_about for the n consecutive channels whose first plane starts at x0, each shifted by
// the mean of its first ≤ 16 values.
template <typename T, class Reduce>
void planar_stats(const T* x0, int64_t S, int64_t n, double m, float* mean, double* var,
                  const Reduce& reduce) {
  std::vector<float> K(n);
  for (int64_t j = 0; j < n; ++j) K[j] = sample_mean(x0 + j * S, std::min<int64_t>(S, 16), 1);
  stats_about(n, m, K.data(), mean, var, reduce);
}

template <typename T, class E>
void train_fwd(const T* x, T* y, const Shape& s, const float* w, const float* b, float eps,
               const E& e, float* mean_out, float* var_out) {
  const double m = static_cast<double>(s.m());
  const int64_t C = s.C;
  // Per-channel results, padded to whole vectors (the rows sweep loads them as vectors).
  std::vector<float> mean = padded(C), scale = padded(C), shift = padded(C);
  std::vector<double> var(C, 0.0);
  // Cache-resident small planes with few enough channels: every channel's sums at once, each
  // thread over its own samples (samples_reduce), then one normalize sweep.
  const bool by_samples = samples_split(s);
  // The planar statistics' reduction op at offset p; block_reduce sets each channel's shift.
  const auto sums = [&](int64_t p, int64_t) { return SumsOp<T>{x + p, vf{}}; };
  if (!by_samples && !s.rows && channel_parallel(s)) {
    // Statistics per block of channels, each thread on its own channels. A block is then
    // normalized at once, while it is still in L2/L3 (2T of DRAM traffic instead of 3T) —
    // unless x and y fit in the LLC together (s.resident): with no DRAM traffic to save, one
    // sweep over each thread's contiguous planes afterwards (normalize_all) writes y faster
    // than the block's n-major runs of planes. Eight interleaved A/B runs in one process at
    // 2 threads: 7x7 planes ((32, 512, 7, 7), (32, 2048, 7, 7)) took 4-33% less time in every
    // run, 14x14 and 28x28 planes 0-23% less in 6 of 8 runs and up to 5% more in 2; on a
    // 103 MB tensor the two sweeps cost 1.21-1.23x a copy against the fused 1.00-1.05x.
    const bool fuse = !s.resident;
    const int nt = at::get_num_threads();
    const int64_t cb = channel_block(s, sizeof(T), (C + nt - 1) / nt);
    const NormOp<T, E> norm{x, y, e, s.nt};
    at::parallel_for(0, C, grain_for(s.m()), [&](int64_t c0, int64_t c1) {
      for (int64_t b0 = c0; b0 < c1; b0 += cb) {
        const int64_t nb = std::min(cb, c1 - b0);
        float* mu = mean.data() + b0;
        double* vr = var.data() + b0;
        planar_stats(x + b0 * s.S, s.S, nb, m, mu, vr,
                     [&](const float* k, const char* use, double* s1, double* s2) {
                       block_reduce(s, b0, nb, sums, k, s1, s2, use);
                     });
        scales_n(nb, vr, w + b0, eps, scale.data() + b0, var_out + b0);
        std::copy(b + b0, b + b0 + nb, shift.data() + b0);
        std::copy(mu, mu + nb, mean_out + b0);
        const float *sc = scale.data() + b0, *sh = shift.data() + b0;
        if (fuse)
          for (int64_t n = 0; n < s.N; ++n)
            planes_map(norm, s.S, n * C + b0, nb, 0, nb, mu, sc, sh, sh);
      }
      if (fuse) stream_fence();
    });
    if (!fuse) normalize_all(x, y, s, mean.data(), scale.data(), shift.data(), e);
    return;
  }
  // Samples split, few channels (planar, each channel split over threads) or rows: statistics,
  // then one normalize sweep.
  if (by_samples) {
    planar_stats(x, s.S, C, m, mean.data(), var.data(),
                 [&](const float* k, const char* use, double* s1, double* s2) {
                   samples_reduce(s, sums, k, s1, s2, use);
                 });
  } else if (!s.rows) {
    // Each channel split over the threads by samples. (planar_stats of one channel asks for
    // the second pass only when that channel needs it, so `use` is always set here.)
    for (int64_t c = 0; c < C; ++c)
      planar_stats(x + c * s.S, s.S, 1, m, mean.data() + c, var.data() + c,
                   [&](const float* k, const char*, double* s1, double* s2) {
                     const vf K = splat(*k);
                     par_sums(
                         s.N, grain_for(s.S),
                         [&](int64_t n0, int64_t n1, double& a, double& b_) {
                           planar_reduce(s, c, n0, n1,
                                         [&](int64_t p) { return SumsOp<T>{x + p, K}; }, a, b_);
                         },
                         *s1, *s2);  // (par_sums sets them; stats_about has zeroed them)
                   });
  } else {
    const int64_t M = s.m();
    std::vector<float> k = padded(C);
    rows_sample_means(x, M, C, k.data());
    std::vector<double> a, b_;
    stats_about(C, m, k.data(), mean.data(), var.data(),
                [&](const float* kp, const char* use, double* s1, double* s2) {
                  rows_reduce(M, C, [&](int64_t cv) { return SumsOp<T>{x, load(kp + cv)}; }, a,
                              b_);
                  for (int64_t c = 0; c < C; ++c) {
                    if (use && !use[c]) continue;
                    s1[c] += a[c];
                    s2[c] += b_[c];
                  }
                });
  }
  scales_n(C, var.data(), w, eps, scale.data(), var_out);
  std::copy(b, b + C, shift.data());
  std::copy(mean.data(), mean.data() + C, mean_out);
  normalize_all(x, y, s, mean.data(), scale.data(), shift.data(), e);
}

// ---- backward -------------------------------------------------------------------------------
// Σg', Σg'(x−μ) per channel, then dx = g'·A + (x − μ)·B + Cc with (training)
//   A = γ·invstd, B = −A·invstd²·Σg'(x−μ)/m, Cc = −A·Σg'/m, i.e. the paper's
//   ∂ℓ/∂x̂ = γ·g',  ∂ℓ/∂x = invstd·(∂ℓ/∂x̂ − mean(∂ℓ/∂x̂) − x̂·mean(∂ℓ/∂x̂·x̂));
// in evaluation mode (fixed μ, σ²) B = Cc = 0. Also ∂ℓ/∂γ = invstd·Σg'(x−μ), ∂ℓ/∂β = Σg'.
// g_gap: sample n of the gradient starts n·g_gap elements after x's (a channel slice of a
// bigger NCHW tensor); only the fused planar path takes one (see planar_grad_gap).
// sweep_mean: the μ of the dx sweep, `mean` but where evaluation mode replaced a non-finite
// running mean (there B = 0 and dx = g'·A, which (x − μ)·0 = NaN would spoil; see bn_bwd).
template <class Op>
void backward(const Op& op, const Shape& s, const float* mean, const float* sweep_mean,
              const float* var, const float* w, float eps, bool training, float* dw, float* db,
              int64_t g_gap) {
  using T = typename Op::scalar;
  using Sums = BwdSumsOp<T, Op::kMask>;
  const double m = static_cast<double>(s.m());
  const int64_t C = s.C;
  // The coefficients of channels [c0, c0 + n) from their sums (sg, sgd and A, B, Cc indexed
  // from 0; var, w, dw, db from c0).
  auto coeffs = [&](int64_t c0, int64_t n, const double* sg, const double* sgd, float* A,
                    float* B, float* Cc) {
    bwd_coeffs_n(n, sg, sgd, var + c0, w + c0, eps, m, training, A, B, Cc, dw + c0, db + c0);
  };
  // dx of sample n's planes of channels [c0, c0 + nb) (mean, A, B, Cc indexed from c0), its
  // gradient n·g_gap further on.
  auto sample_dx = [&](int64_t n, int64_t c0, int64_t nb, const float* mu, const float* A,
                       const float* B, const float* Cc) {
    Op on = op;
    on.g += n * g_gap;
    planes_map(on, s.S, n * C + c0, nb, 0, nb, mu, A, B, Cc);
  };
  // The planar sums' reduction op at offset p of sample n; block_reduce sets the shift (μ).
  const auto sums = [&](int64_t p, int64_t n) {
    return Sums{op.x + p, op.g + p + n * g_gap, op.mask ? op.mask + p : nullptr, vf{}};
  };
  const bool sweep = op.dx || op.dz;
  if (samples_split(s)) {
    // As in train_fwd: every channel's sums at once, each thread over its own samples, then
    // dx in one sweep (sample by sample where the gradient is a channel slice).
    std::vector<double> sg(C, 0.0), sgd(C, 0.0);
    samples_reduce(s, sums, mean, sg.data(), sgd.data());
    std::vector<float> A = padded(C), B = padded(C), Cc = padded(C);
    coeffs(0, C, sg.data(), sgd.data(), A.data(), B.data(), Cc.data());
    if (!sweep) return;
    if (g_gap == 0) {
      map_all(op, s, sweep_mean, A.data(), B.data(), Cc.data());
      return;
    }
    at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        sample_dx(n, 0, C, sweep_mean, A.data(), B.data(), Cc.data());
      stream_fence();
    });
    return;
  }
  if (!s.rows && channel_parallel(s)) {
    // As in train_fwd: dx per block of channels while the block is in cache, unless x, g and
    // dx fit in the LLC together (s.resident), where one sweep over each thread's contiguous
    // planes after all sums (map_all) writes dx faster than the blocks' n-major runs.
    const bool fuse = !(s.resident && g_gap == 0);
    std::vector<float> A_all, B_all, C_all;  // every channel's coefficients (no fusion)
    if (!fuse) A_all = padded(C), B_all = padded(C), C_all = padded(C);
    const int nt = at::get_num_threads();
    const int64_t cb = channel_block(s, 2 * sizeof(T), (C + nt - 1) / nt);
    at::parallel_for(0, C, grain_for(2 * s.m()), [&](int64_t c0, int64_t c1) {
      std::vector<double> sg(cb), sgd(cb);
      std::vector<float> A(cb), B(cb), Cc(cb);
      for (int64_t b0 = c0; b0 < c1; b0 += cb) {
        const int64_t nb = std::min(cb, c1 - b0);
        std::fill(sg.begin(), sg.end(), 0.0);
        std::fill(sgd.begin(), sgd.end(), 0.0);
        block_reduce(s, b0, nb, sums, mean + b0, sg.data(), sgd.data());
        if (!fuse) {  // dx comes in map_all, after every block
          coeffs(b0, nb, sg.data(), sgd.data(), &A_all[b0], &B_all[b0], &C_all[b0]);
          continue;
        }
        coeffs(b0, nb, sg.data(), sgd.data(), A.data(), B.data(), Cc.data());
        if (!sweep) continue;
        for (int64_t n = 0; n < s.N; ++n)
          sample_dx(n, b0, nb, sweep_mean + b0, A.data(), B.data(), Cc.data());
      }
      stream_fence();
    });
    if (!fuse && sweep) map_all(op, s, sweep_mean, A_all.data(), B_all.data(), C_all.data());
    return;
  }
  TORCH_INTERNAL_ASSERT(g_gap == 0, "bnlab kernels: a strided gradient on the split path");
  std::vector<float> mu = padded(C), A = padded(C), B = padded(C), Cc = padded(C);
  for (int64_t c = 0; c < C; ++c) mu[c] = mean[c];
  if (!s.rows) {
    for (int64_t c = 0; c < C; ++c) {
      double sg = 0.0, sgd = 0.0;
      const vf muv = splat(mean[c]);
      par_sums(
          s.N, grain_for(2 * s.S),
          [&](int64_t n0, int64_t n1, double& a, double& b_) {
            planar_reduce(
                s, c, n0, n1,
                [&](int64_t p) {
                  return Sums{op.x + p, op.g + p, op.mask ? op.mask + p : nullptr, muv};
                },
                a, b_);
          },
          sg, sgd);
      coeffs(c, 1, &sg, &sgd, &A[c], &B[c], &Cc[c]);
    }
  } else {
    std::vector<double> sg, sgd;
    const float* mp = mu.data();
    rows_reduce(
        s.m(), C, [&](int64_t cv) { return Sums{op.x, op.g, op.mask, load(mp + cv)}; }, sg, sgd);
    coeffs(0, C, sg.data(), sgd.data(), A.data(), B.data(), Cc.data());
  }
  if (!sweep) return;
  for (int64_t c = 0; c < C; ++c) mu[c] = sweep_mean[c];
  map_all(op, s, mu.data(), A.data(), B.data(), Cc.data());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_train_fwd(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, double eps, const c10::optional<at::Tensor>& residual,
    bool relu, bool save_mask) {
  check_dtype(input);
  Prepared p = prepare(input);
  const at::Tensor& x = p.x;
  TORCH_CHECK(p.s.m() > 0, "bnlab kernels: training needs at least one value per channel");
  p.s.nt = stream_outputs(x, 2, p.s);
  const int64_t C = p.s.C;
  at::Tensor y = at::empty_like(x);
  at::Tensor z = (residual.has_value() && residual->defined()) ? like(*residual, x) : at::Tensor();
  p.s.resident = cache_resident(x, z.defined() ? 3 : 2);
  at::Tensor mask = (relu && save_mask) ? at::empty_like(x, x.options().dtype(at::kByte))
                                        : empty_bytes(x);
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor w = per_channel(weight, C, 1.f, "weight"), b = per_channel(bias, C, 0.f, "bias");
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    with_epilogue<scalar_t>(z, relu, mask, [&](const auto& e) {
      train_fwd<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p.s,
                          w.data_ptr<float>(), b.data_ptr<float>(), static_cast<float>(eps), e,
                          mean.data_ptr<float>(), var.data_ptr<float>());
    });
  });
  return {y, mean, var, mask};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_bwd(
    const at::Tensor& grad_y, const at::Tensor& input, const at::Tensor& mean_in,
    const at::Tensor& var_in, const c10::optional<at::Tensor>& weight, double eps,
    const c10::optional<at::Tensor>& mask_in, bool training, bool need_dx, bool need_dz) {
  check_dtype(input);
  Prepared p = prepare(input);
  const at::Tensor& x = p.x;
  const int64_t C = p.s.C;
  p.s.nt = stream_outputs(x, 3, p.s);
  p.s.resident = cache_resident(x, need_dz ? 4 : 3);
  const int64_t g_gap = planar_grad_gap(grad_y, x, p.s);
  at::Tensor g = g_gap > 0 ? grad_y : like(grad_y, x);
  at::Tensor mask = (mask_in.has_value() && mask_in->defined() && mask_in->numel() > 0)
                        ? like(*mask_in, x, at::kByte)
                        : at::Tensor();
  at::Tensor mean = as_float32(mean_in), var = as_float32(var_in);
  at::Tensor w = per_channel(weight, C, 1.f, "weight");
  at::Tensor dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dz = need_dz ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor dw = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor db = at::empty({C}, x.options().dtype(at::kFloat));
  // Evaluation mode: dx = g'·γ·invstd needs no μ, and torch's stays finite where the running
  // mean is not; the sweep's (x − μ)·0 would be NaN there, so it reads 0 for such channels
  // (dγ's sums keep the real μ, as torch's).
  const float* mp = mean.data_ptr<float>();
  std::vector<float> finite_mean;
  if (!training && !std::all_of(mp, mp + C, [](float v) { return std::isfinite(v); })) {
    finite_mean = padded(C);
    for (int64_t c = 0; c < C; ++c) finite_mean[c] = std::isfinite(mp[c]) ? mp[c] : 0.f;
  }
  const float* sweep_mp = finite_mean.empty() ? mp : finite_mean.data();
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    with_dx_op<scalar_t>(
        x.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
        mask.defined() ? mask.data_ptr<uint8_t>() : nullptr,
        need_dx ? dx.data_ptr<scalar_t>() : nullptr, need_dz ? dz.data_ptr<scalar_t>() : nullptr,
        p.s.nt, [&](const auto& op) {
          backward(op, p.s, mp, sweep_mp, var.data_ptr<float>(), w.data_ptr<float>(),
                   static_cast<float>(eps), training, dw.data_ptr<float>(), db.data_ptr<float>(),
                   g_gap);
        });
  });
  return {dx, dw, db, dz};
}

std::tuple<at::Tensor, at::Tensor> bn_eval_fwd(
    const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps,
    const c10::optional<at::Tensor>& residual, bool relu, bool save_mask) {
  check_dtype(input);
  Prepared p = prepare(input);
  const at::Tensor& x = p.x;
  const int64_t C = p.s.C;
  p.s.nt = stream_outputs(x, 2, p.s);
  at::Tensor y = at::empty_like(x);
  at::Tensor z = (residual.has_value() && residual->defined()) ? like(*residual, x) : at::Tensor();
  at::Tensor mask = (relu && save_mask) ? at::empty_like(x, x.options().dtype(at::kByte))
                                        : empty_bytes(x);
  if (x.numel() == 0) return {y, mask};
  at::Tensor rm = per_channel(running_mean, C, 0.f, "running_mean");
  at::Tensor rv = per_channel(running_var, C, 1.f, "running_var");
  at::Tensor w = per_channel(weight, C, 1.f, "weight"), b = per_channel(bias, C, 0.f, "bias");
  std::vector<float> mu = padded(C), scale = padded(C), shift = padded(C);
  eval_params_n(C, rm.data_ptr<float>(), rv.data_ptr<float>(), w.data_ptr<float>(),
                b.data_ptr<float>(), static_cast<float>(eps), mu.data(), scale.data(),
                shift.data());
  dispatch(x, [&](auto tag) {
    using scalar_t = decltype(tag);
    with_epilogue<scalar_t>(z, relu, mask, [&](const auto& e) {
      normalize_all<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), p.s, mu.data(),
                              scale.data(), shift.data(), e);
    });
  });
  return {y, mask};
}

}  // namespace bnk

TORCH_LIBRARY(bnlab, m) {
  m.def(
      "bn_train_fwd(Tensor input, Tensor? weight, Tensor? bias, float eps, Tensor? residual, "
      "bool relu, bool save_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_bwd(Tensor grad_y, Tensor input, Tensor mean, Tensor var, Tensor? weight, float eps, "
      "Tensor? mask, bool training, bool need_dx, bool need_dz) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "bn_eval_fwd(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
      "Tensor? bias, float eps, Tensor? residual, bool relu, bool save_mask) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("bn_train_fwd", &bnk::bn_train_fwd);
  m.impl("bn_bwd", &bnk::bn_bwd);
  m.impl("bn_eval_fwd", &bnk::bn_eval_fwd);
}
