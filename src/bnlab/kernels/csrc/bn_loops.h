// The three BN passes over the two layouts: forward statistics + normalize, backward
// reductions + dx, and the normalize-only sweep that inference and the split paths share.
#pragma once

#include "bn_kernels.h"

namespace bnk {

inline int64_t grain_for(int64_t per_item) {
  return std::max<int64_t>(1, GRAIN / std::max<int64_t>(1, per_item));
}

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

template <typename T>
inline void planar_normalize(const T* x, T* y, const Shape& s, int64_t c, int64_t n0, int64_t n1,
                             float mean, float scale, float shift, const Epilogue<T>& e) {
  const vf mu = splat(mean), sc = splat(scale), sh = splat(shift);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t p = (n * s.C + c) * s.S;
    map_seg(
        s.S,
        [&](int64_t i) { store(y + p + i, epilogue((load(x + p + i) - mu) * sc + sh, p + i, e, W)); },
        [&](int64_t i, int n_) {
          store_n(y + p + i, epilogue((load_n(x + p + i, n_) - mu) * sc + sh, p + i, e, n_), n_);
        });
  }
}

template <typename T>
inline void planar_dx(const DxOp<T>& op, const Shape& s, int64_t c, int64_t n0, int64_t n1,
                      float mean, float A, float B, float Cc) {
  const vf mu = splat(mean), va = splat(A), vb_ = splat(B), vc = splat(Cc);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t p = (n * s.C + c) * s.S;
    map_seg(
        s.S, [&](int64_t i) { op.at(p + i, mu, va, vb_, vc); },
        [&](int64_t i, int n_) { op.at_n(p + i, n_, mu, va, vb_, vc); });
  }
}

// Whether to run whole channels per thread (fused) or split each channel over threads.
inline bool channel_parallel(const Shape& s) {
  const int nt = at::get_num_threads();
  return nt == 1 || s.C >= 4 * nt || s.C % nt == 0 || s.N * s.S * s.C <= GRAIN;
}

// Channels per block so that a block's slab (N·S values of each of `per_elem` bytes, per
// channel) stays in L2 between the reduction and the elementwise sweep. Small planes (7×7)
// need many channels per block: the block is then read n-major, as long contiguous runs,
// instead of one 196-byte plane every C·S·4 bytes (a TLB miss and no prefetch per plane).
inline int64_t channel_block(const Shape& s, int64_t per_elem) {
  constexpr int64_t SLAB = 384 * 1024;
  return std::max<int64_t>(1, SLAB / std::max<int64_t>(1, s.N * s.S * per_elem));
}

