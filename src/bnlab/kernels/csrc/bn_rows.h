// The rows layout's (channels_last, (N, C)) loops: per-channel sums over register tiles of
// rows x channel vectors or over runs of whole rows, and the normalize and dx sweeps (the
// planar layout's loops and the drivers over both layouts are in bn_loops.h).
#pragma once

#include "bn_kernels.h"

namespace bnk {

// ---- rows (M, C) ---------------------------------------------------------------------------
// Rows per register tile. A tile is ROWS_TILE rows x (up to) 4 channel vectors whose 8
// accumulators stay in registers; the first column of tiles also prefetches the next tile's
// rows. Measured single-threaded on a 25.7 MB channels_last tensor: C = 64 reads at the speed
// of x.sum() (0.5 ms), against 1.5 ms for four rows per step with accumulators in memory.
constexpr int64_t ROWS_TILE = 32;

// Σ over rows [r0, r1) of NF full channel vectors at cv (plus a PART vector of `rem` lanes),
// added into the per-thread double sums d1, d2; row r + ROWS_TILE is prefetched if < pf_end.
template <int NF, bool PART, class MakeOp>
inline void rows_tile(const MakeOp& make, int64_t C, int64_t cv, int rem, int64_t r0, int64_t r1,
                      int64_t pf_end, double* d1, double* d2) {
  using Op = decltype(make(int64_t{0}));
  constexpr int NV = NF + (PART ? 1 : 0);
  Op ops[NV];
  vf a[NV], b[NV];
  // Fully unrolled so a[] and b[] live in registers: for rows_tile<3, true> GCC left the loops
  // rolled and kept all eight accumulators on the stack (channels_last C = 56/60 ran 10-18%
  // slower).
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    ops[j] = make(cv + j * W);
    a[j] = b[j] = vf{};
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t base = r * C + cv;
    if (r + ROWS_TILE < pf_end)
      for (int64_t l = 0; l < C; l += Op::kLine) ops[0].prefetch((r + ROWS_TILE) * C + l);
#pragma GCC unroll 4
    for (int j = 0; j < NF; ++j) ops[j].full(base + j * W, a[j], b[j]);
    if constexpr (PART) ops[NF].part(base + NF * W, rem, a[NF], b[NF]);
  }
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) {
    add_to_double(d1 + cv + j * W, a[j]);
    add_to_double(d2 + cv + j * W, b[j]);
  }
}

// The last (< 4) channel vectors of a row: nf full vectors and a partial one of `rem` lanes.
template <class MakeOp>
inline void rows_tile_tail(const MakeOp& make, int64_t C, int64_t cv, int nf, int rem,
                           int64_t r0, int64_t r1, int64_t pf_end, double* d1, double* d2) {
  auto go = [&](auto nf_c, auto part_c) {
    rows_tile<decltype(nf_c)::value, decltype(part_c)::value>(make, C, cv, rem, r0, r1, pf_end,
                                                              d1, d2);
  };
  using T_ = std::true_type;
  using F_ = std::false_type;
  using I0 = std::integral_constant<int, 0>;
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  switch (nf * 2 + (rem > 0)) {
    case 1: go(I0{}, T_{}); break;
    case 2: go(I1{}, F_{}); break;
    case 3: go(I1{}, T_{}); break;
    case 4: go(I2{}, F_{}); break;
    case 5: go(I2{}, T_{}); break;
    case 6: go(I3{}, F_{}); break;
    case 7: go(I3{}, T_{}); break;
    default: break;
  }
}

// Rows t + k·q (k < K) for t in [t0, t1): full(o, d, cv, K) for each full channel vector
// (o: the element offset of row t at channel cv, d = q·C the distance between the runs),
// part(...) for the partial last one, then row_done(K).
template <int64_t K, class Full, class Part, class Done>
inline void rows_map(int64_t C, int64_t q, int64_t t0, int64_t t1, const Full& full,
                     const Part& part, const Done& row_done) {
  const int64_t cv_tail = C / W * W;
  const std::integral_constant<int64_t, K> k;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t cv = 0; cv < cv_tail; cv += W) full(t * C + cv, q * C, cv, k);
    if (cv_tail < C) part(t * C + cv_tail, q * C, cv_tail, k);
    row_done(K);
  }
}
// Rows [r0, r1): four runs a quarter of the range apart, then the last (r1 − r0) mod 4 rows;
// or one row at a time.
template <class Full, class Part, class Done>
inline void rows_map_runs(int64_t C, int64_t r0, int64_t r1, bool runs, const Full& full,
                          const Part& part, const Done& row_done) {
  const int64_t q = runs ? (r1 - r0) / 4 : 0;
  if (q > 0) rows_map<4>(C, q, r0, r0 + q, full, part, row_done);
  rows_map<1>(C, 0, r0 + 4 * q, r1, full, part, row_done);
}
constexpr auto no_op = [](int64_t) {};

