// bnlab CPU batch-norm kernels: the loops (Ioffe & Szegedy 2015, Alg. 1 and its backward).
//
// Two layouts cover every dense input:
//   * planar  (N, C, S) with S > 1: element (n, c, s) at (n*C + c)*S + s  (contiguous NCHW);
//   * rows    (M, C) with M = N*S:   element (r, c) at r*C + c            (channels_last, (N, C)).
//
// Statistics. One read gives shifted sums Σ(x−K), Σ(x−K)² with K a sample mean of the channel,
// accumulated in 4 independent W-lane float accumulators (latency hiding) and flushed to double
// every BLOCK elements, so the float part never sums more than a few hundred values per lane.
// With K close to μ the shifted formula σ² = Σ(x−K)²/m − (Σ(x−K)/m)² does not cancel; when it
// would (more than 2 bits lost, e.g. an outlier as K) a second, exact pass Σ(x−μ)² runs. This is
// the "shifted data" algorithm, never E[x²] − E[x]².
//
// Fusion. Planar inputs with enough channels run one channel at a time per thread: statistics,
// then normalize (or, backward, the two reductions, then dx) on the channel's N·S slab while it
// is still in L2/L3 — 2T of DRAM traffic forward, 3T backward (a forward whose x and y fit in
// the LLC together has no DRAM traffic to save and normalizes in one sweep after all blocks'
// statistics, see train_fwd; with small planes and C ≤ 256 those statistics are summed over all
// channels at once, each thread on its own samples). Inputs with few channels split each channel
// over threads (two-level reduction); rows inputs reduce over register tiles of rows x channel
// vectors, or runs of whole rows when rows are wide, into per-thread sums, then normalize in a
// second sweep. Outputs larger than the cache are written with streaming stores. All reductions
// combine in a fixed order, so results are deterministic for a fixed thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace bnk {

constexpr int64_t BLOCK = 4096;      // elements per float block before flushing into double
constexpr int64_t GRAIN = 1 << 15;   // elements per task below which a loop stays serial

// Items per task for items of per_item elements (at least one).
inline int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, GRAIN / std::max<int64_t>(1, per_item));
}

struct Shape {
  int64_t N, C, S;
  bool rows;
  bool nt = false;  // write outputs with streaming stores (see stream_outputs in bn_tensors.h)
  bool resident = false;  // the pass's tensors fit in the LLC (cache_resident, bn_tensors.h)
  int64_t m() const { return N * S; }  // values per channel
};

// What the fused variants add after normalizing: +z (residual), ReLU, and the saved mask. The
// choices are template parameters, so each combination compiles to its own branch-free loop.
template <typename T, bool Z, bool R, bool M>
struct Epilogue {
  static_assert(!M || R, "a mask is only saved for ReLU");
  const T* z = nullptr;     // residual, same layout as x (BN+add+ReLU)
  uint8_t* mask = nullptr;  // 1 where the output is > 0 (saved for backward)
  template <int N = W>
  inline vf apply(vf y, int64_t i, int n = W) const {
    if constexpr (Z) y += (N == W) ? load(z + i) : load_n(z + i, n);
    if constexpr (R) {
      const vi pos = ~(y <= 0.0f);  // NaN stays NaN (and passes its gradient), as torch.relu
      y = keep(y, pos);
      if constexpr (M) {
        if constexpr (N == W) store_mask(mask + i, pos);
        else store_mask_n(mask + i, pos, n);
      }
    }
    return y;
  }
};

// ---- accumulators ------------------------------------------------------------------------
struct Acc {
  vf a[4], b[4];
  Acc() { clear(); }
  void clear() {
    for (int i = 0; i < 4; ++i) a[i] = b[i] = vf{};
  }
  void flush(double& s1, double& s2) {
    s1 += hsum((a[0] + a[1]) + (a[2] + a[3]));
    s2 += hsum((b[0] + b[1]) + (b[2] + b[3]));
    clear();
  }
};

