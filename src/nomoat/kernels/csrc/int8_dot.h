// int8 panels (gemv.h's layout: (P, K, 64) int8 codes with fp16 scales per block of 32 input channels per output
// channel, GGUF Q8_0's w = d[n, b] * q) against activations rounded to int8 per block of 32 input channels
// (q4k::Q4Rows: llama.cpp's q8_0 activations, as the 4-bit kernels take them), with integer dot products: AVX-512-VNNI
// `vpdpbusd` adds four byte products per 32-bit lane in one instruction. This is llama.cpp's q8_0 x q8_0 arithmetic.
//
// The panel is k-major (64 channels per k), while `vpdpbusd` wants four consecutive k of one channel in a lane: four
// k rows (4 x 64 bytes) are interleaved in registers by two rounds of byte and word unpacks into four vectors whose
// lane 4 L + q (L: the 128-bit lane) holds channel 16 L + 4 i + q of vector i; the block scales are stored in that
// order (`i8_scale_pos`), so each block's weight scales are four vector loads, and the lane order is undone once per
// panel. `vpdpbusd` multiplies unsigned by signed bytes: the codes are offset by 128 (an XOR of the sign bit), and
// 128 times the block's sum of activation codes (`sq`) is taken off each block's integer sum, exactly. Each block's
// sum is scaled by the product of the block's activation scale and its weight scales, in fp32.
//
// The default where the build has VNNI (with per-block weight scales, as accurate as llama.cpp's q8_0: perplexity
// measured in benchmarks/bench_quality.py); `NOMOAT_I8_DOT=0` (or the `i8_dot` op, `i8_dot_mode`) forces the exact
// path of fp32 activations and widened weights (gemv.h), which builds without VNNI always take. Only inputs of a
// multiple of 32 channels take the integer path.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>

#include "gemv.h"
#include "q4_rows.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool HAS_I8_DOT = true;
#else
constexpr bool HAS_I8_DOT = false;
#endif

static inline int i8_dot_default() {
  const char* env = std::getenv("NOMOAT_I8_DOT");
  return HAS_I8_DOT && !(env != nullptr && env[0] == '0') ? 1 : 0;
}
// Whether int8 panels take int8 activations and integer dot products: one setting for the process.
inline std::atomic<int> i8_dot_mode{i8_dot_default()};

// Whether an int8 projection of K input channels takes the integer path now.
static inline bool i8_dot_on(int64_t K) {
  return HAS_I8_DOT && K % q4k::QK == 0 && i8_dot_mode.load(std::memory_order_relaxed) != 0;
}

namespace i8k {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Four k rows of a panel (p: row k, 64 bytes each) as four vectors of (k, k+1, k+2, k+3) byte quads, offset by 128.
static inline void quads(const int8_t* p, __m512i v[4]) {
  const __m512i r0 = _mm512_loadu_si512((const void*)p), r1 = _mm512_loadu_si512((const void*)(p + PANEL));
  const __m512i r2 = _mm512_loadu_si512((const void*)(p + 2 * PANEL));
  const __m512i r3 = _mm512_loadu_si512((const void*)(p + 3 * PANEL));
  const __m512i a = _mm512_unpacklo_epi8(r0, r1), b = _mm512_unpackhi_epi8(r0, r1);
  const __m512i c = _mm512_unpacklo_epi8(r2, r3), d = _mm512_unpackhi_epi8(r2, r3);
  const __m512i off = _mm512_set1_epi8((char)0x80);
  v[0] = _mm512_xor_si512(_mm512_unpacklo_epi16(a, c), off);
  v[1] = _mm512_xor_si512(_mm512_unpackhi_epi16(a, c), off);
  v[2] = _mm512_xor_si512(_mm512_unpacklo_epi16(b, d), off);
  v[3] = _mm512_xor_si512(_mm512_unpackhi_epi16(b, d), off);
}

// out (M x 64) = M rows of quantized activations times one int8 panel with block scales `ds` (nb, 64).
template <int M>
static void panel_rows(const q4k::Q4Rows& x, const int8_t* w, const uint16_t* ds, float* out) {
  const int64_t K = x.K, nb = K / q4k::QK;
  __m512 acc[M][4];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i s[M][4];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i) s[m][i] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int g = 0; g < q4k::QK / 4; ++g) {
      const int64_t k = b * q4k::QK + 4 * g;
      __m512i v[4];
      quads(w + k * PANEL, v);
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        int32_t four;
        std::memcpy(&four, x.xq + m * K + k, 4);
        const __m512i xb = _mm512_set1_epi32(four);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) s[m][i] = _mm512_dpbusd_epi32(s[m][i], v[i], xb);
      }
    }
    __m512 dw[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) dw[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(ds + b * PANEL + 16 * i)));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512i corr = _mm512_set1_epi32(128 * x.sq[m * nb + b]);
      const __m512 d = _mm512_set1_ps(x.dx[m * nb + b]);
#pragma GCC unroll 4
      for (int i = 0; i < 4; ++i)
        acc[m][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s[m][i], corr)), _mm512_mul_ps(dw[i], d),
                                    acc[m][i]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    alignas(64) float t[4][16];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) _mm512_store_ps(t[i], acc[m][i]);
    for (int i = 0; i < 4; ++i)
      for (int L = 0; L < 4; ++L)
        for (int q = 0; q < 4; ++q) out[m * PANEL + 16 * L + 4 * i + q] = t[i][4 * L + q];
  }
}

// out (m x 64) for 1 <= m <= 8 rows: blocks of at most 2 rows (their sums and the four weight quads fit the
// register file); the panel stays in L1/L2 between blocks.
static inline void panel_any(int m, const q4k::Q4Rows& x, const int8_t* w, const uint16_t* ds, float* out) {
  for (int m0 = 0; m0 < m; m0 += 2) {
    if (m - m0 >= 2) panel_rows<2>(x.rows(m0), w, ds, out + m0 * PANEL);
    else panel_rows<1>(x.rows(m0), w, ds, out + m0 * PANEL);
  }
}
#else
// Builds without VNNI never take the integer path (`i8_dot_on`); plain loops keep the call well-defined.
static inline void panel_any(int m, const q4k::Q4Rows& x, const int8_t* w, const uint16_t* ds, float* out) {
  const int64_t K = x.K, nb = K / q4k::QK;
  for (int r = 0; r < m; ++r)
    for (int o = 0; o < PANEL; ++o) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t s = 0;
        for (int64_t k = b * q4k::QK; k < (b + 1) * q4k::QK; ++k) s += (int32_t)x.xq[r * K + k] * w[k * PANEL + o];
        acc += (float)s * (half_to_f(ds[b * PANEL + i8_scale_pos(o)]) * x.dx[r * nb + b]);
      }
      out[r * PANEL + o] = acc;
    }
}
#endif

}  // namespace i8k
