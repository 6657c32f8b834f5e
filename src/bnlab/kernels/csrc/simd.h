// Portable float vectors (GCC/Clang vector extensions) for the bnlab BN kernels.
//
// The width W is the target's native vector: 16 floats (one zmm, one cache line) with
// AVX-512, 8 (one ymm) with AVX, 4 (one xmm) otherwise. The loops are written once for any W.
// (A fixed 16 lanes everywhere was tried: without AVX-512, GCC moved each 64-byte vector
// through the stack in 16-byte pieces, and an x86-64-v3 build ran the training forward at
// 4.8x a copy instead of 1.8x.) Partial (tail) loads and stores use AVX-512 masks where
// present and a scalar loop elsewhere. bfloat16 is loaded by widening (bits << 16) and stored
// with round-to-nearest-even, NaN -> 0x7FC0, exactly as c10::BFloat16 does.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace bnk {

#if defined(__AVX512F__)
constexpr int W = 16;  // lanes per vector
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
typedef uint16_t vh __attribute__((vector_size(2 * W)));
typedef uint8_t vb __attribute__((vector_size(W)));
using bf16 = c10::BFloat16;

// a − (+0) is a for every a, −0 included, so this compiles to one broadcast (from memory);
// vf{} + a is not a no-op (+0 + −0 = +0) and cost a scalar add before every broadcast.
inline vf splat(float a) { return a - vf{}; }

// Lane mask: all ones in lanes [0, n), zero elsewhere.
inline vi lanes_lt(int n) {
  vi iota{};
  for (int i = 0; i < W; ++i) iota[i] = i;  // (folded to a constant)
  return iota < n;
}
inline vf keep(vf v, vi m) { return (vf)((vi)v & m); }

// a·b + c, fused (one rounding) where the ISA has it. The build turns off automatic
// contraction (see _build.py); the loops ask for a fused multiply-add where they want one:
// on cache-resident tensors the passes are bound by floating-point issue, not memory.
inline vf fmadd(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__AVX__) && defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
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
// A ReLU mask byte per element (0 or 1) -> all-ones / zero lanes: one vpmovzxbd. GCC lowers
// the generic __builtin_convertvector of the bytes to scalar extracts and inserts, which made
// the masked backward 2.4x slower than the unmasked one.
inline vi load_mask(const uint8_t* p) {
#if defined(__AVX512F__)
  return -(vi)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__AVX2__)
  return -(vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
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
// Output store, streaming (non-temporal) when `nt` and the address is vector-aligned: for
// outputs that will not stay in cache it skips the read-for-ownership of each destination line
// (a third of a normalize's DRAM traffic). float32 only; bfloat16 outputs store normally.
inline void store_out(float* p, vf v, bool nt) {
#if defined(__AVX512F__)
  if (nt && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_ps(p, (__m512)v);
    return;
  }
#elif defined(__AVX__)
  if (nt && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
    _mm256_stream_ps(p, (__m256)v);
    return;
  }
#endif
  store(p, v);
}
inline void store_out(bf16* p, vf v, bool) { store(p, v); }
// Orders a thread's streaming stores before whatever follows (the end of a parallel region).
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}
inline void store_mask(uint8_t* p, vi m) {  // (GCC lowers this to one vpmovdb with AVX-512)
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m256i v = (__m256i)(m & 1);  // 8 x int32 -> 8 x uint16 -> 8 x uint8
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi16(h, h));
#else
  vb b = __builtin_convertvector(m & 1, vb);
  std::memcpy(p, &b, sizeof b);
#endif
}
inline void store_mask_n(uint8_t* p, vi m, int n) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  _mm_mask_storeu_epi8(p, (__mmask16)((1u << n) - 1u), _mm512_cvtepi32_epi8((__m512i)(m & 1)));
#else
  vb b = __builtin_convertvector(m & 1, vb);
  for (int i = 0; i < n; ++i) p[i] = b[i];
#endif
}

typedef double vd __attribute__((vector_size(8 * W)));
// d[0..W) += v, in double.
inline void add_to_double(double* d, vf v) {
  vd a;
  std::memcpy(&a, d, sizeof a);
  a += __builtin_convertvector(v, vd);
  std::memcpy(d, &a, sizeof a);
}

// Horizontal sum in double (used once per block of thousands of elements).
inline double hsum(vf v) {
  double s = 0.0;
  for (int i = 0; i < W; ++i) s += static_cast<double>(v[i]);
  return s;
}

}  // namespace bnk