// Σ over one contiguous segment [0, L): full(i, a, b) per full vector, part(i, n, a, b) tail.
template <class Full, class Part>
inline void reduce_seg(int64_t L, Acc& A, Full&& full, Part&& part) {
  int64_t i = 0;
  for (; i + 4 * W <= L; i += 4 * W) {
    full(i, A.a[0], A.b[0]);
    full(i + W, A.a[1], A.b[1]);
    full(i + 2 * W, A.a[2], A.b[2]);
    full(i + 3 * W, A.a[3], A.b[3]);
  }
  for (; i + W <= L; i += W) full(i, A.a[0], A.b[0]);
  if (i < L) part(i, static_cast<int>(L - i), A.a[1], A.b[1]);
}

// Elementwise passes over a segment [0, L) (each output from the inputs at the same index):
// full(i) per vector; a segment of at least W ends with one full vector at L − W, rewriting a
// few outputs with the same values, instead of a masked part(i, n) (measured on 7x7 planes at
// 2 threads: eval 1.0-1.07x copy instead of 1.2-1.6x, noisy).
template <class Full, class Part>
inline void map_seg_pointwise(int64_t L, Full&& full, Part&& part) {
  if (L < W) {
    if (L > 0) part(0, static_cast<int>(L));
    return;
  }
  int64_t i = 0;
  for (; i + W <= L; i += W) full(i);
  if (i < L) full(L - W);
}

// ---- per-element pieces shared by the layouts ---------------------------------------------
// Shifted sums: a += (x − k), b += (x − k)².
template <typename T>
struct SumsOp {
  static constexpr bool kMasked = false;
  static constexpr int64_t kBytes = sizeof(T);  // bytes read per element index
  const T* x;
  vf k;
  void full(int64_t i, vf& a, vf& b) const {
    vf d = load(x + i) - k;
    a += d;
    b = fmadd(d, d, b);
  }
  void part(int64_t i, int n, vf& a, vf& b) const {
    vf d = keep(load_n(x + i, n) - k, lanes_lt(n));
    a += d;
    b = fmadd(d, d, b);
  }
  // A full vector of which only the lanes in m count (the end of a plane, read whole).
  void tail(int64_t i, vi m, vf& a, vf& b) const {
    vf d = keep(load(x + i) - k, m);
    a += d;
    b = fmadd(d, d, b);
  }
  static constexpr int64_t kLine = 64 / sizeof(T);  // elements per cache line
  void prefetch(int64_t i) const { __builtin_prefetch(x + i); }
  // For block_reduce's small-plane walk: move d elements on; set the shift.
  void advance(int64_t d) { x += d; }
  void shift(float k_) { k = splat(k_); }
};

// Backward sums: a += g', b += g'·(x − μ), g' = g masked by the ReLU mask.
template <typename T, bool MASK>
struct BwdSumsOp {
  static constexpr bool kMasked = MASK;
  static constexpr int64_t kBytes = 2 * sizeof(T) + (MASK ? 1 : 0);
  const T* x;
  const T* g;
  const uint8_t* mask;
  vf mu;
  void full(int64_t i, vf& a, vf& b) const {
    vf gg = load(g + i);
    if constexpr (MASK) gg = keep(gg, load_mask(mask + i));
    a += gg;
    b = fmadd(gg, load(x + i) - mu, b);
  }
  void part(int64_t i, int n, vf& a, vf& b) const {
    vf gg = keep(load_n(g + i, n), lanes_lt(n));
    if constexpr (MASK) gg = keep(gg, load_mask_n(mask + i, n));
    a += gg;
    b = fmadd(gg, keep(load_n(x + i, n) - mu, lanes_lt(n)), b);
  }
  void tail(int64_t i, vi m, vf& a, vf& b) const {
    vf gg = keep(load(g + i), m);
    if constexpr (MASK) gg = keep(gg, load_mask(mask + i));
    a += gg;
    b = fmadd(gg, keep(load(x + i) - mu, m), b);
  }
  static constexpr int64_t kLine = 64 / sizeof(T);
  void prefetch(int64_t i) const {
    __builtin_prefetch(x + i);
    __builtin_prefetch(g + i);
  }
  void advance(int64_t d) {
    x += d;
    g += d;
    if constexpr (MASK) mask += d;
  }
  void shift(float mu_) { mu = splat(mu_); }
};

// The elementwise sweeps as ops on one vector at offset i, given four per-channel parameter
// vectors: at(i, ...) for a whole vector, at_n(i, n, ...) for its first n lanes. planes_map,
// planes_map_grid and rows_map_params (bn_loops.h, bn_rows.h) walk them over either layout.
// kRunsFromC: the least channel count from which the rows layout's sweep walks four runs
// (rows_runs_pay).