// Rows [r0, r1) read whole and in order, in four runs a quarter of the range apart, walked
// side by side: for each channel vector its float accumulator pair comes from a per-thread
// buffer (L1), takes one row of each run and goes back; every FLUSH rows the buffer is added
// into the double sums d1, d2. The last (r1 − r0) mod 4 rows follow one at a time.
//   For rows wider than 4 channel vectors this replaced the column blocks of rows_tile, whose
// rows each read 4 lines and then jumped a row ahead, so the hardware prefetchers lost the
// stream. Four long runs keep four streams the prefetchers follow, and load and store each
// accumulator once per four rows. Measured with the reductions alone, in one process against
// the tiles (2 threads, channels_last, input out of cache as the backward's x is), one row at
// a time took 0.55x the time on (32, 256, 56, 56), 0.63x on (32, 256, 14, 14) and
// (32, 512, 7, 7), 0.59x on (32, 1024, 14, 14); against one row at a time the four runs took
// 0.63-1.03x (0.60-0.63x on (32, 2048, 7, 7), whose 8 KB of accumulators per sum do not stay
// in L1 row after row), and the training forward 0.71-0.98x, in cache and out. Four adjacent
// rows instead of four runs lost the prefetchers again: out of cache the forward on
// (32, 256, 14, 14), (32, 512, 7, 7) and (4096, 512) ran 1.2-1.5x slower than one row.
// Inputs that fit in L2 keep the tiles: on (60, 100), where a call's fixed cost decides, the
// runs (one row at a time) measured 7-9% slower.
constexpr int64_t FLUSH = 64, RUNS_FROM = 256 << 10;
template <class MakeOp>
inline void rows_runs(const MakeOp& make, int64_t C, int64_t r0, int64_t r1, double* d1,
                      double* d2) {
  const int64_t nv = (C + W - 1) / W;
  const int rem = static_cast<int>(C % W);
  std::vector<vf> fa(nv), fb(nv);
  auto flush = [&] {
    for (int64_t v = 0; v < nv; ++v) {
      add_to_double(d1 + v * W, fa[v]);
      add_to_double(d2 + v * W, fb[v]);
      fa[v] = fb[v] = vf{};
    }
  };
  int64_t cnt = 0;
  rows_map_runs(
      C, r0, r1, true,
      [&](int64_t o0, int64_t d, int64_t cv, auto k) {
        const auto op = make(cv);
        vf a = fa[cv / W], b = fb[cv / W];
#pragma GCC unroll 4
        for (int64_t j = 0; j < decltype(k)::value; ++j) op.full(o0 + j * d, a, b);
        fa[cv / W] = a;
        fb[cv / W] = b;
      },
      [&](int64_t o0, int64_t d, int64_t cv, auto k) {
        const auto op = make(cv);
        vf a = fa[cv / W], b = fb[cv / W];
        for (int64_t j = 0; j < decltype(k)::value; ++j) op.part(o0 + j * d, rem, a, b);
        fa[cv / W] = a;
        fb[cv / W] = b;
      },
      [&](int64_t rows) {
        if ((cnt += rows) >= FLUSH) {  // ≤ FLUSH values per lane summed in float
          flush();
          cnt = 0;
        }
      });
  flush();
}

