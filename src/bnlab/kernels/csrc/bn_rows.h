// The rows layout's (channels_last, (N, C)) statistics: per-channel sums over register tiles of
// rows x channel vectors (the normalize and dx sweeps, shared with the planar layout, are in
// bn_loops.h).
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

// Per-channel sums over all rows; make(cv) gives the reduction functor for the channel vector
// starting at channel cv (with its per-channel parameters loaded). Each thread walks its rows in
// tiles of ROWS_TILE rows, column block by column block (4 channel vectors), so the tile's
// later column blocks read from L1/L2 what the first one brought in, and sums into its own
// double buffer; the buffers are then added in thread order (deterministic).
template <class MakeOp>
inline void rows_reduce(int64_t M, int64_t C, const MakeOp& make, std::vector<double>& s1,
                        std::vector<double>& s2) {
  const int nt = at::get_num_threads();
  const int64_t nfull = C / W, rem = C % W, nv = nfull + (rem > 0);
  const int64_t stride = 2 * nv * W;
  std::vector<double> buf(static_cast<size_t>(nt) * stride, 0.0);
  at::parallel_for(0, M, grain_for(C), [&](int64_t r0, int64_t r1) {
    double* d1 = buf.data() + static_cast<size_t>(at::get_thread_num()) * stride;
    double* d2 = d1 + nv * W;
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

}  // namespace bnk
