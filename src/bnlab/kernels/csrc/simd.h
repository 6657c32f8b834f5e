// Portable 16-lane float vectors (GCC/Clang vector extensions) for the bnlab BN kernels.
//
// A `vf` is 16 floats = one cache line. The compiler lowers it to one zmm register with
// AVX-512, two ymm with AVX2, four xmm with SSE, so the code has a fixed, compile-time vector
// width and no per-ISA source. Partial (tail) loads and stores use AVX-512 masks where present
// and a scalar loop elsewhere. bfloat16 is loaded by widening (bits << 16) and stored with
// round-to-nearest-even, NaN -> 0x7FC0, exactly as c10::BFloat16 does.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace bnk {

constexpr int W = 16;  // lanes per vector
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint8_t vb __attribute__((vector_size(16)));
using bf16 = c10::BFloat16;

inline vf splat(float a) { return vf{} + a; }

// Lane mask: all ones in lanes [0, n), zero elsewhere.
inline vi lanes_lt(int n) {
  const vi iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return iota < n;
}
inline vf keep(vf v, vi m) { return (vf)((vi)v & m); }

// a·b + c, fused (one rounding) where the ISA has it. The build turns off automatic
// contraction (see _build.py); the loops ask for a fused multiply-add where they want one:
// on cache-resident tensors the passes are bound by floating-point issue, not memory.
inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  return a * b + c;
#endif
}

// ---- loads -------------------------------------------------------------------------------
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf widen(vh h) { return (vf)(__builtin_convertvector(h, vi) << 16); }
inline vf load(const bf16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return widen(h);
}
inline vf load_n(const float* p, int n) {
#if defined(__AVX512F__)
  return (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#else
  vf v = {};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}
inline vf load_n(const bf16* p, int n) {
  vh h = {};
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  __m256i r = _mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), p);
  std::memcpy(&h, &r, sizeof h);
#else
  const uint16_t* q = reinterpret_cast<const uint16_t*>(p);
  for (int i = 0; i < n; ++i) h[i] = q[i];
#endif
  return widen(h);
}
// A ReLU mask byte per element (0 or 1) -> all-ones / zero lanes. With AVX-512 one vpmovzxbd:
// GCC lowers the generic __builtin_convertvector of 16 bytes to 16 scalar extracts and inserts,
// which made the masked backward 2.4x slower than the unmasked one.
inline vi load_mask(const uint8_t* p) {
#if defined(__AVX512F__)
  return -(vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  vb b;
  std::memcpy(&b, p, sizeof b);
  return -__builtin_convertvector(b, vi);
#endif
}
inline vi load_mask_n(const uint8_t* p, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  return -(vi)_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1u), p));
#else
  vb b = {};
  for (int i = 0; i < n; ++i) b[i] = p[i];
  return -__builtin_convertvector(b, vi);
#endif
}

// ---- stores ------------------------------------------------------------------------------
inline vh narrow(vf v) {
  vu u = (vu)v;
  vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vu nan = (vu)((u & 0x7fffffffu) > 0x7f800000u);
  vu out = (rounded & ~nan) | (0x7fc0u & nan);
  return __builtin_convertvector(out, vh);
}
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void store(bf16* p, vf v) {
  vh h = narrow(v);
  std::memcpy(p, &h, sizeof h);
}
inline void store_n(float* p, vf v, int n) {
#if defined(__AVX512F__)
  _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#else
  for (int i = 0; i < n; ++i) p[i] = v[i];
#endif
}
inline void store_n(bf16* p, vf v, int n) {
  vh h = narrow(v);
  uint16_t* q = reinterpret_cast<uint16_t*>(p);
  for (int i = 0; i < n; ++i) q[i] = h[i];
}
// Output store, streaming (non-temporal) when `nt` and the address is 64-byte aligned: for
// outputs that will not stay in cache it skips the read-for-ownership of each destination line
// (a third of a normalize's DRAM traffic). float32 only; bfloat16 outputs store normally.
inline void store_out(float* p, vf v, bool nt) {
#if defined(__AVX512F__)
  if (nt && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_ps(p, (__m512)v);
    return;
  }
#endif
  store(p, v);
}
inline void store_out(bf16* p, vf v, bool) { store(p, v); }
// Orders a thread's streaming stores before whatever follows (the end of a parallel region).
inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}
inline void store_mask(uint8_t* p, vi m) {  // (this direction GCC lowers to one vpmovdb)
  vb b = __builtin_convertvector(m & 1, vb);
  std::memcpy(p, &b, sizeof b);
}
inline void store_mask_n(uint8_t* p, vi m, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  _mm_mask_storeu_epi8(p, (__mmask16)((1u << n) - 1u), _mm512_cvtepi32_epi8((__m512i)(m & 1)));
#else
  vb b = __builtin_convertvector(m & 1, vb);
  for (int i = 0; i < n; ++i) p[i] = b[i];
#endif
}

typedef double vd __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
// d[0..16) += v, in double (8-lane double vectors).
inline void add_to_double(double* d, vf v) {
  vf8 lo = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  vf8 hi = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  vd a, b;
  std::memcpy(&a, d, sizeof a);
  std::memcpy(&b, d + 8, sizeof b);
  a += __builtin_convertvector(lo, vd);
  b += __builtin_convertvector(hi, vd);
  std::memcpy(d, &a, sizeof a);
  std::memcpy(d + 8, &b, sizeof b);
}

// Horizontal sum in double (used once per block of thousands of elements).
inline double hsum(vf v) {
  double s = 0.0;
  for (int i = 0; i < W; ++i) s += static_cast<double>(v[i]);
  return s;
}

}  // namespace bnk
