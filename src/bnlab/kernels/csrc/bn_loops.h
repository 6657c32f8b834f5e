// The three BN passes over the two layouts: forward statistics + normalize, backward
// reductions + dx, and the normalize-only sweep that inference and the split paths share.
#pragma once

#include "bn_kernels.h"
#include "bn_rows.h"

namespace bnk {

// Sums over items [i0, i1) in parallel with per-thread partials combined in thread order.
template <class F>
inline void par_sums(int64_t n_items, int64_t grain, const F& f, double& s1, double& s2) {
  const int nt = at::get_num_threads();
  std::vector<double> part(2 * static_cast<size_t>(nt), 0.0);
  at::parallel_for(0, n_items, grain, [&](int64_t i0, int64_t i1) {
    const int t = at::get_thread_num();
    double a = 0.0, b = 0.0;
    f(i0, i1, a, b);
    part[2 * t] += a;
    part[2 * t + 1] += b;
  });
  s1 = s2 = 0.0;
  for (int t = 0; t < nt; ++t) {
    s1 += part[2 * t];
    s2 += part[2 * t + 1];
  }
}

// ---- planar (N, C, S) ----------------------------------------------------------------------
// Σ over the planes n in [n0, n1) of channel c; op(base) gives the per-plane reduction functor.
template <class MakeOp>
inline void planar_reduce(const Shape& s, int64_t c, int64_t n0, int64_t n1, const MakeOp& make,
                          double& s1, double& s2) {
  Acc A;
  int64_t cnt = 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t plane = (n * s.C + c) * s.S;
    for (int64_t off = 0; off < s.S; off += BLOCK) {
      const int64_t len = std::min(BLOCK, s.S - off);
      const auto op = make(plane + off);
      reduce_seg(
          len, A, [&](int64_t i, vf& a, vf& b) { op.full(i, a, b); },
          [&](int64_t i, int n_, vf& a, vf& b) { op.part(i, n_, a, b); });
      cnt += len;
      if (cnt >= BLOCK) {
        A.flush(s1, s2);
        cnt = 0;
      }
    }
  }
  A.flush(s1, s2);
}

// A run of `count` consecutive planes from plane p0 (plane i at i·S); the k-th plane of the run
// uses the per-channel parameters at index (j0 + k) mod nc. Everything comes by value and the
// channel index is counted, not divided: with 7x7 planes the per-plane set-up is as long as the
// plane's own loop, and a Shape read through a reference (reloaded after every store, which
// might alias) or an i / C per plane made these passes 1.5-2x slower.
template <class Op>
inline void planes_map(const Op op, int64_t S, int64_t p0, int64_t count, int64_t j0, int64_t nc,
                       const float* mean, const float* A, const float* B, const float* Cc) {
  int64_t j = j0;
  for (int64_t k = 0; k < count; ++k) {
    const vf mu = splat(mean[j]), va = splat(A[j]), vb_ = splat(B[j]), vc = splat(Cc[j]);
    const int64_t p = (p0 + k) * S;
    map_seg_pointwise(
        S, [&](int64_t i) { op.at(p + i, mu, va, vb_, vc); },
        [&](int64_t i, int n_) { op.at_n(p + i, n_, mu, va, vb_, vc); });
    if (++j == nc) j = 0;
  }
}

// Planes of S > W values that do not end on a vector boundary (7x7, 14x14 with 16 lanes) are
// normalized on the tensor's vector grid instead of plane by plane (normalize_all): runs of
// whole groups of G planes, G·S a multiple of W, so every vector is loaded and stored whole
// and aligned; a vector that straddles two planes is computed with both planes' parameters
// and blended. Plane by plane, 3 of every 4 vectors of a 7x7 plane crossed a cache line and
// each plane ended in an overlapping vector. Interleaved A/B runs at 2 threads (6 each):
// inference on (32, 512, 7, 7), (32, 256, 14, 14) and (32, 2048, 7, 7) took 4-12% less time,
// the cache-resident training forward 0-10% less. The backward's dx on the grid was within ±6%
// while dx was written per channel block; in the one-sweep dx of cache-resident tensors
// (backward in bn_ops.cpp) it took 0.90-0.99x the time on 7x7 planes, 0.99-1.00x on 14x14
// (two in-process A/B runs). (Also tried, and slower: the statistics on the grid, summed down
// the samples with one accumulator per vector position, 6-25% slower on 7x7 and 14x14 planes;
// and no faster, plane by plane on the grid with each plane's own accumulators, a straddling
// vector masked into both planes' sums: 0.97-1.00x the time in two A/B runs of the training
// forward on 7x7 and 14x14 planes, so misaligned loads do not bound the statistics.)