// y = (x − μ)·scale + shift, then the epilogue: Alg. 1's normalize + scale and shift, and
// Alg. 2's inference transform with population statistics. The fourth parameter is unused.
template <typename T, class E>
struct NormOp {
  using scalar = T;
  static constexpr int64_t kRunsFromC = 1;
  const T* x;
  T* y;
  E e;
  bool nt;  // streaming stores for y
  void at(int64_t i, vf mu, vf sc, vf sh, vf) const {
    store_out(y + i, e.apply(fmadd(load(x + i) - mu, sc, sh), i), nt);
  }
  void at_n(int64_t i, int n, vf mu, vf sc, vf sh, vf) const {
    store_n(y + i, e.template apply<0>(fmadd(load_n(x + i, n) - mu, sc, sh), i, n), n);
  }
};

// dx = g'·A + (x − μ)·B + Cc, and dz = g' when asked (BN+add+ReLU).
template <typename T, bool MASK, bool DZ, bool DX>
struct DxOp {
  using scalar = T;
  static constexpr bool kMask = MASK;
  static constexpr int64_t kRunsFromC = 2048;
  const T* x;
  const T* g;
  const uint8_t* mask;
  T* dx;
  T* dz;
  bool nt;  // streaming stores for dx, dz
  void at(int64_t i, vf mu, vf A, vf B, vf Cc) const {
    vf gg = load(g + i);
    if constexpr (MASK) gg = keep(gg, load_mask(mask + i));
    if constexpr (DZ) store_out(dz + i, gg, nt);
    if constexpr (DX) store_out(dx + i, fmadd(gg, A, fmadd(load(x + i) - mu, B, Cc)), nt);
  }
  void at_n(int64_t i, int n, vf mu, vf A, vf B, vf Cc) const {
    vf gg = load_n(g + i, n);
    if constexpr (MASK) gg = keep(gg, load_mask_n(mask + i, n));
    if constexpr (DZ) store_n(dz + i, gg, n);
    if constexpr (DX) store_n(dx + i, fmadd(gg, A, fmadd(load_n(x + i, n) - mu, B, Cc)), n);
  }
};

// ---- statistics from double sums -------------------------------------------------------
inline float inv_std(float var, float eps) { return 1.0f / std::sqrt(var + eps); }
// From shifted sums s1 = Σ(x − K), s2 = Σ(x − K)² of channels [0, n): μ and σ², and in
// exact[c] whether channel c needs a second pass about μ (more than 2 bits lost to cancellation,
// or a negative/NaN σ²); returns whether any does. One loop of multiplications by 1/m that GCC
// vectorizes, as bwd_coeffs_n and scales_n below: called per channel, with two double
// divisions each, these epilogues (on one thread, after the parallel sums, in the rows layout)
// cost a visible share of small calls. Against the per-channel code,
// in one process (python -m bnlab.kernels.ab, 2 threads, two runs): the training forward took
// 0.92-0.95x the time on (256, 1024) and (60, 100), the backward 0.90-0.95x on those,
// (1024, 2048) and channels_last (32, 512, 7, 7); the other cases within noise.
inline bool from_shifted_n(int64_t n, const float* __restrict__ K, const double* __restrict__ s1,
                           const double* __restrict__ s2, double m, float* __restrict__ mean,
                           double* __restrict__ var, char* __restrict__ exact) {
  const double r = 1.0 / m;
  int any = 0;
  for (int64_t c = 0; c < n; ++c) {
    const double d = s1[c] * r, q = s2[c] * r;
    const double v = q - d * d;
    mean[c] = static_cast<float>(static_cast<double>(K[c]) + d);
    const int ex = (s2[c] > 0.0) & !(v > 0.25 * q);
    exact[c] = static_cast<char>(ex);
    any |= ex;
    var[c] = v > 0.0 ? v : 0.0;
  }
  return any != 0;
}
// The backward's per-channel coefficients (bn_ops.cpp, backward) from the sums sg = Σg' and
// sgd = Σg'(x−μ) of n channels: A = γ·invstd, B = −A·invstd²·sgd/m, Cc = −A·sg/m (0 in eval
// mode), dγ = invstd·sgd, dβ = sg, in one vectorizable loop (see from_shifted_n).
inline void bwd_coeffs_n(int64_t n, const double* __restrict__ sg, const double* __restrict__ sgd,
                         const float* __restrict__ var, const float* __restrict__ w, float eps,
                         double m, bool training, float* __restrict__ A, float* __restrict__ B,
                         float* __restrict__ Cc, float* __restrict__ dw, float* __restrict__ db) {
  const double r = 1.0 / m;
  for (int64_t c = 0; c < n; ++c) {
    const float inv = inv_std(var[c], eps), a = inv * w[c];
    A[c] = a;
    dw[c] = static_cast<float>(sgd[c] * inv);
    db[c] = static_cast<float>(sg[c]);
    B[c] = training ? static_cast<float>(-static_cast<double>(a) * inv * inv * sgd[c] * r) : 0.f;
    Cc[c] = training ? static_cast<float>(-static_cast<double>(a) * sg[c] * r) : 0.f;
  }
}
// From exact sums about the float mean μ_f: refine μ, σ² = Σ(x−μ_f)²/m − (Σ(x−μ_f)/m)².
inline void from_centered(double s1, double s2, double m, float& mean, double& var) {
  const double d = s1 / m;
  const double v = s2 / m - d * d;
  mean = static_cast<float>(static_cast<double>(mean) + d);
  var = v > 0.0 ? v : 0.0;
}