// Σ over all planes of the channels [c0, c0 + nb), n-major; make(j, p) gives the reduction
// functor of channel c0 + j at offset p; sums land in s1[j], s2[j]; only channels with
// use[j] (or all if use is null) are read.
template <class MakeOp>
inline void block_reduce(const Shape& s, int64_t c0, int64_t nb, const MakeOp& make,
                         double* s1, double* s2, const char* use = nullptr) {
  std::vector<Acc> acc(nb);
  std::vector<int64_t> cnt(nb, 0);
  for (int64_t n = 0; n < s.N; ++n) {
    for (int64_t j = 0; j < nb; ++j) {
      if (use && !use[j]) continue;
      const int64_t plane = (n * s.C + c0 + j) * s.S;
      Acc A = acc[j];
      for (int64_t off = 0; off < s.S; off += BLOCK) {
        const int64_t len = std::min(BLOCK, s.S - off);
        const auto op = make(j, plane + off);
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

// ---- rows (M, C) ---------------------------------------------------------------------------
// Per-channel sums over all rows: full(off, cv, a, b) / part(off, cv, n, a, b) per vector.
template <class Full, class Part>
inline void rows_reduce(int64_t M, int64_t C, const Full& full, const Part& part,
                        std::vector<double>& s1, std::vector<double>& s2) {
  const int nt = at::get_num_threads();
  const int64_t nfull = C / W, rem = C % W, nv = nfull + (rem > 0);
  std::vector<double> buf(static_cast<size_t>(nt) * 2 * C, 0.0);
  at::parallel_for(0, M, grain_for(C), [&](int64_t r0, int64_t r1) {
    double* d1 = buf.data() + static_cast<size_t>(at::get_thread_num()) * 2 * C;
    double* d2 = d1 + C;
    std::vector<vf> a(nv), b(nv);
    int64_t cnt = 0;
    auto flush = [&]() {
      for (int64_t v = 0; v < nfull; ++v) {
        add_to_double(d1 + v * W, a[v]);
        add_to_double(d2 + v * W, b[v]);
        a[v] = b[v] = vf{};
      }
      if (rem) {
        for (int j = 0; j < rem; ++j) {
          d1[nfull * W + j] += a[nfull][j];
          d2[nfull * W + j] += b[nfull][j];
        }
        a[nfull] = b[nfull] = vf{};
      }
      cnt = 0;
    };
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * C;
      for (int64_t v = 0; v < nfull; ++v) full(base + v * W, v * W, a[v], b[v]);
      if (rem) part(base + nfull * W, nfull * W, static_cast<int>(rem), a[nfull], b[nfull]);
      if (++cnt == ROWS_BLOCK) flush();
    }
    flush();
  });
  s1.assign(C, 0.0);
  s2.assign(C, 0.0);
  for (int t = 0; t < nt; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += buf[static_cast<size_t>(t) * 2 * C + c];
      s2[c] += buf[static_cast<size_t>(t) * 2 * C + C + c];
    }
  }
}

// Per-channel parameters padded to whole vectors, so tails load full vectors.
inline std::vector<float> padded(int64_t C) { return std::vector<float>((C + W - 1) / W * W, 0.f); }

// ---- the shared normalize / dx sweeps (any layout, per-channel parameters) ----------------
template <typename T>
void normalize_all(const T* x, T* y, const Shape& s, const float* mean, const float* scale,
                   const float* shift, const Epilogue<T>& e) {
  if (!s.rows) {
    at::parallel_for(0, s.N * s.C, grain_for(s.S), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / s.C, c = i % s.C;
        planar_normalize(x, y, s, c, n, n + 1, mean[c], scale[c], shift[c], e);
      }
    });
    return;
  }
  const int64_t C = s.C, nfull = C / W, rem = C % W;
  at::parallel_for(0, s.m(), grain_for(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * C;
      for (int64_t v = 0; v < nfull; ++v) {
        const int64_t o = base + v * W, cv = v * W;
        vf yv = (load(x + o) - load(mean + cv)) * load(scale + cv) + load(shift + cv);
        store(y + o, epilogue(yv, o, e, W));
      }
      if (rem) {
        const int64_t o = base + nfull * W, cv = nfull * W;
        const int n = static_cast<int>(rem);
        vf yv = (load_n(x + o, n) - load(mean + cv)) * load(scale + cv) + load(shift + cv);
        store_n(y + o, epilogue(yv, o, e, n), n);
      }
    }
  });
}

template <typename T>
void dx_all(const DxOp<T>& op, const Shape& s, const float* mean, const float* A, const float* B,
            const float* Cc) {
  if (!s.rows) {
    at::parallel_for(0, s.N * s.C, grain_for(s.S), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / s.C, c = i % s.C;
        planar_dx(op, s, c, n, n + 1, mean[c], A[c], B[c], Cc[c]);
      }
    });
    return;
  }
  const int64_t C = s.C, nfull = C / W, rem = C % W;
  at::parallel_for(0, s.m(), grain_for(C), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * C;
      for (int64_t v = 0; v < nfull; ++v) {
        const int64_t cv = v * W;
        op.at(base + cv, load(mean + cv), load(A + cv), load(B + cv), load(Cc + cv));
      }
      if (rem) {
        const int64_t cv = nfull * W;
        op.at_n(base + cv, static_cast<int>(rem), load(mean + cv), load(A + cv), load(B + cv),
                load(Cc + cv));
      }
    }
  });
}

}  // namespace bnk