// Planes per group: the least G with G·S a multiple of W, or 0 where the plane walk is used.
inline int64_t grid_group(int64_t S) {
  if (S <= W || S % W == 0) return 0;
  int64_t a = S, b = W;
  while (b) {
    const int64_t t = a % b;
    a = b;
    b = t;
  }
  return W / a;
}

// planes_map on the grid: p0·S and count·S must be multiples of W. A vector that straddles two
// planes takes each lane's parameters from its own plane.
template <class Op>
inline void planes_map_grid(const Op op, int64_t S, int64_t p0, int64_t count, int64_t j0,
                            int64_t nc, const float* mean, const float* A, const float* B,
                            const float* Cc) {
  int64_t j = j0, o = p0 * S;
  vf mu = splat(mean[j]), va = splat(A[j]), vb_ = splat(B[j]), vc = splat(Cc[j]);
  for (int64_t k = 0; k < count; ++k) {
    const int64_t end = (p0 + k + 1) * S;
    for (; o + W <= end; o += W) op.at(o, mu, va, vb_, vc);
    if (++j == nc) j = 0;
    const vf mu2 = splat(mean[j]), va2 = splat(A[j]), vb2 = splat(B[j]), vc2 = splat(Cc[j]);
    if (o < end) {
      const vi m = lanes_lt(static_cast<int>(end - o));
      op.at(o, m ? mu : mu2, m ? va : va2, m ? vb_ : vb2, m ? vc : vc2);
      o += W;
    }
    mu = mu2;
    va = va2;
    vb_ = vb2;
    vc = vc2;
  }
}

// Whether to run whole channels per thread (fused) or split each channel over threads.
inline bool channel_parallel(const Shape& s) {
  const int nt = at::get_num_threads();
  return nt == 1 || s.C >= 4 * nt || s.C % nt == 0 || s.N * s.S * s.C <= GRAIN;
}

// Channels per block. A block is read n-major: for each n its planes are one contiguous run of
// cb·S values, long enough (≥ RUN bytes) for the hardware prefetchers — reading one channel's
// planes alone jumps C·S·4 bytes after every S values, which costs 1.5-2x in time on its own.
// The block's slab (N·cb·S values of `per_elem` bytes) is bounded by SLAB so it is still in
// L2/L3 when the elementwise sweep reads it again. On 7x7 planes a forward block of 335
// channels keeps 42 KB of accumulators (block_reduce), more than the 32 KB L1 of the AMD EPYC
// VM these runs were measured on holds; capping blocks at
// 128 channels (16 KB) cost the training forward 6% on (32, 2048, 7, 7), (128, 512, 7, 7) and
// (64, 1024, 7, 7) in an A/B run (and saved 4% on (32, 512, 7, 7)), and RUN = 128 KB measured
// 0.97-1.04x: both dropped. So was SLAB = 512 KB (L2-sized, runs ≥ 16 KB): the backward took
// 1.10-1.18x the time on (32, 128, 28, 28) and 7x7 planes, and with it cache-resident forwards
// normalized per block instead of in one sweep took 1.03-1.43x (docs/benchmarks.md).
inline int64_t channel_block(const Shape& s, int64_t per_elem, int64_t c_per_thread) {
  constexpr int64_t RUN = 64 * 1024, SLAB = 4 * 1024 * 1024;
  const int64_t plane = std::max<int64_t>(1, s.S * per_elem);
  const int64_t want = (RUN + plane - 1) / plane;
  const int64_t fit = std::max<int64_t>(1, SLAB / std::max<int64_t>(1, s.N * plane));
  return std::max<int64_t>(1, std::min({want, fit, c_per_thread}));
}

// Planes up to this size are summed with one accumulator pair per channel (block_reduce).
constexpr int64_t SMALL_PLANE = 1024;