// γ/√(σ² + ε) and the float σ² for channels [0, n), in one vectorizable loop (see above).
inline void scales_n(int64_t n, const double* __restrict__ var, const float* __restrict__ w,
                     float eps, float* __restrict__ scale, float* __restrict__ var_f) {
  for (int64_t c = 0; c < n; ++c) {
    const float v = static_cast<float>(var[c]);
    scale[c] = inv_std(v, eps) * w[c];
    var_f[c] = v;
  }
}

// Inference's per-channel parameters (Alg. 2, step 11) from the buffers: μ = E[x],
// scale = γ/√(Var[x] + ε), shift = β, in one vectorizable loop. (Written inline with the
// buffers' pointers not known apart, it ran scalar, a sqrt and a divide per channel: inference
// on (2, 16384) took 2.15x the time, on (2, 1024) 1.27x; python -m bnlab.kernels.ab.)
inline void eval_params_n(int64_t n, const float* __restrict__ rm, const float* __restrict__ rv,
                          const float* __restrict__ w, const float* __restrict__ b, float eps,
                          float* __restrict__ mean, float* __restrict__ scale,
                          float* __restrict__ shift) {
  for (int64_t c = 0; c < n; ++c) {
    mean[c] = rm[c];
    scale[c] = inv_std(rv[c], eps) * w[c];
    shift[c] = b[c];
  }
}

// The shift K of a channel: the mean of its first n values (any K is correct; one near μ keeps
// the shifted sums from cancelling). A full vector is summed as a tree (4 dependent adds, not
// 16: with thousands of channels the serial chain was a few percent of a small-plane call).
template <typename T>
inline float sample_mean(const T* p, int64_t n, int64_t stride) {
#if defined(__AVX512F__)
  if (n == W && stride == 1) {
    vf v = load(p);
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    v += __builtin_shufflevector(v, v, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
    return v[0] / static_cast<float>(W);
  }
#endif
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) s += static_cast<float>(p[i * stride]);
  return n > 0 ? s / static_cast<float>(n) : 0.0f;
}

// Rows layout: K of every channel from the first min(M, 16) rows, a channel vector at a time;
// k is padded to whole vectors.
template <typename T>
inline void rows_sample_means(const T* x, int64_t M, int64_t C, float* k) {
  const int64_t n = std::min<int64_t>(M, 16);
  const float inv = n > 0 ? 1.0f / static_cast<float>(n) : 0.0f;
  for (int64_t cv = 0; cv < C; cv += W) {
    const int lanes = static_cast<int>(std::min<int64_t>(W, C - cv));
    vf a{};
    for (int64_t r = 0; r < n; ++r)
      a += lanes == W ? load(x + r * C + cv) : load_n(x + r * C + cv, lanes);
    const vf mean = a * inv;
    for (int i = 0; i < lanes; ++i) k[cv + i] = mean[i];
  }
}

}  // namespace bnk