// Per-channel sums over all rows; make(cv) gives the reduction functor for the channel vector
// starting at channel cv (with its per-channel parameters loaded). Each thread sums its rows
// into its own double buffer: rows of up to 4 channel vectors, and inputs of at most
// RUNS_FROM bytes, in register tiles of ROWS_TILE rows; wider rows in four runs (rows_runs).
// The buffers are then added in thread order (deterministic).
template <class MakeOp>
inline void rows_reduce(int64_t M, int64_t C, const MakeOp& make, std::vector<double>& s1,
                        std::vector<double>& s2) {
  using Op = decltype(make(int64_t{0}));
  const int64_t bytes = M * C * Op::kBytes;
  const int nt = at::get_num_threads();
  const int64_t nfull = C / W, rem = C % W, nv = nfull + (rem > 0);
  const int64_t stride = 2 * nv * W;
  std::vector<double> buf(static_cast<size_t>(nt) * stride, 0.0);
  at::parallel_for(0, M, grain_for(C), [&](int64_t r0, int64_t r1) {
    double* d1 = buf.data() + static_cast<size_t>(at::get_thread_num()) * stride;
    double* d2 = d1 + nv * W;
    if (nv > 4 && bytes > RUNS_FROM) {
      rows_runs(make, C, r0, r1, d1, d2);
      return;
    }
    for (int64_t t0 = r0; t0 < r1; t0 += ROWS_TILE) {
      const int64_t t1 = std::min(r1, t0 + ROWS_TILE);
      int64_t pf_end = r1;  // only the first column block prefetches
      int64_t v = 0;
      for (; v + 4 <= nfull; v += 4, pf_end = 0)
        rows_tile<4, false>(make, C, v * W, 0, t0, t1, pf_end, d1, d2);
      if (v < nv)
        rows_tile_tail(make, C, v * W, static_cast<int>(nfull - v), static_cast<int>(rem), t0,
                       t1, pf_end, d1, d2);
    }
  });
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  for (int t = 0; t < nt; ++t) {
    const double* d1 = buf.data() + static_cast<size_t>(t) * stride;
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += d1[c];
      s2[c] += d1[nv * W + c];
    }
  }
}

// ---- the rows layout's normalize and dx sweeps ---------------------------------------------
// Whole rows in order, as the statistics: one row at a time, or four runs side by side. Whole
// rows beat every blocking of the columns tried (python -m bnlab.kernels.ab, 2 threads):
// interleaving 8 adjacent rows measured 1.4-1.7x slower for channels_last eval; blocks of 4 or
// 8 channel vectors over tiles of 32 rows, their parameters held in registers, up to 1.4x
// slower for eval and 1.1-1.27x for the dx sweep when C > 64; chunks of 512 channels (parameters
// kept in L1 for C = 2048) no faster. Four runs a quarter of the rows apart (rows_map_runs) load
// each channel vector's parameters once per four rows and keep the prefetchers' streams long.
// Against one row at a time, in one process: eval took 0.78-0.94x the time on channels_last
// (32, 256, 14, 14), (32, 2048, 7, 7), (32, 256, 56, 56), (32, 128, 28, 28) and 0.99-1.04x on
// (32, 512, 7, 7), (4096, 512); the training forward 0.73-0.91x on the first three; but
// (256, 1024), 1 MB, in L2, ran 1.09-1.11x slower: hence SWEEP_RUNS_FROM. The dx sweep, with
// four parameter vectors per value, took 0.84-0.86x on (32, 2048, 7, 7), whose 32 KB of
// parameters do not stay in L1, and up to 1.19x longer on narrower rows: runs from C = 2048.
// Pointers and the epilogue come by value: read through the parallel_for closure, they were
// reloaded after every store (the store might alias them), which made the loop 2x slower.
constexpr int64_t SWEEP_RUNS_FROM = int64_t{2} << 20;

// Whether a sweep over rows of elem-byte values walks four runs: rows wider than 4 channel
// vectors, at least min_c channels, and data that do not fit in the two cores' L2 (1 MB each
// on the AMD EPYC VM these runs were measured on; 2 MB each on the Intel Xeon VM since).
inline bool rows_runs_pay(const Shape& s, int64_t elem, int64_t min_c) {
  return s.rows && s.C > 4 * W && s.C >= min_c && s.m() * s.C * elem >= SWEEP_RUNS_FROM;
}

template <class Op>
void rows_map_params(const Op op, int64_t C, int64_t r0, int64_t r1, const float* mean,
                     const float* A, const float* B, const float* Cc, bool runs) {
  const int rem = static_cast<int>(C % W);
  rows_map_runs(
      C, r0, r1, runs,
      [=](int64_t o0, int64_t d, int64_t cv, auto k) {
        const vf mu = load(mean + cv), a = load(A + cv), b = load(B + cv), c = load(Cc + cv);
#pragma GCC unroll 4
        for (int64_t j = 0; j < decltype(k)::value; ++j) op.at(o0 + j * d, mu, a, b, c);
      },
      [=](int64_t o0, int64_t d, int64_t cv, auto k) {
        const vf mu = load(mean + cv), a = load(A + cv), b = load(B + cv), c = load(Cc + cv);
        for (int64_t j = 0; j < decltype(k)::value; ++j) op.at_n(o0 + j * d, rem, mu, a, b, c);
      },
      no_op);
}

}  // namespace bnk