// One plane of S = full·W + rem values at op's position, its vectors alternating between two
// accumulator pairs: with one, a 28x28 plane is a chain of 49 dependent FMAs, and the statistics
// alone (a harness timing just this walk, 2 threads) took 0.52x a copy of the tensor against
// 0.39x with two (x.sum(): 0.39x); the forward on (32, 128, 28, 28) took 3-14% less time in
// four interleaved A/B runs (other shapes: within the ±6% noise). One pair for 7x7 planes,
// which saves the two adds of the merge, measured 0.96-1.03x: dropped.
template <class Op>
__attribute__((always_inline)) inline void plane_sums(const Op& op, int64_t full, int64_t rem,
                                                      int64_t S, vi last, vf& a, vf& b, vf& a1,
                                                      vf& b1) {
  int64_t v = 0;
  for (; v + 2 <= full; v += 2) {
    op.full(v * W, a, b);
    op.full(v * W + W, a1, b1);
  }
  if (v < full) op.full(v * W, a1, b1);
  if (rem && full) op.tail(S - W, last, a, b);
  else if (rem) op.part(0, static_cast<int>(rem), a, b);
}

// Samples whose planes block_reduce walks side by side, for planes of up to
// SIDE_BY_SIDE_PLANE values.
constexpr int SAMPLES_AT_ONCE = 4;
constexpr int64_t SIDE_BY_SIDE_PLANE = 256;

// The nb consecutive planes of S ≤ SMALL_PLANE values that each of the K ops starts at (the
// same channels in K consecutive samples), plane j of every op (shift shift[j]) summed into
// va[j], vb[j] (see block_reduce). The ops walk by value from plane to plane (`advance`,
// `shift`): rebuilding them per plane through the caller's closure kept more values live than
// there are registers, and GCC spilled them (the 7x7 backward sums ran 1.4x slower than the
// same loop written out by hand).
//   K = 4 samples at a time loads and stores each channel's accumulator pair once per four
// planes, and gives each thread four runs through memory at once. Against one sample at a time
// (python -m bnlab.kernels.ab, 2 threads, 9-13 rounds, five runs), time of the new over the
// old on 7x7 and 14x14 planes: the training forward 0.85-1.02x; the backward 0.81-0.94x on 7x7
// planes, 0.84-1.03x on (32, 256, 14, 14); the BN+ReLU backward 0.93-0.97x. On 28x28 planes,
// whose accumulator traffic is small beside the plane, it took 1.03-1.10x in the backward on
// (32, 256, 28, 28), (64, 128, 28, 28) and (64, 64, 28, 28), so larger planes keep one sample
// at a time (SIDE_BY_SIDE_PLANE). K = 2 gained less in the forward (0.89-1.08x); K = 8 took
// 0.93-1.19x K = 4's time (the backward 1.02-1.19x). The software prefetch of the one-sample
// walk (lines 1024 values ahead, 0.88-0.98x on 7x7 tensors of 12.8 MB or more) then measured
// 0.96-1.03x in two runs: removed.
//   Also tried, with one sample at a time, and dropped: walking 8 channels at a time down the
// samples, their accumulators in registers (25% faster in a scratch harness on (32, 2048, 7,
// 7), but 0.93-1.08x in the forward and 0.88-1.02x in the backward); folding every 16 planes'
// vectors into one by shuffles (lane k: plane k's sum), so one accumulator pair serves 16
// channels: 0.82-0.92x on 7x7 planes in the forward, 0.78-0.99x in the backward.
template <int K, class Op>
__attribute__((always_inline)) inline void small_planes_sums(const Op* ops, const float* shift,
                                                             int64_t nb, int64_t S, vi last,
                                                             vf* va, vf* vb, const char* use) {
  const int64_t full = S / W, rem = S % W;
  Op op[K];
  for (int k = 0; k < K; ++k) op[k] = ops[k];
  for (int64_t j = 0; j < nb; ++j) {
    if (!use || use[j]) {
      vf a = va[j], b = vb[j], a1{}, b1{};
      op[0].shift(shift[j]);
      plane_sums(op[0], full, rem, S, last, a, b, a1, b1);
#pragma GCC unroll 4
      for (int k = 1; k < K; ++k) {
        op[k].shift(shift[j]);
        vf c{}, d{}, c1{}, d1{};
        plane_sums(op[k], full, rem, S, last, c, d, c1, d1);
        a1 += c + c1;
        b1 += d + d1;
      }
      va[j] = a + a1;
      vb[j] = b + b1;
    }
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) op[k].advance(S);
  }
}
// The same, not inlined, for reductions that read a ReLU mask: inlined into the backward
// driver, GCC kept one of their accumulators on the stack, a store-to-load chain per vector
// that made the BN+ReLU backward 1.5x slower than the plain one on 28x28 planes. (Outlining the
// plain reductions too cost them ~5%.)
template <int K, class Op>
__attribute__((noinline)) void small_planes_sums_outlined(const Op* ops, const float* shift,
                                                          int64_t nb, int64_t S, vi last, vf* va,
                                                          vf* vb, const char* use) {
  small_planes_sums<K>(ops, shift, nb, S, last, va, vb, use);
}

// Σ over all planes of the channels [c0, c0 + nb), n-major; make(p, n) gives the reduction
// functor at offset p (in sample n), and channel c0 + j is summed about shift[j] (μ or a sample
// mean); sums land in s1[j], s2[j]; only channels with use[j] (or all if use is null) are
// read.
template <class MakeOp>
inline void block_reduce(const Shape& s, int64_t c0, int64_t nb, const MakeOp& make,
                         const float* shift, double* s1, double* s2,
                         const char* use = nullptr, int64_t n_begin = 0, int64_t n_end = -1) {
  if (n_end < 0) n_end = s.N;
  if (s.S <= SMALL_PLANE) {
    // One accumulator pair per channel kept across planes (two within a plane, see
    // small_planes_sums): consecutive planes belong to different channels, so there is no
    // chain from plane to plane for the out-of-order core to wait on, and moving 2 instead
    // of 8 vectors in and out per plane halved the work (now per SAMPLES_AT_ONCE planes). A
    // plane's partial last vector is read as the full vector that ends the plane, with the
    // lanes of the vector before it masked off (a masked partial load here measured 1.45x
    // slower on 7x7 planes).
    std::vector<vf> va(nb), vb_(nb);
    const int64_t S = s.S;
    const vi last = ~lanes_lt(static_cast<int>(W - S % W));
    int64_t cnt = 0;
    auto flush = [&] {
      for (int64_t j = 0; j < nb; ++j) {
        s1[j] += hsum(va[j]);
        s2[j] += hsum(vb_[j]);
        va[j] = vb_[j] = vf{};
      }
    };
    using Op = decltype(make(int64_t{0}, int64_t{0}));
    // Samples [n, n + K) side by side (small_planes_sums).
    auto walk = [&](int64_t n, auto k_) {
      constexpr int K = decltype(k_)::value;
      Op ops[K];
      for (int k = 0; k < K; ++k) ops[k] = make(((n + k) * s.C + c0) * S, n + k);
      if constexpr (Op::kMasked)
        small_planes_sums_outlined<K>(ops, shift, nb, S, last, va.data(), vb_.data(), use);
      else
        small_planes_sums<K>(ops, shift, nb, S, last, va.data(), vb_.data(), use);
    };
    const int64_t at_once = S <= SIDE_BY_SIDE_PLANE ? SAMPLES_AT_ONCE : 1;
    for (int64_t n = n_begin; n < n_end;) {
      const int64_t k = n + at_once <= n_end ? at_once : 1;
      if (k > 1) walk(n, std::integral_constant<int, SAMPLES_AT_ONCE>{});
      else walk(n, std::integral_constant<int, 1>{});
      n += k;
      // ≤ (BLOCK + SAMPLES_AT_ONCE·SMALL_PLANE) / W terms per lane in float
      if ((cnt += k * S) >= BLOCK) {
        flush();
        cnt = 0;
      }
    }
    flush();
    return;
  }
  std::vector<int64_t> cnt(nb, 0);
  std::vector<Acc> acc(nb);
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t j = 0; j < nb; ++j) {
      if (use && !use[j]) continue;
      const int64_t plane = (n * s.C + c0 + j) * s.S;
      Acc A = acc[j];
      for (int64_t off = 0; off < s.S; off += BLOCK) {
        const int64_t len = std::min(BLOCK, s.S - off);
        auto op = make(plane + off, n);
        op.shift(shift[j]);
        reduce_seg(
            len, A, [&](int64_t i, vf& a, vf& b) { op.full(i, a, b); },
            [&](int64_t i, int n_, vf& a, vf& b) { op.part(i, n_, a, b); });
        cnt[j] += len;
        if (cnt[j] >= BLOCK) {
          A.flush(s1[j], s2[j]);
          cnt[j] = 0;
        }
      }
      acc[j] = A;
    }
  }
  for (int64_t j = 0; j < nb; ++j) acc[j].flush(s1[j], s2[j]);
}

// block_reduce over all C channels at once, each thread on its own contiguous range of samples,
// into per-thread double sums added in thread order (deterministic for a fixed thread count).
// For tensors that fit in the LLC, whose normalize or dx sweep comes after all the sums anyway:
// each thread then reads its own samples whole instead of a 64 KB run per block and sample.
// Where the C accumulator pairs fit in L1 (C ≤ 256 with 16 lanes), interleaved A/B runs in one
// process at 2 threads (python -m bnlab.kernels.ab, 9 rounds, three runs) gave the training
// forward on (32, 256, 14, 14) 6-7% less time, on (32, 128, 28, 28) 2-26% less, on
// (16, 64, 28, 28) 1% more to 6% less, and the backward on (32, 256, 14, 14) and (16, 64, 28, 28)
// 5-7% less. With more channels the pairs spill from L1 and nothing was gained: (32, 512, 7, 7)
// and (32, 2048, 7, 7) measured 0.97-1.02x, so they keep the channel blocks.
inline bool samples_split(const Shape& s) {
  constexpr int64_t L1D = 32 << 10;  // per core on the AMD EPYC VM (Zen 4) this was tuned on
  return s.resident && !s.rows && s.S <= SMALL_PLANE && s.N >= at::get_num_threads() &&
         s.C * 2 * static_cast<int64_t>(sizeof(vf)) <= L1D;
}
template <class MakeOp>
inline void samples_reduce(const Shape& s, const MakeOp& make, const float* shift, double* s1,
                           double* s2, const char* use = nullptr) {
  const int nt = at::get_num_threads();
  const int64_t C = s.C;
  std::vector<double> part(2 * static_cast<size_t>(nt) * C, 0.0);
  at::parallel_for(0, s.N, 1, [&](int64_t n0, int64_t n1) {
    double* d1 = part.data() + 2 * static_cast<size_t>(at::get_thread_num()) * C;
    block_reduce(s, 0, C, make, shift, d1, d1 + C, use, n0, n1);
  });
  for (int t = 0; t < nt; ++t) {
    const double* d1 = part.data() + 2 * static_cast<size_t>(t) * C;
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += d1[c];
      s2[c] += d1[C + c];
    }
  }
}

// Per-channel parameters padded to whole vectors, so tails load full vectors.
inline std::vector<float> padded(int64_t C) { return std::vector<float>((C + W - 1) / W * W, 0.f); }

// ---- the normalize / dx sweeps of both layouts (the rows layout's loops are in bn_rows.h) --
// A planar sweep over all N·C planes: whole groups of G planes on the vector grid,
// grid(p0, count), then the last P mod G planes (or, G = 0, all of them) plane by plane,
// planes(p0, count); each thread's range ends with a store fence.
template <class Grid, class Planes>
void planar_sweep(const Shape& s, const Grid& grid, const Planes& planes) {
  const int64_t P = s.N * s.C, G = grid_group(s.S), ng = G > 0 ? P / G : 0;
  at::parallel_for(0, ng, grain_for(G * s.S), [&](int64_t g0, int64_t g1) {
    grid(g0 * G, (g1 - g0) * G);
    stream_fence();
  });
  at::parallel_for(ng * G, P, grain_for(s.S), [&](int64_t i0, int64_t i1) {
    planes(i0, i1 - i0);
    stream_fence();
  });
}

template <class Op>
void map_all(const Op& op, const Shape& s, const float* mean, const float* A, const float* B,
             const float* Cc) {
  if (!s.rows) {
    planar_sweep(
        s,
        [&](int64_t p0, int64_t n) {
          planes_map_grid(op, s.S, p0, n, p0 % s.C, s.C, mean, A, B, Cc);
        },
        [&](int64_t p0, int64_t n) { planes_map(op, s.S, p0, n, p0 % s.C, s.C, mean, A, B, Cc); });
    return;
  }
  const bool runs = rows_runs_pay(s, sizeof(typename Op::scalar), Op::kRunsFromC);
  at::parallel_for(0, s.m(), grain_for(s.C), [&](int64_t r0, int64_t r1) {
    rows_map_params(op, s.C, r0, r1, mean, A, B, Cc, runs);
    stream_fence();
  });
}

template <typename T, class E>
void normalize_all(const T* x, T* y, const Shape& s, const float* mean, const float* scale,
                   const float* shift, const E& e) {
  map_all(NormOp<T, E>{x, y, e, s.nt}, s, mean, scale, shift, shift);
}

}  // namespace bnk
